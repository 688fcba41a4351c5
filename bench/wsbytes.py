"""What a websocket answer costs its user, printed, not asserted (issue 16 item 3):

    python bench/wsbytes.py [--answers 2000,300,200] [--rate 30] [--stamped] [--ws KEY=VALUE ...]

Each frame of an answer carries the whole text so far (PROTOCOL.md A.3), so without a bound the
bytes of an answer grow with the square of its length. Per answer of N tokens paced at `--rate`
tokens/s (the benchmark's tokens, ~4 characters of Markdown and some Chinese; `--stamped` adds six
digits to each, as the capacity benchmark's timestamps do: ~10 characters): the frames and bytes the client
received, the largest (final) text frame, the gaps between text frames (p50, p90, max; and the
largest over the first 300 tokens' worth of time), how long
after the last token the end frame came, and whether the final text is complete with exactly one
end frame. The answers run at once, each through its own app and paced fake upstream
(bench/fake_upstream.py), all on 127.0.0.1 in this process; the longest sets the run's length
(a 2,000-token answer at 30 tokens/s: about 67 s). `--ws` changes a ws setting of the app, e.g.
`--ws bytes_per_second=0` (no byte budget).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import aiohttp  # noqa: E402
import yaml  # noqa: E402
from aiohttp import web  # noqa: E402

from app import create_app  # noqa: E402
from chatgpt.settings import load_settings  # noqa: E402
from common import percentile, token_text  # noqa: E402
from fake_upstream import Encoded, FakeUpstream, _suffix, make_app  # noqa: E402


def answer_tokens(n: int, stamped: bool) -> list[str]:
    """The answer's tokens; stamped: each ends with six digits, like the capacity benchmark's."""
    return [t + "%06d" % (i * 33 % 1000000) if stamped else t for i, t in enumerate(token_text(n))]


class StampedEncoded(Encoded):
    """The fake upstream's answer with stamped tokens."""

    def __init__(self, tokens: int) -> None:
        super().__init__(0)
        self.pieces = [_suffix({"content": t}, None) for t in answer_tokens(tokens, True)]


def _listening() -> socket.socket:
    """A loopback socket on a port the system picks, already listening (no race for the port)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    sock = _listening()
    await web.SockSite(runner, sock).start()
    return runner, sock.getsockname()[1]


def _settings(folder: Path, upstream_port: int, ws: dict[str, Any]) -> Any:
    raw = {"upstream": {"base_url": f"http://127.0.0.1:{upstream_port}/v1", "api_keys": ["sk-bench-0001"],
                        "read_timeout": 30},
           "ws": ws, "images": {"folder": str(folder / "images")}, "state": {"file": str(folder / "state.json")}}
    path = folder / "settings.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return load_settings(path, env={})


async def one_answer(tokens: int, rate: float, stamped: bool, ws_settings: dict[str, Any],
                     folder: Path) -> dict[str, Any]:
    """Ask one question of `tokens` tokens at `rate` tokens/s and measure what the client receives."""
    folder.mkdir()
    fake = FakeUpstream(tokens, rate)
    if stamped:
        fake.encoded[tokens] = StampedEncoded(tokens)
    upstream, upstream_port = await _serve(make_app(fake))
    server, port = await _serve(create_app(_settings(folder, upstream_port, ws_settings)))
    question = {"conversationId": "c-1", "id": "u-1", "parentId": 1, "authType": "api", "authValue": "Bearer ",
                "isDemo": True, "content": "", "isGenImg": False, "isSender": False,
                "messages": [{"role": "user", "content": "hi"}]}
    texts: list[tuple[float, int, dict[str, Any]]] = []  # (arrival, bytes, frame) of each text frame
    ends: list[tuple[float, int, dict[str, Any]]] = []
    try:
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(f"http://127.0.0.1:{port}/websocket") as ws:
                asked = time.monotonic()
                await ws.send_json(question)
                while True:
                    message = await asyncio.wait_for(ws.receive(), 60)
                    if message.type != aiohttp.WSMsgType.TEXT:
                        raise RuntimeError(f"socket ended: {message.type}")
                    frame = json.loads(message.data)
                    entry = (time.monotonic(), len(message.data.encode("utf-8")), frame)
                    (ends if frame.get("isDone") else texts).append(entry)
                    if frame.get("isDone"):
                        await asyncio.sleep(0.2)  # a second end frame would arrive now
                        while not ws.closed:
                            try:
                                extra = await asyncio.wait_for(ws.receive(), 0.05)
                            except TimeoutError:
                                break
                            if extra.type == aiohttp.WSMsgType.TEXT:
                                ends.append((time.monotonic(), len(extra.data.encode()), json.loads(extra.data)))
                        break
    finally:
        await server.cleanup()
        await upstream.cleanup()
    gaps = [1000 * (b[0] - a[0]) for a, b in zip(texts, texts[1:])]
    early_end = texts[0][0] + 300 / rate if texts and rate > 0 else 0.0
    early = [1000 * (b[0] - a[0]) for a, b in zip(texts, texts[1:]) if b[0] <= early_end]
    expected = "".join(answer_tokens(tokens, stamped))
    first = texts[0][0] if texts else asked
    ideal_end = first + (tokens - 1) / rate if rate > 0 else first
    total = sum(b for _, b, _ in texts) + sum(b for _, b, _ in ends)
    return {
        "tokens": tokens, "tokens_per_s": rate, "final_chars": len(expected),
        "frames": len(texts) + len(ends), "bytes": total, "mb": round(total / 1e6, 2),
        "final_frame_bytes": texts[-1][1] if texts else 0,
        "bytes_over_final_frame": round(total / texts[-1][1], 1) if texts else None,
        "gap_ms_p50": _ms(percentile(gaps, 50)), "gap_ms_p90": _ms(percentile(gaps, 90)),
        "gap_ms_max": _ms(max(gaps, default=None)),
        "first_300_tokens_gap_ms_max": _ms(max(early, default=None)),
        "done_after_last_token_ms": _ms(1000 * (ends[0][0] - ideal_end)) if ends else None,
        "final_text_complete": bool(texts) and texts[-1][2].get("content") == expected,
        "done_frames": sum(1 for _, _, f in ends if f.get("content") == "DONE" and f.get("isSuccess")),
        "other_end_frames": [f.get("content") for _, _, f in ends if f.get("content") != "DONE"],
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _ws_overrides(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"frame_interval_ms": 50}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key] = yaml.safe_load(value)
    return out


async def run(answers: list[int], rate: float, stamped: bool, ws_settings: dict[str, Any]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        return list(await asyncio.gather(*(one_answer(n, rate, stamped, ws_settings, Path(tmp) / f"a{i}")
                                           for i, n in enumerate(answers))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", default="2000,300,200", help="tokens per answer, comma-separated")
    parser.add_argument("--rate", type=float, default=30.0, help="tokens/s of each answer")
    parser.add_argument("--stamped", action="store_true", help="~10-character tokens, as bench/capacity.py's")
    parser.add_argument("--ws", action="append", default=[], metavar="KEY=VALUE", help="a ws setting of the app")
    args = parser.parse_args()
    ws_settings = _ws_overrides(args.ws)
    results = asyncio.run(run([int(n) for n in args.answers.split(",")], args.rate, args.stamped, ws_settings))
    print(json.dumps({"ws": ws_settings, "stamped": args.stamped, "answers": results}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    os.environ.pop("CHATGPT_ADMIN_TOKEN", None)
    main()
