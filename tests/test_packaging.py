"""The installed distribution carries the whole package, the demo page and the console script."""
from __future__ import annotations

from importlib import metadata


def test_the_installed_distribution_holds_every_module_and_the_demo_page() -> None:
    files = {str(f) for f in metadata.files("chatgpt-api") or []}
    for needed in ("app.py", "chatgpt/__init__.py", "chatgpt/domain/pipeline.py", "chatgpt/domain/provider.py",
                   "chatgpt/upstream/openai.py", "chatgpt/faces/ws.py", "chatgpt/server/state.py", "chatgpt/web/index.html"):
        assert needed in files, f"{needed} is missing from the installed package"


def test_the_console_script_points_at_main() -> None:
    scripts = metadata.entry_points(group="console_scripts")
    assert [e.value for e in scripts if e.name == "chatgpt-api"] == ["app:main"]
