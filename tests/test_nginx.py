"""A real nginx in front of the app, configured with the shipped deploy/ files (issue 5).

Websockets, incremental streams and the client IP must survive the proxy. nginx runs on loopback
as a child of the test (one process, `master_process off`), with every path it writes in tmp_path.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import MakeClient, url
from tests.fake_openai import FakeOpenAI, Stream

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROXY_CONF = DEPLOY / "nginx-proxy.conf"
SITE_CONF = DEPLOY / "nginx-site.conf"
ADMIN_TOKEN = "adm-test-token-nginx"
SITE_NAME = "chat.example.com"
START_SECONDS = 10.0

StartNginx = Callable[[str, Sequence[int]], Awaitable[None]]


def nginx_binary() -> str:
    """The nginx executable; a missing nginx fails the test (CI installs it), it does not skip."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.fail("nginx is not installed: these tests drive a real nginx in front of the app. "
                    "Install Debian's package (apt-get install nginx), as .ci/run does.", pytrace=False)
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def upgrade_map() -> str:
    """The `map $http_upgrade $connection_upgrade` block exactly as the shipped site defines it."""
    found = re.search(r"^map \$http_upgrade \$connection_upgrade \{.*?^\}", SITE_CONF.read_text(), re.M | re.S)
    assert found, f"{SITE_CONF} has no `map $http_upgrade $connection_upgrade` block"
    return found.group(0)


def proxy_server(nginx_port: int, app_port: int, proxy_conf: Path = PROXY_CONF) -> str:
    """Plain-HTTP server block in front of the app, including the shipped proxy directives."""
    return f"""
    {upgrade_map()}
    upstream chatgpt_api {{ server 127.0.0.1:{app_port}; }}
    server {{
        listen 127.0.0.1:{nginx_port};
        merge_slashes off;
        location / {{ include "{proxy_conf}"; }}
    }}"""


