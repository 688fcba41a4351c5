"""The layout of DESIGN.md holds: the domain imports no aiohttp and none of the server, faces or upstream."""
from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import chatgpt.domain

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("aiohttp", "aiohttp_sse_client", "chatgpt.server", "chatgpt.faces", "chatgpt.upstream", "chatgpt.keys",
             "prometheus_client", "yarl", "multidict")

# Run in a fresh interpreter: this test process has long imported aiohttp for the other tests.
PROBE = """
import importlib, json, pkgutil, sys
import chatgpt.domain
names = sorted("chatgpt.domain." + m.name for m in pkgutil.iter_modules(chatgpt.domain.__path__))
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "loaded": sorted(sys.modules)}))
"""


def test_every_domain_module_imports_without_aiohttp_the_server_faces_or_upstream() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    expected = sorted("chatgpt.domain." + m.name for m in pkgutil.iter_modules(chatgpt.domain.__path__))
    assert report["modules"] == expected and "chatgpt.domain.pipeline" in expected
    leaked = [m for m in report["loaded"] if m.split(".")[0] in FORBIDDEN or m.startswith(FORBIDDEN)]
    assert leaked == [], f"the domain pulled in {leaked[:10]}"


# The whole app built without Redis configured, in a fresh interpreter.
APP_PROBE = """
import json, sys
import app
from chatgpt.settings import Settings
app.create_app(Settings())
print(json.dumps(sorted(m for m in sys.modules if m == "redis" or m.startswith("redis."))))
"""


def test_a_server_without_redis_configured_never_loads_redis_py() -> None:
    # redis-py is ~8 MB of a process's memory: only an instance with state.redis_url pays for it.
    result = subprocess.run([sys.executable, "-c", APP_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
