"""The `wechat:` and `moderation:` settings (PROTOCOL.md E.5): defaults, checks naming the key, env secret."""
from __future__ import annotations

from pathlib import Path

import pytest

from chatgpt.settings import ModerationSettings, Settings, SettingsError, WechatSettings, load_settings


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Settings:
    path = tmp_path / "settings.yaml"
    path.write_text(text, encoding="utf-8")
    return load_settings(path, env=env or {})


def error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(SettingsError) as caught:
        load(tmp_path, text, env)
    return str(caught.value)


def test_the_defaults_leave_wechat_login_off_and_mask_listed_words() -> None:
    settings = Settings()
    assert settings.wechat == WechatSettings(appid="", secret="", api_base="https://api.weixin.qq.com",
                                             session_days=30, msg_sec_check=False, fail_open=True,
                                             token_secret="")
    assert settings.moderation == ModerationSettings(words_file="", action="mask")


def test_the_app_secret_comes_from_the_environment_and_wins(tmp_path: Path) -> None:
    settings = load(tmp_path, "wechat:\n  appid: wx123\n  secret: from-file\n",
                    env={"WECHAT_APP_SECRET": " from-env "})
    assert (settings.wechat.appid, settings.wechat.secret) == ("wx123", "from-env")


def test_secrets_are_not_in_the_settings_repr() -> None:
    shown = repr(WechatSettings(appid="wx123", secret="app-secret-value", token_secret="t" * 20))
    assert "wx123" in shown and "app-secret-value" not in shown and "t" * 20 not in shown


@pytest.mark.parametrize(("text", "env", "message"), [
    ("wechat:\n  api_base: ftp://x\n", {}, "setting wechat.api_base: expected an http:// or https:// URL"),
    ("wechat:\n  session_days: 0\n", {}, "setting wechat.session_days: expected 1..365"),
    ("wechat:\n  session_days: 30.5\n", {}, "setting wechat.session_days: expected an integer, got 30.5"),
    ("wechat:\n  appid: wx123\n", {},
     "setting wechat.secret: needed when wechat.appid is set (or set WECHAT_APP_SECRET)"),
    ("", {"WECHAT_APP_SECRET": "s"}, "setting wechat.appid: needed when wechat.secret (or WECHAT_APP_SECRET) is set"),
    ("wechat:\n  msg_sec_check: true\n", {}, "setting wechat.msg_sec_check: needs wechat.appid and wechat.secret"),
    ("wechat:\n  token_secret: short\n", {}, "setting wechat.token_secret: expected 16 characters or more"),
    ("wechat:\n  fail_open: maybe\n", {}, "setting wechat.fail_open: expected true or false, got 'maybe'"),
    ("moderation:\n  action: delete\n", {}, "setting moderation.action: expected mask or refuse"),
    ("moderation:\n  words: x\n", {}, "setting moderation.words: unknown key"),
])
def test_a_wrong_value_is_one_error_naming_the_key(tmp_path: Path, text: str, env: dict[str, str],
                                                   message: str) -> None:
    assert error(tmp_path, text, env) == message
