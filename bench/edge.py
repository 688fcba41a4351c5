"""Figures of the edge (PROTOCOL.md E.3, issue 13), printed, not asserted:

    python bench/edge.py [--conversations 1000] [--context-chars 12000] [--sockets 80]

1. RSS of the `/chat` memory holding `--conversations` conversations, each at the cap
   (`upstream.context_chars` characters of turns), ASCII and Chinese text, measured in a fresh
   child process each (VmRSS after minus before, after a gc).
2. The worst event-loop stall while that memory (plus quotas and flags) is saved to the state file:
   a probe task wakes every millisecond and records how late it woke, during `StateFile.save()`
   (snapshot on the loop, serialisation and write in a thread) and, for comparison, during one
   `json.dumps` of the same state on the loop (what a save did before).
3. Sockets one address can hold: the real app (defaults: ws.max_sockets_per_ip 50) on loopback, one
   client address opening `--sockets` websockets; how many open, and what the others get.

Everything runs on 127.0.0.1; nothing needs a network.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from app import create_app  # noqa: E402
from chatgpt.domain.memory import ConversationMemory  # noqa: E402
from chatgpt.domain.quota import DailyQuota  # noqa: E402
from chatgpt.server.state import StateFile, StateLock, serialise  # noqa: E402
from chatgpt.settings import Settings, replace_section  # noqa: E402

TURN_CHARS = 600  # a question and its answer: 20 such turns fill the default 12,000-character budget


def rss_kb() -> int:
    """This process's resident size (VmRSS) in KB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fill(memory: ConversationMemory, conversations: int, chars: int, alphabet: str) -> None:
    """`conversations` conversations, each with turns adding up to `chars` characters (the cap)."""
    turns = max(1, chars // TURN_CHARS)
    half = TURN_CHARS // 2
    for c in range(conversations):
        cid = ConversationMemory.new_id()
        owner = f"10.{c // 65536 % 256}.{c // 256 % 256}.{c % 256} anonymous"
        for t in range(turns):
            # Distinct strings (no sharing between turns), as real questions and answers are.
            seed = f"{c}-{t}-"
            question = (seed + alphabet * (half // len(alphabet) + 1))[:half]
            answer = (alphabet * (half // len(alphabet) + 1) + seed)[-half:]
            memory.remember(cid, owner, question, answer)


def memory_of(conversations: int, chars: int, alphabet: str) -> ConversationMemory:
    memory = ConversationMemory(conversations, 10**6, 86400.0, max_chars=chars)
    fill(memory, conversations, chars, alphabet)
    return memory


def child_rss(conversations: int, chars: int, alphabet: str) -> dict[str, Any]:
    """Run in a fresh process: RSS before and after filling the memory."""
    gc.collect()
    before = rss_kb()
    memory = memory_of(conversations, chars, alphabet)
    gc.collect()
    after = rss_kb()
    held = sum(len(q) + len(a) for c in memory.snapshot().values() for q, a in c["turns"])
    return {"conversations": len(memory), "chars_held": held, "rss_before_mb": round(before / 1024, 1),
            "rss_after_mb": round(after / 1024, 1), "rss_growth_mb": round((after - before) / 1024, 1)}


async def worst_stall(work: Any) -> tuple[float, float]:
    """Run `work()` (a coroutine function) with a 1 ms probe; (worst lateness ms, work seconds)."""
    worst = 0.0
    done = False

    async def probe() -> None:
        nonlocal worst
        while not done:
            asked = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - asked - 0.001)

    task = asyncio.create_task(probe())
    await asyncio.sleep(0.05)  # the probe is running
    worst = 0.0
    started = time.perf_counter()
    await work()
    took = time.perf_counter() - started
    await asyncio.sleep(0.01)
    done = True
    await task
    return worst * 1000, took


async def save_stalls(conversations: int, chars: int, folder: Path) -> dict[str, Any]:
    """Worst loop stall during StateFile.save() of a full memory, and during one json.dumps on the loop."""
    memory = memory_of(conversations, chars, "问答abc ")
    quota = DailyQuota(20)
    for n in range(5000):
        quota.take(f"10.0.{n // 256}.{n % 256}")
    path = folder / "state.json"
    lock = StateLock(path)
    lock.acquire()
    state = StateFile(path, {"chat": memory, "quota": quota})
    state.load(lock)
    results: dict[str, Any] = {}
    rounds = []
    for n in range(3):
        memory.remember(memory.new_id(), "10.9.9.9 anonymous", f"change {n}", "so the save writes")
        stall, took = await worst_stall(state.save)
        rounds.append((stall, took))
    idle, _ = await worst_stall(lambda: asyncio.sleep(0.5))
    results["no_save_probe_worst_ms"] = round(idle, 1)  # the probe's own jitter on this machine
    results["save_worst_stall_ms"] = round(max(s for s, _ in rounds), 1)
    results["save_seconds"] = round(max(t for _, t in rounds), 3)
    results["state_file_mb"] = round(path.stat().st_size / 1e6, 1)

    async def on_the_loop() -> None:
        json.dumps({"version": 1, "chat": memory.snapshot(), "quota": quota.snapshot()}, sort_keys=True)

    stall, took = await worst_stall(on_the_loop)
    results["before_one_dumps_on_the_loop_stall_ms"] = round(stall, 1)
    snapshot = {"version": 1, "chat": memory.snapshot(), "quota": quota.snapshot()}
    started = time.perf_counter()
    memory.snapshot()
    results["snapshot_on_the_loop_ms"] = round((time.perf_counter() - started) * 1000, 1)
    assert serialise(snapshot) == json.dumps(snapshot, sort_keys=True)
    lock.release()
    return results


async def sockets_one_address(count: int, folder: Path) -> dict[str, Any]:
    """Open `count` websockets from 127.0.0.1 against the app with default caps."""
    settings = replace_section(Settings(), "state", file=str(folder / "sockets-state.json"))
    settings = replace_section(settings, "images", folder=str(folder / "images"))
    runner = web.AppRunner(create_app(settings), handler_cancellation=True)
    await runner.setup()
    listening = _listening()
    port = listening.getsockname()[1]
    site = web.SockSite(runner, listening)
    await site.start()
    opened: list[aiohttp.ClientWebSocketResponse] = []
    refused: dict[int, int] = {}
    async with aiohttp.ClientSession() as http:
        for _ in range(count):
            try:
                opened.append(await http.ws_connect(f"http://127.0.0.1:{port}/websocket"))
            except aiohttp.WSServerHandshakeError as error:
                refused[error.status] = refused.get(error.status, 0) + 1
        other = await http.ws_connect(f"http://127.0.0.1:{port}/websocket", headers={"X-Real-IP": "203.0.113.9"})
        other_ok = not other.closed
        await other.close()
        for ws in opened:
            await ws.close()
    await runner.cleanup()
    return {"asked": count, "opened": len(opened), "refused_by_status": refused,
            "another_address_still_connects": other_ok,
            "cap": Settings().ws.max_sockets_per_ip}


def _listening() -> socket.socket:
    """A loopback socket on a port the system picks, already listening (no race for the port)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--context-chars", type=int, default=12000)
    parser.add_argument("--sockets", type=int, default=80)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child_rss(args.conversations, args.context_chars, args.child)))
        return
    figures: dict[str, Any] = {"python": sys.version.split()[0]}
    for label, alphabet in (("ascii", "abcdefghij "), ("chinese", "你好世界问答")):
        out = subprocess.run([sys.executable, __file__, "--child", alphabet, "--conversations",
                              str(args.conversations), "--context-chars", str(args.context_chars)],
                             capture_output=True, text=True, check=True)
        figures[f"memory_rss_{label}"] = json.loads(out.stdout)
    with tempfile.TemporaryDirectory() as tmp:
        figures["state_save"] = asyncio.run(save_stalls(args.conversations, args.context_chars, Path(tmp)))
        figures["sockets_one_address"] = asyncio.run(sockets_one_address(args.sockets, Path(tmp)))
    print(json.dumps(figures, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    os.environ.pop("CHATGPT_ADMIN_TOKEN", None)
    main()
