"""The garbage collector of a serving process: tuned for many short answers in flight at once."""
from __future__ import annotations

import gc
import logging

from aiohttp import web

log = logging.getLogger(__name__)

# Container objects allocated (net of those freed) before a young collection. CPython's 700 is
# reached several times per answer while 64 answers are in flight, and each collection walks every
# young object that is still alive (the in-flight answers'): about 7% of the server's CPU went there.
# Ten thousand keeps collections rare while garbage cycles (an exception's traceback) still go within
# a few hundred answers.
YOUNG_THRESHOLD = 10_000
# Young collections before a collection of the middle generation. Its objects are the answers in
# flight that outlived a young collection, and walking them all took ~40 ms at 600 paced `/v1`
# streams: with CPython's 10 that pause came every few seconds, and held up the first token of every
# question that arrived during it. They mostly die by reference counting when their answer ends, so
# walking them rarely finds anything; garbage cycles among them wait longer (about 40 s at that load).
MIDDLE_THRESHOLD = 100


async def freeze_startup_heap(app: web.Application) -> None:
    """on_startup, after everything else: the objects made at start-up (modules, settings, the app)
    live as long as the process, so the collector stops walking them (`gc.freeze`: a full collection
    took ~30 ms, a pause in every answer in flight, for ~57,000 objects that never die)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, gc.get_threshold()[2])
    log.debug("garbage collector: %d start-up objects frozen, thresholds %d, %d", gc.get_freeze_count(),
              YOUNG_THRESHOLD, MIDDLE_THRESHOLD)
