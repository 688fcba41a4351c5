"""A real `redis-server` for the tests: a child process on a free loopback port, its files in a temp
folder, no persistence (a restart is an empty Redis). Without redis-server the test skips naming the
Debian package (fails under CHATGPT_API_REQUIRE_ALL=1)."""
from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers.programs import require_program

START_SECONDS = 10.0


def free_port() -> int:
    """A loopback TCP port nothing listens on right now. redis-server can neither pick a port itself
    nor take an inherited socket, so start() retries on another port if this one is taken meanwhile."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """One redis-server, without persistence: a restart is an empty Redis."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.binary = require_program("redis-server", "redis-server")
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log = folder / "redis.log"

    @property
    def url(self) -> str:
        """The URL the app is configured with."""
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, port: int | None = None) -> None:
        """Start on `port` (the same one again for a restart) or a free one, retrying on a collision."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            self.port = port or free_port()
            self.process = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                 "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", str(self.log)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            if await self._answers():
                return
            self.stop()
            if port is not None:
                break  # asked for this port: another try will not free it
        pytest.fail(f"redis-server did not start:\n{self.log.read_text(errors='replace') if self.log.exists() else ''}")

    async def _answers(self) -> bool:
        """True once PING gets +PONG; False if the process exits first (e.g. the port was taken)."""
        assert self.process is not None
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            try:
                writer.write(b"PING\r\n")
                if (await reader.readline()).startswith(b"+PONG"):
                    return True
            except OSError:
                pass
            finally:
                writer.close()
            await asyncio.sleep(0.02)
        return False

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL) and wait, so the port is free for a restart."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A running redis-server (no persistence), stopped after the test. Import it into a test module."""
    server = RedisServer(tmp_path / "redis")
    await server.start()
    yield server
    server.stop()
