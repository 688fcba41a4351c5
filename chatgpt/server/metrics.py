"""Prometheus metrics and the one log line per question: the domain's `Meter`, fed by the pipeline."""
from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from chatgpt.domain.accounting import QuestionRecord

__all__ = ["Metrics", "QuestionRecord", "hashed"]

log = logging.getLogger("chatgpt.questions")

_SALT = os.urandom(16)  # identities in logs are hashed with a per-process salt: not reversible by a reader
_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)
_DURATION = (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


def hashed(identity: str) -> str:
    """A short stable-per-process pseudonym for an IP address."""
    return hashlib.sha256(_SALT + identity.encode()).hexdigest()[:12]


class Metrics:
    """All metrics in one registry per app, so several apps (tests) never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.questions = Counter("chatgpt_questions", "Questions by entry point, kind and outcome",
                                 ["entry", "kind", "outcome"], registry=r)
        self.in_flight = Gauge("chatgpt_streams_in_flight", "Answers being streamed now", registry=r)
        self.first_token = Histogram("chatgpt_time_to_first_token_seconds", "Time to the first answer text",
                                     ["entry"], buckets=_LATENCY, registry=r)
        self.duration = Histogram("chatgpt_answer_duration_seconds", "Time to the end of an answer",
                                  ["entry"], buckets=_DURATION, registry=r)
        self.tokens = Counter("chatgpt_relayed_deltas", "Answer pieces relayed to clients", ["entry"], registry=r)
        self.token_usage = Counter("chatgpt_tokens", "Tokens the upstream counted, by kind, payer, model and upstream",
                                   ["kind", "payer", "model", "upstream"], registry=r)
        self.upstream_errors = Counter("chatgpt_upstream_errors", "Upstream failures by upstream, status and masked key",
                                       ["upstream", "status", "key"], registry=r)
        self.limiter_refusals = Counter("chatgpt_limiter_refusals", "Requests refused by a per-IP limiter",
                                        ["entry"], registry=r)
        self.quota_refusals = Counter("chatgpt_quota_refusals", "Questions refused by a daily quota",
                                      ["entry"], registry=r)
        self.content_checks = Counter("chatgpt_wechat_content_checks", "WeChat msgSecCheck calls by target and "
                                      "outcome (pass, review, risky, failed)", ["target", "outcome"], registry=r)
        self.images = Gauge("chatgpt_images_on_disk", "Saved pictures in the images folder", registry=r)
        self.image_bytes = Gauge("chatgpt_images_on_disk_bytes", "Bytes of saved pictures", registry=r)
        self.sockets = Gauge("chatgpt_websocket_connections", "Open mini-program websockets", registry=r)
        self.redis_up = Gauge("chatgpt_redis_up", "1 while the shared Redis answers (only with state.redis_url)",
                              registry=r)
        self.redis_errors = Counter("chatgpt_redis_errors", "Redis commands that failed (local store used, or refused)",
                                    registry=r)
        self._children: dict[tuple[object, ...], Any] = {}  # labels() takes a lock and hashes; once is enough

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def set_images(self, count: int, size: int) -> None:
        """The pictures on disk changed (one saved, a pruning pass): the gauges follow at once."""
        self.images.set(count)
        self.image_bytes.set(size)

    def limit_refused(self, door: str) -> None:
        """A per-IP limiter refused a request at `door`."""
        self._child(self.limiter_refusals, door).inc()

    def quota_refused(self, door: str) -> None:
        """A daily quota refused a question at `door`."""
        self._child(self.quota_refusals, door).inc()

    def upstream_failed(self, upstream: str, status: str, key: str) -> None:
        """A call to `upstream` failed with `status`; `key` is the masked pool key or "own"."""
        self._child(self.upstream_errors, upstream, status, key).inc()

    def content_checked(self, target: str, outcome: str) -> None:
        """WeChat's content check of a prompt or answer segment said `outcome` (or `failed`)."""
        self._child(self.content_checks, target, outcome).inc()

    def start(self, entry: str, identity: str, kind: str = "chat") -> QuestionRecord:
        """A question is going upstream."""
        self.in_flight.inc()
        return QuestionRecord(entry, identity, kind)

    def finish(self, record: QuestionRecord) -> None:
        """Count and log a finished question (whatever its outcome)."""
        self.in_flight.dec()
        now = time.monotonic()
        self._child(self.questions, record.entry, record.kind, record.outcome).inc()
        self._child(self.duration, record.entry).observe(now - record.started)
        if record.first_token is not None:
            self._child(self.first_token, record.entry).observe(record.first_token - record.started)
        if record.tokens:
            self._child(self.tokens, record.entry).inc(record.tokens)
        usage = record.usage
        if usage is not None:
            for kind, count in (("prompt", usage.prompt), ("completion", usage.completion),
                                ("reasoning", usage.reasoning)):
                if count:
                    self._child(self.token_usage, kind, record.payer, record.model, record.upstream).inc(count)
        if not log.isEnabledFor(logging.INFO):
            return  # the line is not wanted: spare the hash and the formatting
        ttft = f"{(record.first_token - record.started) * 1000:.0f}" if record.first_token else "-"
        log.info("question entry=%s kind=%s who=%s outcome=%s deltas=%d reads=%d first_ms=%s ms=%.0f "
                 "prompt_tokens=%s completion_tokens=%s%s",
                 record.entry, record.kind, hashed(record.identity), record.outcome, record.tokens,
                 record.reads, ttft, (now - record.started) * 1000, usage.prompt if usage else "-",
                 usage.completion if usage else "-",
                 f" prompt={record.prompt!r}" if record.prompt is not None else "")