def nginx_conf(prefix: Path, http_body: str) -> str:
    """A whole nginx.conf for one foreground process whose files all live under `prefix`."""
    temp = "\n".join(f'    {kind}_temp_path "{prefix / kind}";'
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""
daemon off;
master_process off;
worker_processes 1;
pid "{prefix / 'nginx.pid'}";
error_log "{prefix / 'error.log'}" info;
events {{ worker_connections 128; }}
http {{
    access_log "{prefix / 'access.log'}";
    # Compressing streams too, as a site gzipping everything would: a stream that nginx buffers
    # then reaches the client in one lump at the end, so buffering cannot go unnoticed.
    gzip on;
    gzip_types text/event-stream;
    gzip_min_length 0;
    gzip_proxied any;
{temp}
{http_body}
}}
"""


async def wait_listening(ports: Sequence[int], process: subprocess.Popen[bytes], error_log: Path) -> None:
    """Return once every port accepts connections; fail with nginx's log if it exits or stalls."""
    deadline = time.monotonic() + START_SECONDS
    pending = list(ports)
    while pending:
        if process.poll() is not None:
            pytest.fail(f"nginx exited with {process.returncode}:\n{error_log.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            pytest.fail(f"nginx did not listen on {pending} within {START_SECONDS} s:\n"
                        f"{error_log.read_text(errors='replace')}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", pending[0])
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        pending.pop(0)


@pytest.fixture
async def start_nginx(tmp_path: Path) -> AsyncIterator[StartNginx]:
    """Start nginx with an http-context body; stopped (and reaped) when the test ends."""
    binary = nginx_binary()
    processes: list[subprocess.Popen[bytes]] = []

    async def start(http_body: str, ports: Sequence[int]) -> None:
        prefix = tmp_path / f"nginx-{len(processes)}"
        prefix.mkdir()
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_conf(prefix, http_body), encoding="utf-8")
        error_log = prefix / "error.log"
        # -e: the log used before the config is read, so nothing is written outside tmp_path.
        process = subprocess.Popen([binary, "-p", str(prefix), "-c", str(conf), "-e", str(error_log)],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(process)
        await wait_listening(ports, process, error_log)

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def behind_nginx(make_client: MakeClient, start_nginx: StartNginx, **overrides: Any) -> tuple[TestClient, str]:
    """The app (with settings overrides) and the base URL of an nginx in front of it."""
    client = await make_client(**overrides)
    port = free_port()
    await start_nginx(proxy_server(port, client.port), [port])
    return client, f"http://127.0.0.1:{port}"


def question(conversation_id: str) -> dict[str, Any]:
    """An anonymous chat question as the mini-program sends it."""
    return {"conversationId": conversation_id, "id": "u-1", "parentId": 1, "authType": "api",
            "authValue": "Bearer ", "isDemo": True, "content": "", "isGenImg": False, "isSender": False,
            "messages": [{"role": "user", "content": "你好", "html": "<p>你好</p>", "isSend": True}]}


async def converse(session: aiohttp.ClientSession, ws_url: str, **kwargs: Any) -> tuple[dict[str, Any], list[Any]]:
    """Over one socket: a heartbeat, then a question; return the pong and the answer's frames
    (without `createTime`, which depends on the second they were sent)."""
    async with session.ws_connect(ws_url, **kwargs) as ws:
        await ws.send_json({"heart": "ping"})
        pong = await asyncio.wait_for(ws.receive_json(), 5)
        await ws.send_json(question("c-nginx"))
        frames: list[dict[str, Any]] = []
        while not (frames and frames[-1]["isDone"]):
            frames.append(await asyncio.wait_for(ws.receive_json(), 5))
        # The socket outlives the answer: a second heartbeat still gets its pong.
        await ws.send_json({"heart": "ping"})
        assert (await asyncio.wait_for(ws.receive_json(), 5))["heart"] == "pong"
    for frame in frames:
        frame.pop("createTime")
    return pong, frames


async def test_websocket_through_nginx_gets_the_same_frames_as_the_app_itself(
        make_client: MakeClient, fake: FakeOpenAI, start_nginx: StartNginx) -> None:
    client, base = await behind_nginx(make_client, start_nginx)
    fake.default = Stream(delay=0.02)
    _, direct = await converse(client.session, url(client, "//websocket"))
    pong, proxied = await converse(client.session, f"{base}//websocket")
    assert pong["heart"] == "pong" and isinstance(pong["time"], int)
    assert proxied == direct
    assert [f["content"] for f in proxied] == ["Hello", "Hello, ", "Hello, **world**", "Hello, **world**!", "DONE"]
    assert len(fake.chat_requests()) == 2


async def test_double_slash_routes_of_the_mini_program_pass_through_nginx(
        make_client: MakeClient, start_nginx: StartNginx) -> None:
    client, base = await behind_nginx(make_client, start_nginx)
    async with client.session.get(f"{base}//status") as response:
        assert response.status == 200
        body = await response.json()
    assert (body["status"], body["msg"], body["state"]) == ("000000", "SUCCESS", True)


async def sse_arrivals(session: aiohttp.ClientSession, base: str) -> list[tuple[float, str]]:
    """POST a streamed completion; return (arrival time, text) of each content chunk as read."""
    body = {"model": "gpt-3.5-turbo", "stream": True, "messages": [{"role": "user", "content": "Count"}]}
    arrivals: list[tuple[float, str]] = []
    async with session.post(f"{base}/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "text/event-stream"
        async for line in response.content:  # one line at a time, as the bytes arrive
            if not line.startswith(b"data: {"):
                continue
            delta = json.loads(line.removeprefix(b"data: "))["choices"][0]["delta"]
            if delta.get("content"):
                arrivals.append((time.monotonic(), delta["content"]))
    return arrivals


def buffering_defaults_server(nginx_port: int) -> str:
    """A site that forgot `proxy_buffering off` (nginx buffers by default): only the app's
    `X-Accel-Buffering: no` can keep its streams incremental."""
    return f"""
    server {{
        listen 127.0.0.1:{nginx_port};
        location / {{ proxy_pass http://chatgpt_api; proxy_http_version 1.1; }}
    }}"""


@pytest.mark.parametrize("site", ["shipped proxy conf", "nginx buffering defaults"])
async def test_streamed_v1_answer_arrives_through_nginx_piece_by_piece(
        make_client: MakeClient, fake: FakeOpenAI, start_nginx: StartNginx, site: str) -> None:
    client = await make_client()
    shipped, defaults = free_port(), free_port()
    await start_nginx(proxy_server(shipped, client.port) + buffering_defaults_server(defaults), [shipped, defaults])
    base = f"http://127.0.0.1:{shipped if site == 'shipped proxy conf' else defaults}"
    pieces = [f"piece {n}. " for n in range(10)]
    fake.script.append(Stream(pieces=pieces, delay=0.1))

    arrivals = await sse_arrivals(client.session, base)

    assert "".join(text for _, text in arrivals) == "".join(pieces)
    first, last = arrivals[0][0], arrivals[-1][0]
    assert last - first >= 0.6, f"10 pieces paced 0.1 s apart arrived within {last - first:.3f} s"
    early = [t for t, _ in arrivals if last - t > 0.05]
    assert len(early) >= 8, f"only {len(early)} of 10 chunks arrived before the last 50 ms: buffered"


async def test_streams_tell_nginx_not_to_buffer_them(client: TestClient) -> None:
    body = {"model": "gpt-3.5-turbo", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    async with client.post("/v1/chat/completions", json=body) as response:
        await response.read()
    # nginx consumes X-Accel-* headers, so this is read from the app directly.
    assert response.headers["X-Accel-Buffering"] == "no"


async def reset_quota(client: TestClient, identity: str) -> dict[str, Any]:
    """Ask the app itself (not through nginx) to reset the quota of `identity`."""
    async with client.post("/admin/quota/reset", json={"identity": identity},
                           headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as response:
        assert response.status == 200, await response.text()
        result: dict[str, Any] = await response.json()
        return result


async def test_app_counts_the_address_nginx_saw_and_spoofed_forwarding_headers_change_nothing(
        make_client: MakeClient, fake: FakeOpenAI, start_nginx: StartNginx) -> None:
    client, base = await behind_nginx(make_client, start_nginx, quota={"daily_questions": 5},
                                      admin={"token": ADMIN_TOKEN})
    body = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Who am I?"}]}
    spoofed = {"X-Forwarded-For": "9.9.9.9", "X-Real-IP": "8.8.8.8"}
    # Any 127.x.y.z is this machine: nginx sees the client at 127.0.0.2 and the app sees nginx at 127.0.0.1.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as outside:
        async with outside.post(f"{base}/v1/chat/completions", json=body, headers=spoofed) as response:
            assert response.status == 200, await response.text()
            answer = await response.json()
    assert answer["choices"][0]["message"]["content"] == "Hello, **world**!"

    for identity in ("9.9.9.9", "8.8.8.8", "127.0.0.1"):
        assert (await reset_quota(client, identity))["reset"] == 0, identity
    assert await reset_quota(client, "127.0.0.2") == {"reset": 1, "identity": "127.0.0.2"}


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A throwaway certificate for SITE_NAME made with the openssl command; (cert, key)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed: the TLS site test makes its certificate with it "
                    "(apt-get install openssl, as .ci/run does).", pytrace=False)
    cert, key = folder / "fullchain.pem", folder / "privkey.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", f"/CN={SITE_NAME}", "-addext", f"subjectAltName=DNS:{SITE_NAME}",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=30)
    return cert, key


def shipped_site_on(http_port: int, https_port: int, app_port: int, cert: Path, key: Path) -> str:
    """deploy/nginx-site.conf with only its ports, certificate and include path moved to the test's."""
    site = SITE_CONF.read_text()
    edits = [
        (r"^\s*listen \[::\]:(80|443)( ssl)?;\n", ""),  # the test machine may have no IPv6
        (r"listen 80;", f"listen 127.0.0.1:{http_port};"),
        (r"listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;"),
        (r"server 127\.0\.0\.1:8080;", f"server 127.0.0.1:{app_port};"),
        (r"include snippets/chatgpt-api-proxy\.conf;", f'include "{PROXY_CONF}";'),
        (r"ssl_certificate +/etc/letsencrypt/live/chat\.example\.com/fullchain\.pem;", f'ssl_certificate "{cert}";'),
        (r"ssl_certificate_key +/etc/letsencrypt/live/chat\.example\.com/privkey\.pem;",
         f'ssl_certificate_key "{key}";'),
    ]
    for pattern, replacement in edits:
        site, count = re.subn(pattern, replacement, site, flags=re.M)
        assert count >= 1, f"{SITE_CONF} no longer has {pattern!r}; update this test with it"
    return site


async def test_shipped_site_redirects_http_and_serves_the_app_over_https_and_wss(
        make_client: MakeClient, fake: FakeOpenAI, start_nginx: StartNginx, tmp_path: Path) -> None:
    client = await make_client()
    http_port, https_port = free_port(), free_port()
    cert, key = self_signed_certificate(tmp_path)
    await start_nginx(shipped_site_on(http_port, https_port, client.port, cert, key), [http_port, https_port])
    trust = ssl.create_default_context(cafile=str(cert))
    async with aiohttp.ClientSession() as phone:
        async with phone.get(f"http://127.0.0.1:{http_port}//status", allow_redirects=False,
                             headers={"Host": SITE_NAME}) as response:
            assert response.status == 301
            assert response.headers["Location"] == f"https://{SITE_NAME}//status"
        async with phone.get(f"https://127.0.0.1:{https_port}//status", ssl=trust,
                             server_hostname=SITE_NAME) as response:
            assert (await response.json())["state"] is True
        pong, frames = await converse(phone, f"https://127.0.0.1:{https_port}//websocket", ssl=trust,
                                      server_hostname=SITE_NAME)
    assert pong["heart"] == "pong"
    assert [f["content"] for f in frames][-2:] == ["Hello, **world**!", "DONE"]
