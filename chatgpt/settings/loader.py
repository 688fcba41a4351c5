"""load_settings: YAML file, then the environment, built key by key into Settings and checked."""
from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from chatgpt.settings.checks import MIN_ADMIN_TOKEN, validate
from chatgpt.settings.errors import SettingsError
from chatgpt.settings.root import Settings


def _type_name(kind: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        kind, "a list of strings"
    )


def _convert(key: str, kind: Any, value: Any) -> Any:
    """Check one leaf value against its declared type; numbers from YAML ints are accepted as floats."""
    origin = typing.get_origin(kind)
    if origin is tuple and dataclasses.is_dataclass(item := typing.get_args(kind)[0]):
        if value is None:  # `upstreams:` with every entry commented out
            return ()
        if not isinstance(value, list):
            raise SettingsError(f"setting {key}: expected a list of mappings, got {value!r}")
        return tuple(_build(typing.cast(type, item), entry, f"{key}[{i}].") for i, entry in enumerate(value))
    if origin is dict:
        value = {} if value is None else value
        if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in value.items()):
            raise SettingsError(f"setting {key}: expected a mapping of names to names, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SettingsError(f"setting {key}: expected a list of strings, got {value!r}")
        return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise SettingsError(f"setting {key}: expected {_type_name(kind)}, got {value!r}")
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SettingsError(f"setting {prefix.rstrip('.') or 'file'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise SettingsError(f"setting {prefix}{key}: unknown key")
    values: dict[str, Any] = {}
    for name in names:
        if name not in data:
            continue
        kind = hints[name]
        key = f"{prefix}{name}"
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            values[name] = _build(kind, data[name], key + ".")
        else:
            values[name] = _convert(key, kind, data[name])
    return cls(**values)


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    """The file's section `name` as a dict to add overrides to (an empty `name:` counts as {})."""
    if raw.get(name) is None:
        raw[name] = {}
    section = raw[name]
    return section if isinstance(section, dict) else {}  # a wrong type is reported by _build


def _keys_of(value: str) -> list[str]:
    """Keys from an environment variable: comma-separated, blanks dropped."""
    return [k.strip() for k in value.split(",") if k.strip()]


def _env_keys(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    """Each upstream's `api_keys_env` is read into its `api_keys`. An unset variable gives an empty pool,
    not a refusal: the shipped settings name providers an operator may not use, and an upstream without
    keys still serves callers' own keys. The start-up log says so (`notes`)."""
    entries = raw.get("upstreams")
    for index, entry in enumerate(entries if isinstance(entries, list) else []):
        if not isinstance(entry, dict) or not isinstance(entry.get("api_keys_env"), str):
            continue  # a wrong type is reported by _build
        if "api_keys" in entry:
            raise SettingsError(f"setting upstreams[{index}].api_keys_env: give api_keys or api_keys_env, not both")
        entry["api_keys"] = _keys_of(env.get(entry["api_keys_env"].strip(), ""))


# Environment variable → the setting it fills; a secret's value is never shown in an error.
ENV_SETTINGS = {"OPENAI_API_KEY": "upstream.api_keys", "OPENAI_BASE_URL": "upstream.base_url",
                "BAIXING_API_KEY": "upstream.baixing_key", "REDIS_URL": "state.redis_url",
                "CHATGPT_ADMIN_TOKEN": "admin.token", "WECHAT_APP_SECRET": "wechat.secret"}
# A Redis URL may hold a password: shown no more than a key.
SECRET_ENV = frozenset({"OPENAI_API_KEY", "BAIXING_API_KEY", "REDIS_URL", "CHATGPT_ADMIN_TOKEN",
                        "WECHAT_APP_SECRET"})
SHORTHAND_ENV = frozenset({"OPENAI_API_KEY", "OPENAI_BASE_URL"})


def _env_overrides(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Secrets from the environment win over the file; returns {setting: variable} of those applied."""
    applied: dict[str, str] = {}
    for variable, setting in ENV_SETTINGS.items():
        value = env.get(variable, "").strip()
        # OPENAI_API_KEY / OPENAI_BASE_URL fill the one-upstream shorthand only; with `upstreams:` an
        # upstream names its variable in api_keys_env.
        if not value or (variable in SHORTHAND_ENV and raw.get("upstreams")):
            continue
        section, name = setting.split(".")
        _section(raw, section)[name] = _keys_of(value) if variable == "OPENAI_API_KEY" else value
        applied[setting] = variable
    _env_keys(raw, env)
    return applied


def _env_error(error: SettingsError, applied: dict[str, str], env: Mapping[str, str]) -> SettingsError:
    """An error in a setting that came from the environment, told as the variable and its value."""
    variable = applied.get(error.key or "")
    if variable is None:
        return error
    shown = "(value hidden)" if variable in SECRET_ENV else repr(env[variable].strip())
    return SettingsError(f"environment variable {variable}={shown}: {error.reason} (it sets {error.key})",
                         error.key, error.reason)


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read settings from `path` (or ./settings.yaml when present), apply env overrides, validate."""
    env = os.environ if env is None else env
    raw: Any = {}
    if path is None and Path("settings.yaml").is_file():
        path = "settings.yaml"
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError(f"settings file {path}: cannot read ({exc.strerror})") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise SettingsError(f"settings file {path}{where}: not valid YAML") from None
        if not isinstance(raw, dict):
            raise SettingsError(f"settings file {path}: expected a mapping at the top level")
    applied = _env_overrides(raw, env)
    token = env.get("CHATGPT_ADMIN_TOKEN", "").strip()
    if token and len(token) < MIN_ADMIN_TOKEN:  # named as the variable it came from; never shown
        raise SettingsError(f"environment variable CHATGPT_ADMIN_TOKEN: expected at least {MIN_ADMIN_TOKEN} "
                            f"characters, got {len(token)}")
    try:
        return validate(_build(Settings, raw, ""))
    except SettingsError as error:
        raise _env_error(error, applied, env) from None
