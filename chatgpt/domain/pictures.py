"""Saved pictures as the domain sees them: a store that keeps what a provider drew."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from chatgpt.domain.provider import GeneratedImage


@dataclass(frozen=True)
class StoredImage:
    """A saved picture: its file name under the folder and its public URL."""

    name: str
    url: str


class PictureStore(Protocol):
    """Keeps generated pictures (implemented by `chatgpt/server/images.py`)."""

    async def store(self, image: GeneratedImage) -> StoredImage:
        """Save `image`; raise UpstreamBroken when it is not a picture or too large."""
        ...

    def read(self, stored: StoredImage) -> bytes:
        """The saved picture's bytes (blocking: call it in a thread)."""
        ...
