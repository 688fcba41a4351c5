"""Log setup: readable text by default, one JSON object per line for log shippers."""
from __future__ import annotations

import json
import logging
import time
from urllib.parse import urlsplit

from aiohttp.http_exceptions import HttpProcessingError


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message"}` (plus `error` with the traceback, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, fmt: str) -> None:
    """Configure the root logger once, for `main()`."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp-sse-client logs every event's data at DEBUG: answers are not the log's business.
    logging.getLogger("aiohttp_sse_client").setLevel(logging.INFO)


class BadRequestFilter(logging.Filter):
    """aiohttp logs every malformed request (scanners, garbage) as an ERROR with a traceback; that is
    the client's fault, not ours: keep one WARNING line without the traceback. A client that reset or
    left mid-request (an aborted websocket handshake, say) is not even a warning: one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "bad request from a client: %s", (str(error).splitlines()[0][:200],)
        elif isinstance(error, ConnectionError):
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "a client left mid-request: %s", (type(error).__name__,)
        return True


class RequestLineFilter(logging.Filter):
    """The access log's request line shows the path the client sent: aiohttp formats it as
    `str(request.rel_url)`, and yarl writes a path that starts with `//` (the mini-program's
    `//status`) behind an empty authority `//`, so `//status` would be logged as `////status`."""

    def filter(self, record: logging.LogRecord) -> bool:
        line = getattr(record, "first_request_line", None)
        if isinstance(line, str):
            method, _, rest = line.partition(" ")
            if rest.startswith("////"):  # a target yarl prefixed; an absolute-form one never starts so
                fixed = f"{method} {rest[2:]}"
                record.msg = str(record.msg).replace(f'"{line}"', f'"{fixed}"', 1)
                record.first_request_line = fixed
        return True


def quiet_bad_requests() -> None:
    """Install BadRequestFilter on aiohttp's server logger and RequestLineFilter on its access
    logger, once per process."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, BadRequestFilter) for f in server_log.filters):
        server_log.addFilter(BadRequestFilter())
    access_log = logging.getLogger("aiohttp.access")
    if not any(isinstance(f, RequestLineFilter) for f in access_log.filters):
        access_log.addFilter(RequestLineFilter())


def redacted(url: str) -> str:
    """The Redis URL as logs show it: scheme, host, port and database, never a user or password."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "redis (unparsable URL)"
    return f"{parts.scheme}://{host}{port}{parts.path}"
