"""The start-up description: where answers come from and which upstream serves what, keys masked."""
from __future__ import annotations

from chatgpt.domain.failover import host_of
from chatgpt.domain.keypool import mask
from chatgpt.server.logs import redacted
from chatgpt.settings import Settings


def describe(settings: Settings) -> str:
    """One line saying where answers come from, without revealing any key."""
    names = ", ".join(e.name for e in settings.upstream_entries)
    if settings.pool_provider == "offline":
        return ("provider: offline (built-in, no network) — no upstream has a key, so anonymous questions "
                f"get a canned notice; users' own API keys still go to their upstream ({names})"
                + describe_state(settings))
    return f"provider: openai, upstreams {names}, default model {settings.default_model}" + describe_state(settings)


def describe_state(settings: Settings) -> str:
    """Where the shared state lives, for the start line (a Redis URL without its password)."""
    state = settings.state
    if not state.redis_url:
        return ""
    return f"; state: redis at {redacted(state.redis_url)} (redis_fail: {state.redis_fail})"


def describe_routes(settings: Settings) -> list[str]:
    """Which upstream serves what, with masked keys: one line per upstream, one for the models."""
    lines = []
    for e in settings.upstream_entries:
        keys = ", ".join(mask(k) for k in e.api_keys) or (f"none ({e.api_keys_env} unset)" if e.api_keys_env
                                                            else "none")
        draws = "; draws pictures" if e.images else ""
        lines.append(f"upstream {e.name} at {host_of(e.base_url)} serves {', '.join(e.models)}{draws}; "
                     f"keys: {keys}")
    models = settings.models
    aliases = ", ".join(f"{a} -> {t}" for a, t in models.aliases.items()) or "none"
    lines.append(f"models: default {settings.default_model}, pictures "
                 f"{models.image or '(the upstream default)'}, aliases {aliases}")
    return lines
