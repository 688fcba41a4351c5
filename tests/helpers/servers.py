"""Ports without races: every server a test starts binds port 0 and the test reads the port back.

Picking a free port, closing it and binding it later lets another process take it in between
(seen as `address already in use` on a busy machine). Instead: the app itself is started with
`--port 0` and names the bound port in its start line; programs that cannot report a port (nginx)
are handed a socket already bound and listening."""
from __future__ import annotations

import asyncio
import atexit
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

# app.py's start line: "chatgpt-api starting on http://HOST:PORT; provider: ..." (also inside a JSON log line).
STARTED = re.compile(rb"chatgpt-api starting on http://\S*?:(\d+);")
START_SECONDS = 10.0

_held: list[socket.socket] = []
atexit.register(lambda: [sock.close() for sock in _held])


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    """A socket on a port the OS picked, bound and listening: hand it to the program that serves it."""
    return socket.create_server((host, 0))


def port_of(sock: socket.socket) -> int:
    """The port a socket is bound to."""
    return int(sock.getsockname()[1])


def refusing_port() -> int:
    """A loopback port where connections are refused for the rest of the session: bound (so no other
    process can take it) and never listening."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _held.append(sock)
    return port_of(sock)


async def started_port(process: subprocess.Popen[bytes], log: Path, seconds: float = START_SECONDS) -> int:
    """The port named in the start line of an app started with `--port 0` and logging to `log`;
    fails the test with the log if the process exits or says nothing within `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        found = STARTED.search(log.read_bytes())
        if found:
            return int(found.group(1))
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            pytest.fail(f"no start line within {seconds} s:\n{log.read_text(errors='replace')}")
        await asyncio.sleep(0.02)


async def wait_until_serving(process: subprocess.Popen[bytes], base: str, output: Callable[[], str],
                             seconds: float = START_SECONDS, name: str = "app.py") -> dict[str, Any]:
    """Poll `base//status` until it answers 200 and return its JSON; fail the test (with the process's
    output) if the process (`name`) exits or does not answer within `seconds`."""
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
        while True:
            if process.poll() is not None:
                pytest.fail(f"{name} exited with {process.returncode}:\n{output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"//status did not answer within {seconds} s:\n{output()}")
            try:
                async with http.get(f"{base}//status") as response:
                    if response.status == 200:
                        body: dict[str, Any] = await response.json()
                        return body
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.05)
