"""A real nginx in front of the app, configured with the shipped deploy/ files (issues 5 and 13).

Websockets, incremental streams and the client IP must survive the proxy; the site keeps the admin
API and the metrics inside and caps the websockets one address may hold. nginx runs on loopback as
a child of the test, in the foreground, with every path it writes in tmp_path.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp.test_utils import TestClient

from chatgpt.settings import Settings
from tests.conftest import MakeClient, url
from tests.fakes.openai import FakeOpenAI, Stream
from tests.helpers.programs import require_program
from tests.helpers.servers import listening_socket, port_of

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROXY_CONF = DEPLOY / "nginx-proxy.conf"
SITE_CONF = DEPLOY / "nginx-site.conf"
ADMIN_TOKEN = "adm-test-token-nginx"
SITE_NAME = "chat.example.com"
START_SECONDS = 10.0


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
    """A whole nginx.conf for one foreground nginx whose files all live under `prefix`."""
    temp = "\n".join(f'    {kind}_temp_path "{prefix / kind}";'
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # Run as root (CI), nginx would switch its worker to `nobody`, which cannot enter pytest's
    # private tmp folders; the worker stays the test's user instead.
    user = "user root;" if os.geteuid() == 0 else ""
    return f"""
daemon off;
{user}
worker_processes 1;
pid "{prefix / 'nginx.pid'}";
error_log "{prefix / 'error.log'}" info;
events {{ worker_connections 1024; }}
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


class Nginx:
    """Real nginx processes for one test. Their ports are bound by the test first (port 0, read back)
    and handed to nginx as inherited sockets (the `NGINX` variable of its binary upgrade), so no
    other process can take a port between choosing and binding it."""

    def __init__(self, binary: str, folder: Path) -> None:
        self.binary = binary
        self.folder = folder
        self.pending: list[socket.socket] = []  # bound and listening, for the next start()
        self.processes: list[subprocess.Popen[bytes]] = []

    def port(self) -> int:
        """A loopback port for a `listen 127.0.0.1:PORT` line of the next start()."""
        sock = listening_socket()
        self.pending.append(sock)
        return port_of(sock)

    async def start(self, http_body: str) -> Path:
        """Start nginx with an http-context body listening on the ports from port(); its folder (logs)."""
        prefix = self.folder / f"nginx-{len(self.processes)}"
        prefix.mkdir()
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_conf(prefix, http_body), encoding="utf-8")
        error_log = prefix / "error.log"
        fds = [sock.fileno() for sock in self.pending]
        env = {**os.environ, "NGINX": "".join(f"{fd};" for fd in fds)}
        # -e: the log used before the config is read, so nothing is written outside tmp_path.
        # (`master_process off` would be one process, but nginx 1.22 crashes on inherited sockets then.)
        process = subprocess.Popen([self.binary, "-p", str(prefix), "-c", str(conf), "-e", str(error_log)],
                                   env=env, pass_fds=fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        self.processes.append(process)
        for sock in self.pending:  # nginx holds them now
            sock.close()
        self.pending.clear()
        await self.wait_started(process, error_log)
        return prefix

    @staticmethod
    async def wait_started(process: subprocess.Popen[bytes], error_log: Path) -> None:
        """Return once nginx has started its worker; fail with its log if it exits or stalls."""
        deadline = time.monotonic() + START_SECONDS
        while b"start worker process " not in (error_log.read_bytes() if error_log.exists() else b""):
            if process.poll() is not None:
                pytest.fail(f"nginx exited with {process.returncode}:\n{error_log.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                pytest.fail(f"nginx did not start within {START_SECONDS} s:\n{error_log.read_text(errors='replace')}")
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        """Stop (and reap) every nginx started; close ports never handed over."""
        for sock in self.pending:
            sock.close()
        for process in self.processes:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    """Starts real nginx processes in tmp_path; stopped when the test ends. Without nginx the test
    skips naming the Debian package (fails under CHATGPT_API_REQUIRE_ALL=1)."""
    started = Nginx(require_program("nginx", "nginx"), tmp_path)
    yield started
    started.stop()


async def behind_nginx(make_client: MakeClient, nginx: Nginx, **overrides: Any) -> tuple[TestClient, str]:
    """The app (with settings overrides) and the base URL of an nginx in front of it."""
    client = await make_client(**overrides)
    port = nginx.port()
    await nginx.start(proxy_server(port, client.port))
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
        make_client: MakeClient, fake: FakeOpenAI, nginx: Nginx) -> None:
    client, base = await behind_nginx(make_client, nginx)
    fake.default = Stream(delay=0.02)
    _, direct = await converse(client.session, url(client, "//websocket"))
    pong, proxied = await converse(client.session, f"{base}//websocket")
    assert pong["heart"] == "pong" and isinstance(pong["time"], int)
    def without_id(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in f.items() if k != "id"} for f in frames]

    assert without_id(proxied) == without_id(direct)
    # Each answer has its own server-minted id, the same on all of its text frames (PROTOCOL.md E.1).
    ids = [{f["id"] for f in frames if "id" in f} for frames in (direct, proxied)]
    assert [len(i) for i in ids] == [1, 1] and ids[0] != ids[1]
    assert [f["content"] for f in proxied] == ["Hello", "Hello, ", "Hello, **world**", "Hello, **world**!", "DONE"]
    assert len(fake.chat_requests()) == 2


