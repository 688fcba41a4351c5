"""What the pipeline reports as it answers: one record per question, refusals and upstream failures.
The domain states what it counts; `chatgpt/server/metrics.py` implements it with Prometheus."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from chatgpt.domain.provider import Usage


@dataclass
class QuestionRecord:
    """What is known of one question while it is answered."""

    entry: str
    identity: str
    kind: str = "chat"
    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    tokens: int = 0
    reads: int = 0  # batches of deltas, one per upstream read (several tokens each when reading is paced)
    outcome: str = "ok"
    prompt: str | None = None  # logged only when settings.logging.prompts is on
    model: str = "other"  # an offered model, or "other" (metric labels stay bounded)
    payer: str = "pool"  # pool | trusted | own
    upstream: str = ""  # the upstream that answered ("" for the built-in providers)
    usage: Usage | None = None  # the upstream's count of the answer's tokens, when it gave one

    def token(self) -> None:
        """Count one delta with something of the answer; the first one stamps the time to first token."""
        if self.first_token is None:
            self.first_token = time.monotonic()
        self.tokens += 1


class Meter(Protocol):
    """Where the pipeline's counts go (metrics and the one log line per question)."""

    def start(self, entry: str, identity: str, kind: str) -> QuestionRecord:
        """A question is going upstream."""
        ...

    def finish(self, record: QuestionRecord) -> None:
        """A question has ended, whatever its outcome."""
        ...

    def limit_refused(self, door: str) -> None:
        """A per-IP limiter refused a request at `door`."""
        ...

    def quota_refused(self, door: str) -> None:
        """A daily quota refused a question at `door`."""
        ...

    def upstream_failed(self, upstream: str, status: str, key: str) -> None:
        """A call to `upstream` failed with `status` (an HTTP status or the failure's name); `key` is the
        masked pool key, or "own" for the caller's key or none."""
        ...

    def content_checked(self, target: str, outcome: str) -> None:
        """WeChat's content check of a `target` (prompt or answer segment) said `outcome` (pass, review,
        risky), or `failed` (WeChat unreachable or refusing)."""
        ...
