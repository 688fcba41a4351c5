"""The sensitive-word filter's cost per delta, for word lists of 1,000 and 10,000 words.

    python bench/wordfilter.py [--tokens 2000] [--delta 3] [--repeat 5]

Streams a 2,000-token answer (the benchmark's Markdown answer, with Chinese) in deltas of ~3
characters through the maskers and prints, per list size, the best of `--repeat` runs in µs per
delta: `stream` (streamed HTTP: feed, returns what is safe to send), `v1_chunk` (streamed `/v1`: an
upstream chunk parsed, its text masked and the chunk re-encoded), `websocket` (what the websocket
runs: the answer and its Markdown source kept as masked parts), `cumulative` (given the whole answer
so far, returns it masked), each once with no listed word in the answer and once
with listed words that occur in it (masking on); plus the cost of building the automaton and of
checking a 200-character prompt. One JSON line per list size on stdout.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import token_text  # noqa: E402

from chatgpt.domain.provider import Delta  # noqa: E402
from chatgpt.domain.wordfilter import WordFilter, normalize  # noqa: E402
from chatgpt.faces.masking import ChunkMasker  # noqa: E402

HANZI = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处理府研"  # noqa: E501
LATIN = "abcdefghijklmnopqrstuvwxyz"


def make_words(count: int, rng: random.Random) -> list[str]:
    """`count` distinct words, 2..6 characters, mostly Chinese, some Latin (as real lists are)."""
    words: set[str] = set()
    while len(words) < count:
        alphabet = HANZI if rng.random() < 0.8 else LATIN
        words.add("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 6))))
    return sorted(words)


def deltas(text: str, size: int) -> list[str]:
    """`text` cut into pieces of `size` characters."""
    return [text[i:i + size] for i in range(0, len(text), size)]


def best_us(run: Callable[[], int], repeat: int) -> float:
    """The best of `repeat` runs, in µs per delta (`run` returns how many deltas it handled)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        count = run()
        best = min(best, (time.perf_counter() - start) / count)
    return round(best * 1e6, 2)


def measure(words: list[str], pieces: list[str], repeat: int) -> dict[str, float]:
    """µs per delta of both maskers over `pieces`."""
    listed = WordFilter(words)

    def stream() -> int:
        masker = listed.stream()
        for piece in pieces:
            masker.feed(piece)
        masker.flush()
        return len(pieces)

    def cumulative() -> int:
        masker = listed.cumulative()
        text = ""
        for piece in pieces:
            text += piece
            masker.update(text)
        return len(pieces)

    def growing() -> int:  # what the websocket runs: the text and its Markdown source, as parts
        masker = listed.growing(("*", "\ue000"))
        for piece in pieces:
            masker.feed(piece)
        return len(pieces)

    chunks = [Delta(text=piece, payload=json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}, ensure_ascii=False))
        for piece in pieces]

    def chunk() -> int:  # streamed /v1 with listed words: each upstream chunk parsed, masked, re-encoded
        masker = ChunkMasker(listed)
        for delta in chunks:
            masker.payload(delta)
        return len(chunks)

    return {"stream_us": best_us(stream, repeat), "cumulative_us": best_us(cumulative, repeat),
            "growing_us": best_us(growing, repeat), "chunk_us": best_us(chunk, repeat)}


def main() -> None:
    """Print one JSON line per word-list size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--delta", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(15)
    answer = "".join(token_text(args.tokens))
    pieces = deltas(answer, args.delta)
    prompt = answer[:200]
    for count in (1000, 10000):
        words = make_words(count, rng)
        start = time.perf_counter()
        listed = WordFilter(words)
        build_ms = (time.perf_counter() - start) * 1000
        normal = normalize(answer)
        clean = [w for w in words if normalize(w) not in normal]  # no listed word in the answer
        # words that occur in the answer, so masks are recorded and rendered all along
        hitting = clean[:count - 3] + ["point", "世界", "code"]
        clean_filter = WordFilter(clean)
        start = time.perf_counter()
        for _ in range(100):
            clean_filter.contains(prompt)  # no listed word: the whole prompt is scanned
        prompt_us = (time.perf_counter() - start) / 100 * 1e6
        no_hits = measure(clean, pieces, args.repeat)
        with_hits = measure(hitting, pieces, args.repeat)
        print(json.dumps({
            "words": count, "answer_chars": len(answer), "deltas": len(pieces), "delta_chars": args.delta,
            "build_ms": round(build_ms, 1), "prompt_200_chars_us": round(prompt_us, 1),
            "stream_us_per_delta": no_hits["stream_us"], "cumulative_us_per_delta": no_hits["cumulative_us"],
            "websocket_us_per_delta": no_hits["growing_us"], "v1_chunk_us": no_hits["chunk_us"],
            "stream_us_per_delta_masking": with_hits["stream_us"],
            "cumulative_us_per_delta_masking": with_hits["cumulative_us"],
            "websocket_us_per_delta_masking": with_hits["growing_us"],
            "masked_stars": WordFilter(hitting).mask(answer).count("*"),
        }), flush=True)


if __name__ == "__main__":
    main()