async def test_double_slash_routes_of_the_mini_program_pass_through_nginx(
        make_client: MakeClient, nginx: Nginx) -> None:
    client, base = await behind_nginx(make_client, nginx)
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
        make_client: MakeClient, fake: FakeOpenAI, nginx: Nginx, site: str) -> None:
    client = await make_client()
    shipped, defaults = nginx.port(), nginx.port()
    await nginx.start(proxy_server(shipped, client.port) + buffering_defaults_server(defaults))
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
        make_client: MakeClient, fake: FakeOpenAI, nginx: Nginx) -> None:
    client, base = await behind_nginx(make_client, nginx, quota={"daily_questions": 5},
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
    openssl = require_program("openssl", "openssl")
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


async def start_shipped_site(nginx: Nginx, client: TestClient, folder: Path) -> tuple[int, int, ssl.SSLContext]:
    """deploy/nginx-site.conf in front of the app on two fresh ports: (http port, https port, a client
    TLS context trusting the site's throwaway certificate)."""
    http_port, https_port = nginx.port(), nginx.port()
    cert, key = self_signed_certificate(folder)
    await nginx.start(shipped_site_on(http_port, https_port, client.port, cert, key))
    return http_port, https_port, ssl.create_default_context(cafile=str(cert))


async def test_shipped_site_redirects_http_and_serves_the_app_over_https_and_wss(
        make_client: MakeClient, fake: FakeOpenAI, nginx: Nginx, tmp_path: Path) -> None:
    client = await make_client()
    http_port, https_port, trust = await start_shipped_site(nginx, client, tmp_path)
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


# Spellings of the two inside paths a client may try; nginx decodes and resolves them before matching.
INSIDE_PATHS = ["/metrics", "//metrics", "/metrics/", "/METRICS", "/%6detrics", "/x/../metrics",
                "/admin/keys", "//admin/keys", "/admin/runtime", "/Admin/keys", "/%61dmin/keys", "/x/../admin/keys",
                "/admin", "/admin/"]


async def test_shipped_site_keeps_the_admin_api_and_the_metrics_inside(
        make_client: MakeClient, nginx: Nginx, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    client = await make_client(admin={"token": ADMIN_TOKEN})
    _, https_port, trust = await start_shipped_site(nginx, client, tmp_path)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    # On the machine itself the app serves both, so a 404 below is nginx's doing.
    for path in ("/metrics", "/admin/keys"):
        async with client.session.get(url(client, path), headers=admin) as response:
            assert response.status == 200, path
    async with aiohttp.ClientSession() as outside:
        for path in INSIDE_PATHS:
            target = yarl.URL(f"https://127.0.0.1:{https_port}{path}", encoded=True)  # sent exactly as written
            async with outside.get(target, headers=admin, ssl=trust, server_hostname=SITE_NAME) as response:
                body = await response.text()
                assert (response.status, response.content_type) == (404, "text/html"), path
                assert "<hr><center>nginx" in body, path
        # Everything else still reaches the app.
        async with outside.get(f"https://127.0.0.1:{https_port}//status", ssl=trust,
                               server_hostname=SITE_NAME) as response:
            assert (await response.json())["state"] is True
    # The app saw only the two direct requests of them: nginx passed none on.
    seen = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert len(seen) == 3 and "status" in seen[2], seen


def site_websocket_limit() -> int:
    """The per-address websocket cap the shipped site sets (`limit_conn chatgpt_api_websockets N;`)."""
    found = re.search(r"^\s*limit_conn chatgpt_api_websockets (\d+);", SITE_CONF.read_text(), re.M)
    assert found, f"{SITE_CONF} has no `limit_conn chatgpt_api_websockets N;`"
    return int(found.group(1))


async def heartbeat(ws: aiohttp.ClientWebSocketResponse) -> None:
    """The socket is open end to end: the app answers a ping through nginx."""
    await ws.send_json({"heart": "ping"})
    assert (await asyncio.wait_for(ws.receive_json(), 5))["heart"] == "pong"


async def test_shipped_site_caps_the_websockets_one_address_holds_and_serves_others(
        make_client: MakeClient, fake: FakeOpenAI, nginx: Nginx, tmp_path: Path) -> None:
    limit = site_websocket_limit()
    client = await make_client()
    _, https_port, trust = await start_shipped_site(nginx, client, tmp_path)
    wss = f"wss://127.0.0.1:{https_port}//websocket"
    tls = {"ssl": trust, "server_hostname": SITE_NAME}
    # Two client addresses: any 127.x.y.z is this machine, and nginx sees each as it is.
    crowd = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0), limit=0))
    neighbour = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.3", 0)))
    async with crowd, neighbour:
        held = [await crowd.ws_connect(wss, **tls) for _ in range(limit)]
        await heartbeat(held[0])
        await heartbeat(held[-1])
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await crowd.ws_connect(wss, **tls)
        assert refused.value.status == 503
        # Another address is served, and so is the crowded one's plain HTTP (only upgrades are counted).
        async with neighbour.ws_connect(wss, **tls) as ws:
            await heartbeat(ws)
        async with crowd.get(f"https://127.0.0.1:{https_port}//status", **tls) as response:
            assert (await response.json())["state"] is True
        for ws in held:
            await ws.close()
        # Its sockets closed, the address gets a whole conversation again.
        pong, frames = await converse(crowd, wss, **tls)
    assert pong["heart"] == "pong" and frames[-1]["content"] == "DONE"
    error_log = (tmp_path / "nginx-0" / "error.log").read_text(errors="replace")
    assert error_log.count('limiting connections by zone "chatgpt_api_websockets", client: 127.0.0.2') == 1


PING_SECONDS = 30  # the mini-program's heartbeat (PROTOCOL.md)
IDLE_SECONDS = Settings().ws.idle_seconds  # the app closes a silent socket itself (PROTOCOL.md E.3)


def test_proxy_timeouts_outlast_the_heartbeat_and_the_apps_own_timeouts_but_not_an_hour() -> None:
    # Waiting 120 s for nginx to cut a silent socket is no test to run each time: the values are read.
    conf = PROXY_CONF.read_text()
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        found = re.search(rf"^{directive} (\d+)s;", conf, re.M)
        assert found, f"{PROXY_CONF} has no `{directive} Ns;`"
        seconds = int(found.group(1))
        assert max(PING_SECONDS, IDLE_SECONDS, Settings().upstream.read_timeout) < seconds <= 300, directive
