"""The routing table: what a client's model means, which upstreams serve it, where pictures are drawn."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Generic, Protocol, TypeVar


class RouteError(ValueError):
    """The upstreams and models contradict each other; the message names the setting, in one line."""


class Servable(Protocol):
    """What routing needs to know of an upstream (settings entries and live upstreams alike)."""

    @property
    def name(self) -> str: ...

    @property
    def models(self) -> Sequence[str]: ...

    @property
    def images(self) -> bool: ...


U = TypeVar("U", bound=Servable)


def _served(upstreams: Sequence[Servable]) -> str:
    """What each upstream serves, for an error message: `a serves x, y; b serves z`."""
    return "; ".join(f"{u.name} serves {', '.join(u.models)}" for u in upstreams)


class RouteTable(Generic[U]):
    """Pure routing over an ordered list of upstreams; every contradiction is refused at construction."""

    def __init__(self, upstreams: Sequence[U], default: str, aliases: Mapping[str, str], image: str) -> None:
        """Check the table once (names, aliases, default and image model); raise RouteError naming the setting."""
        self.upstreams = tuple(upstreams)
        self.aliases = dict(aliases)
        self.default = default
        self.image = image
        self._check_upstreams()
        self._check_aliases()
        if not self.serving(default):
            raise RouteError(f"setting models.default: {default} is served by no upstream "
                             f"({_served(self.upstreams)})")
        if image and not self.drawing():
            raise RouteError(f"setting models.image: {image} is served by no upstream with images: true "
                             f"({_served([u for u in self.upstreams if u.images]) or 'none draws'})")

    def _check_upstreams(self) -> None:
        if not self.upstreams:
            raise RouteError("setting upstreams: at least one upstream is needed")
        seen: set[str] = set()
        for upstream in self.upstreams:
            if upstream.name in seen:
                raise RouteError(f"setting upstreams: two upstreams are named {upstream.name}")
            seen.add(upstream.name)
            if not upstream.models:
                raise RouteError(f"setting upstreams: upstream {upstream.name} lists no models")

    def _check_aliases(self) -> None:
        served = {m for u in self.upstreams for m in u.models}
        for alias, target in self.aliases.items():
            if not alias.strip() or not target.strip():
                raise RouteError(f"setting models.aliases: {alias!r}: {target!r}: names must not be blank")
            if alias in served:
                owner = next(u.name for u in self.upstreams if alias in u.models)
                raise RouteError(f"setting models.aliases.{alias}: upstream {owner} serves {alias} itself; "
                                 f"an alias cannot hide it")
            chain = [alias]
            while chain[-1] in self.aliases:
                chain.append(self.aliases[chain[-1]])
                if chain[-1] in chain[:-1]:
                    raise RouteError(f"setting models.aliases.{alias}: the aliases loop: {' -> '.join(chain)}")
            if chain[-1] not in served:
                raise RouteError(f"setting models.aliases.{alias}: {chain[-1]} is served by no upstream "
                                 f"({_served(self.upstreams)})")

    def resolve(self, model: str) -> str:
        """What the upstreams are asked for when a client says `model` (aliases followed to the end)."""
        while model in self.aliases:  # loops were refused at construction
            model = self.aliases[model]
        return model

    def offers(self, model: str) -> bool:
        """True when `model` is a served model or an alias of one."""
        return bool(self.serving(model))

    def serving(self, model: str) -> list[U]:
        """The upstreams serving `model` (after aliases), in the configured order: the fall-over order."""
        wanted = self.resolve(model)
        return [u for u in self.upstreams if wanted in u.models]

    def for_own_key(self, model: str) -> U:
        """The one upstream a caller's own key goes to: the first serving `model`, else the first upstream.
        Never several: a caller's key belongs to one provider and must not be shown to another."""
        serving = self.serving(model)
        return serving[0] if serving else self.upstreams[0]

    def drawing(self) -> list[U]:
        """The upstreams that draw pictures of the image model, in order (any that draws when none is set)."""
        wanted = self.resolve(self.image) if self.image else None
        return [u for u in self.upstreams if u.images and (wanted is None or wanted in u.models)]

    def offered(self) -> list[str]:
        """Every model and alias a client may name, served models first in upstream order."""
        names = [m for u in self.upstreams for m in u.models] + list(self.aliases)
        return list(dict.fromkeys(names))
