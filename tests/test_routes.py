"""The routing table and the `upstreams:` / `models:` settings (PROTOCOL.md E.4): routing without a server,
and every contradiction refused at start-up with one line naming it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from chatgpt.domain.routes import RouteError, RouteTable
from chatgpt.settings import ModelsSettings, Settings, SettingsError, UpstreamEntry, load_settings, notes
from tests.test_settings import run_cli


@dataclass(frozen=True)
class Up:
    name: str
    models: tuple[str, ...]
    images: bool = False


DEEPSEEK = Up("deepseek", ("deepseek-chat", "deepseek-reasoner", "shared"))
OPENAI = Up("openai", ("gpt-4o-mini", "shared", "gpt-image-1", "dall-e-2"), images=True)
OTHER = Up("other", ("shared", "gpt-image-1"), images=True)


def table(*upstreams: Up, default: str = "deepseek-chat", aliases: dict[str, str] | None = None,
          image: str = "") -> RouteTable[Up]:
    return RouteTable(upstreams or (DEEPSEEK, OPENAI), default, aliases or {}, image)


# --- routing ------------------------------------------------------------------------------------------------

def test_a_model_is_served_by_its_upstreams_in_the_configured_order() -> None:
    routes = table(DEEPSEEK, OPENAI, OTHER)
    assert routes.serving("deepseek-chat") == [DEEPSEEK]
    assert routes.serving("shared") == [DEEPSEEK, OPENAI, OTHER]
    assert routes.serving("gpt-image-1") == [OPENAI, OTHER]
    assert routes.serving("gpt-4") == []


def test_aliases_resolve_to_the_model_upstreams_are_asked_for_even_through_a_chain() -> None:
    routes = table(aliases={"gpt-3.5-turbo": "chat", "chat": "deepseek-chat"})
    assert routes.resolve("gpt-3.5-turbo") == routes.resolve("chat") == "deepseek-chat"
    assert routes.resolve("deepseek-chat") == "deepseek-chat"
    assert routes.resolve("unknown") == "unknown"
    assert routes.serving("gpt-3.5-turbo") == [DEEPSEEK]
    assert routes.offers("gpt-3.5-turbo") and routes.offers("gpt-4o-mini") and not routes.offers("gpt-4")


def test_every_model_and_alias_is_offered_once_served_models_first() -> None:
    routes = table(DEEPSEEK, OPENAI, aliases={"gpt-3.5-turbo": "deepseek-chat"})
    assert routes.offered() == ["deepseek-chat", "deepseek-reasoner", "shared", "gpt-4o-mini", "gpt-image-1",
                                "dall-e-2", "gpt-3.5-turbo"]


def test_pictures_go_to_upstreams_that_draw_the_image_model() -> None:
    assert table(DEEPSEEK, OPENAI, OTHER, image="gpt-image-1").drawing() == [OPENAI, OTHER]
    assert table(DEEPSEEK, OPENAI, OTHER, image="dall-e-2").drawing() == [OPENAI]
    assert table(DEEPSEEK, OTHER, OPENAI).drawing() == [OTHER, OPENAI]  # no image model: any that draws
    assert table(DEEPSEEK, Up("x", ("gpt-image-1",))).drawing() == []


def test_a_callers_own_key_goes_to_the_first_upstream_serving_the_model_else_the_first() -> None:
    routes = table(DEEPSEEK, OPENAI, aliases={"gpt-3.5-turbo": "deepseek-chat"})
    assert routes.for_own_key("gpt-4o-mini") is OPENAI
    assert routes.for_own_key("shared") is DEEPSEEK
    assert routes.for_own_key("gpt-3.5-turbo") is DEEPSEEK
    assert routes.for_own_key("claude-3") is DEEPSEEK


# --- contradictions ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"aliases": {"a": "b", "b": "a"}}, "setting models.aliases.a: the aliases loop: a -> b -> a"),
    ({"aliases": {"a": "a"}}, "setting models.aliases.a: the aliases loop: a -> a"),
    ({"aliases": {"gpt-3.5-turbo": "gpt-4"}},
     "setting models.aliases.gpt-3.5-turbo: gpt-4 is served by no upstream (deepseek serves deepseek-chat, "
     "deepseek-reasoner, shared; openai serves gpt-4o-mini, shared, gpt-image-1, dall-e-2)"),
    ({"aliases": {"shared": "deepseek-chat"}},
     "setting models.aliases.shared: upstream deepseek serves shared itself; an alias cannot hide it"),
    ({"default": "gpt-4"}, "setting models.default: gpt-4 is served by no upstream (deepseek serves "
     "deepseek-chat, deepseek-reasoner, shared; openai serves gpt-4o-mini, shared, gpt-image-1, dall-e-2)"),
    ({"image": "deepseek-chat"}, "setting models.image: deepseek-chat is served by no upstream with images: true "
     "(openai serves gpt-4o-mini, shared, gpt-image-1, dall-e-2)"),
])
def test_a_contradiction_is_one_line_naming_the_setting(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(RouteError) as caught:
        table(**kwargs)
    assert str(caught.value) == message


def test_two_upstreams_of_one_name_or_one_without_models_are_refused() -> None:
    with pytest.raises(RouteError, match="^setting upstreams: two upstreams are named deepseek$"):
        table(DEEPSEEK, Up("deepseek", ("x",)))
    with pytest.raises(RouteError, match="^setting upstreams: upstream empty lists no models$"):
        table(DEEPSEEK, Up("empty", ()))


# --- the settings file -----------------------------------------------------------------------------------------

def two_upstreams(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "upstreams": [
            {"name": "deepseek", "base_url": "https://api.deepseek.com/v1", "api_keys_env": "DEEPSEEK_API_KEY",
             "models": ["deepseek-chat"]},
            {"name": "pictures", "base_url": "https://api.openai.com/v1", "api_keys_env": "OPENAI_API_KEY",
             "models": ["gpt-4o-mini", "gpt-image-1"], "images": True},
        ],
        "models": {"default": "deepseek-chat", "aliases": {"gpt-3.5-turbo": "deepseek-chat"}, "image": "gpt-image-1"},
    }
    raw.update(changes)
    return raw


def write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


def test_api_keys_env_fills_each_pool_from_its_variable_and_an_unset_one_is_a_warning(tmp_path: Path) -> None:
    env = {"DEEPSEEK_API_KEY": "sk-deep-aaaa1111, sk-deep-bbbb2222", "OPENAI_BASE_URL": "http://ignored"}
    settings = load_settings(write(tmp_path, two_upstreams()), env=env)
    assert [e.api_keys for e in settings.upstreams] == [("sk-deep-aaaa1111", "sk-deep-bbbb2222"), ()]
    assert settings.pool_provider == "openai"
    assert notes(settings, env) == [
        "upstream pictures: OPENAI_API_KEY is not set, so its key pool is empty (callers' own keys still reach it)",
        "no upstream that draws pictures has a key: pictures on the server's keys will be refused",
        "OPENAI_BASE_URL is ignored: the settings list their upstreams (upstreams:), each with its base_url",
    ]


def test_a_settings_object_built_directly_is_checked_too() -> None:
    entry = UpstreamEntry("a", "https://a.example/v1", models=("m",))
    assert Settings(upstreams=(entry,)).default_model == "m"
    with pytest.raises(SettingsError, match="^setting models.default: x is served by no upstream"):
        Settings(upstreams=(entry,), models=ModelsSettings(default="x"))


@pytest.mark.parametrize(("change", "message"), [
    ({"models": {"aliases": {"a": "b", "b": "a"}}}, "setting models.aliases.a: the aliases loop: a -> b -> a"),
    ({"models": {"aliases": {"gpt-3.5-turbo": "gpt-4"}}},
     "setting models.aliases.gpt-3.5-turbo: gpt-4 is served by no upstream (deepseek serves deepseek-chat; "
     "pictures serves gpt-4o-mini, gpt-image-1)"),
    ({"models": {"default": "gpt-4"}}, "setting models.default: gpt-4 is served by no upstream (deepseek serves "
     "deepseek-chat; pictures serves gpt-4o-mini, gpt-image-1)"),
    ({"models": {"image": "dall-e-3"}}, "setting models.image: dall-e-3 is served by no upstream with images: true "
     "(pictures serves gpt-4o-mini, gpt-image-1)"),
    ({"upstream": {"base_url": "https://x.example/v1"}},
     "setting upstream.base_url: not used with upstreams: (set base_url on each upstream, or drop upstreams:)"),
    ({"upstream": {"models": ["x"]}},
     "setting upstream.models: not used with upstreams: (set models on each upstream, or drop upstreams:)"),
    ({"upstreams": [{"name": "a", "base_url": "https://a/v1", "models": ["m"]},
                    {"name": "a", "base_url": "https://b/v1", "models": ["m"]}]},
     "setting upstreams: two upstreams are named a"),
    ({"upstreams": [{"name": "a", "base_url": "https://a/v1", "models": ["m"], "api_keys": ["k"],
                     "api_keys_env": "K"}]},
     "setting upstreams[0].api_keys_env: give api_keys or api_keys_env, not both"),
    ({"upstreams": [{"name": "a b", "base_url": "https://a/v1", "models": ["m"]}]},
     "setting upstreams[0].name: expected letters, digits, '.', '_' or '-', got 'a b'"),
    ({"upstreams": [{"name": "a", "base_url": "ftp://a", "models": ["m"]}]},
     "setting upstreams[0].base_url: expected an http:// or https:// URL"),
    ({"upstreams": [{"name": "a", "base_url": "https://a/v1", "models": ["m"], "api_keys_env": "A-B"}]},
     "setting upstreams[0].api_keys_env: 'A-B' is not a variable name"),
    ({"upstreams": [{"name": "a", "base_url": "https://a/v1", "models": ["m"], "bogus": 1}]},
     "setting upstreams[0].bogus: unknown key"),
    ({"upstreams": [{"name": "a", "base_url": "https://a/v1", "models": "m"}]},
     "setting upstreams[0].models: expected a list of strings, got 'm'"),
    ({"upstreams": {"name": "a"}}, "setting upstreams: expected a list of mappings, got {'name': 'a'}"),
    ({"upstreams": ["a"]}, "setting upstreams[0]: expected a mapping, got 'a'"),
    ({"models": {"aliases": ["a"]}}, "setting models.aliases: expected a mapping of names to names, got ['a']"),
])
def test_a_contradiction_in_the_file_stops_loading_with_one_line_naming_it(
        tmp_path: Path, change: dict[str, Any], message: str) -> None:
    raw = two_upstreams()
    for section, value in change.items():
        raw[section] = {**raw.get(section, {}), **value} if isinstance(value, dict) and section != "upstreams" else value
    with pytest.raises(SettingsError) as caught:
        load_settings(write(tmp_path, raw), env={})
    assert str(caught.value) == message


def test_the_shorthand_with_openai_env_is_one_upstream_named_default(tmp_path: Path) -> None:
    path = write(tmp_path, {"upstream": {"model": "gpt-4o", "models": ["gpt-4o-mini"]},
                            "models": {"aliases": {"gpt-3.5-turbo": "gpt-4o-mini"}}})
    settings = load_settings(path, env={"OPENAI_API_KEY": "sk-a-11112222,sk-b-33334444",
                                        "OPENAI_BASE_URL": "http://127.0.0.1:1/v1"})
    assert settings.upstream_entries == (UpstreamEntry(
        "default", "http://127.0.0.1:1/v1", ("sk-a-11112222", "sk-b-33334444"), "", ("gpt-4o-mini", "gpt-4o"),
        images=True),)
    assert settings.default_model == "gpt-4o"
    assert settings.routes().resolve("gpt-3.5-turbo") == "gpt-4o-mini"
    assert notes(settings, {"OPENAI_API_KEY": "x"}) == []


def test_an_alias_loop_stops_the_start_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, two_upstreams(models={"aliases": {"gpt-3.5-turbo": "chat", "chat": "gpt-3.5-turbo"}}))
    result = run_cli("--check", "--config", str(path))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        "chatgpt-api: setting models.aliases.gpt-3.5-turbo: the aliases loop: gpt-3.5-turbo -> chat -> gpt-3.5-turbo"]


def test_a_model_no_upstream_serves_stops_the_start_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, two_upstreams(models={"default": "deepseek-chat", "aliases": {"gpt-3.5-turbo": "gpt-4"}}))
    result = run_cli("--config", str(path))  # not --check: the server itself refuses to start
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        "chatgpt-api: setting models.aliases.gpt-3.5-turbo: gpt-4 is served by no upstream "
        "(deepseek serves deepseek-chat; pictures serves gpt-4o-mini, gpt-image-1)"]
