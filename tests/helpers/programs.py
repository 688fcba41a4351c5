"""Outside programs some tests drive (nginx, Chromium, redis-server): without one the test skips, naming
the Debian package that provides it; with CHATGPT_API_REQUIRE_ALL=1 (set by .ci/run) it fails instead."""
from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

REQUIRE_ALL_ENV = "CHATGPT_API_REQUIRE_ALL"
# Debian installs daemons (nginx) in sbin folders, which an ordinary user's PATH leaves out.
SBIN_FOLDERS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def required_everywhere() -> bool:
    """True when every optional test must run (CI): a missing program or build is a failure."""
    return os.environ.get(REQUIRE_ALL_ENV, "").strip() not in ("", "0")


def unavailable(reason: str) -> NoReturn:
    """Skip the running test for `reason`, or fail it when CHATGPT_API_REQUIRE_ALL=1."""
    if required_everywhere():
        pytest.fail(f"{reason} ({REQUIRE_ALL_ENV}=1: nothing may be skipped)", pytrace=False)
    pytest.skip(reason)


def require_program(name: str, package: str) -> str:
    """The path of the executable `name` (PATH, then the sbin folders); unavailable() without it."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN_FOLDERS])
    found = shutil.which(name, path=search)
    if found is None:
        unavailable(f"needs {name}: install the Debian package `{package}` (apt-get install {package})")
    return found
