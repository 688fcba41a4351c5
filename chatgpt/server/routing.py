"""Answer `//x` exactly like `/x` without a redirect: a websocket handshake does not follow one."""
from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web
from yarl import URL

if TYPE_CHECKING:  # aiohttp types get_info() with a TypedDict it does not export
    from aiohttp.web_urldispatcher import _InfoDict

_SLASHES = re.compile(r"/{2,}")


class MergedSlashesResource(web.AbstractResource):
    """Resolves a path with repeated slashes against the router as if they were one.

    It sits at canonical `/`, so the router tries it only after a path found nothing of its own
    (the router walks a path's parents up to `/`); `/x` is never slowed down."""

    def __init__(self, router: web.UrlDispatcher, aliases: Mapping[str, str] | None = None) -> None:
        super().__init__(name=None)
        self._router = router
        self._aliases = dict(aliases or {})  # prefix → prefix, e.g. /api1/ → /api/

    @property
    def canonical(self) -> str:
        return "/"

    def url_for(self, **kwargs: str) -> URL:
        return URL("/")

    def _rewrite(self, path: str) -> str | None:
        merged = _SLASHES.sub("/", path)
        for alias, target in self._aliases.items():
            if merged.startswith(alias):
                merged = target + merged[len(alias):]
        return merged if merged != path else None

    async def resolve(self, request: web.Request) -> tuple[web.UrlMappingMatchInfo | None, set[str]]:
        merged = self._rewrite(request.rel_url.path_safe)
        if merged is None:
            return None, set()
        clone = request.clone(rel_url=request.rel_url.with_path(merged, encoded=True))
        return await self._router.resolve(clone), set()

    def add_prefix(self, prefix: str) -> None:
        raise RuntimeError("MergedSlashesResource belongs to the top-level app")

    def get_info(self) -> _InfoDict:
        return {"path": "/"}

    def raw_match(self, path: str) -> bool:
        return False

    def __len__(self) -> int:
        return 0

    def __iter__(self) -> Iterator[web.AbstractRoute]:
        return iter(())


def merge_slashes(app: web.Application, aliases: Mapping[str, str] | None = None) -> None:
    """Register the resource first, so it precedes the `/` route in the router's `/` bucket."""
    app.router.register_resource(MergedSlashesResource(app.router, aliases))
