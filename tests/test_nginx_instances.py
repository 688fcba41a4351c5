"""Two instances on one Redis behind a real nginx configured with the shipped deploy/nginx-instances.conf:
each client address reaches one instance (so it meets one per-address limiter), and a stopped instance's
clients are answered by the other."""
from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import MakeClient
from tests.helpers.redisd import RedisServer
from tests.test_nginx import PROXY_CONF, Nginx, nginx, upgrade_map  # noqa: F401 (a fixture)

INSTANCES_CONF = Path(__file__).resolve().parent.parent / "deploy" / "nginx-instances.conf"
ADDRESSES = [f"127.0.0.{n}" for n in range(2, 18)]  # client source addresses, all on loopback


def instances_upstream(ports: list[int]) -> str:
    """The shipped upstream block with its `server` lines pointed at the test's instances."""
    text = INSTANCES_CONF.read_text(encoding="utf-8")
    found = re.search(r"^upstream chatgpt_api \{.*?^\}", text, re.M | re.S)
    assert found, f"{INSTANCES_CONF} has no `upstream chatgpt_api` block"
    block = found.group(0)
    assert "hash $binary_remote_addr consistent;" in block
    servers = re.findall(r"^\s*server 127\.0\.0\.1:\d+(.*);$", block, re.M)
    assert len(servers) == len(ports) == 2
    for port, options in zip(ports, servers, strict=True):
        block = re.sub(r"^(\s*)server 127\.0\.0\.1:\d+" + re.escape(options) + ";$",
                       rf"\g<1>server 127.0.0.1:{port}{options}; # test", block, count=1, flags=re.M)
    return block


@pytest.fixture
async def redis_url(tmp_path: Path) -> AsyncIterator[str]:
    """A running redis-server's URL."""
    server = RedisServer(tmp_path / "redis")
    await server.start()
    yield server.url
    server.stop()


async def get_status(address: str, url: str) -> int:
    """`//status` from one source address; the envelope's code as a number (0 answered, 700001 too fast)."""
    connector = aiohttp.TCPConnector(local_addr=(address, 0), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(url) as response:
            assert response.status == 200
            return int((await response.json())["status"])


def routes(access_log: Path) -> dict[str, set[str]]:
    """Which instances (upstream addresses) nginx sent each client address to."""
    seen: dict[str, set[str]] = {}
    for line in access_log.read_text(encoding="utf-8").splitlines():
        client, upstream = line.split()[:2]
        seen.setdefault(client, set()).add(upstream)
    return seen


async def test_each_client_address_meets_one_instance_and_a_stopped_instance_is_covered(
        make_client: MakeClient, nginx: Nginx, redis_url: str, tmp_path: Path) -> None:  # noqa: F811
    settings = {"state": {"redis_url": redis_url}, "limits": {"http_per_second": 2}}
    clients: list[TestClient] = [await make_client(**settings), await make_client(**settings)]
    port = nginx.port()
    log = tmp_path / "routes.log"
    await nginx.start(f"""
    {upgrade_map()}
    {instances_upstream([c.port for c in clients])}
    log_format routed '$remote_addr $upstream_addr $status';
    server {{
        listen 127.0.0.1:{port};
        merge_slashes off;
        access_log "{log}" routed;
        location / {{ include "{PROXY_CONF}"; }}
    }}""")
    base = f"http://127.0.0.1:{port}"

    # Eight quick requests from one address: one instance, one limiter of 2 per second. (Spread over
    # both instances, each would let 2 through.)
    codes = [await get_status("127.0.0.2", f"{base}//status") for _ in range(8)]
    assert codes.count(0) <= 3 and codes.count(700001) >= 5, codes

    for address in ADDRESSES:
        await get_status(address, f"{base}//status")
    seen = routes(log)
    assert all(len(instances) == 1 for instances in seen.values()), seen
    assert len(set().union(*seen.values())) == 2, "every address went to the same instance"

    await clients[0].close()  # one instance stops (a restart): its addresses are answered by the other
    for address in ADDRESSES:
        assert await get_status(address, f"{base}//demoChatList") in (0, 700001)
