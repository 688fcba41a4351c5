"""Before serving: the event loop to run on, and whether the configured address can be listened on
(told as one line naming the setting to change)."""
from __future__ import annotations

import asyncio
import errno
import importlib
import socket


def event_loop(choice: str) -> asyncio.AbstractEventLoop:
    """The loop the server runs on: uvloop (less CPU per event) when installed and not refused by
    `server.event_loop`, else asyncio's own."""
    if choice != "asyncio":
        try:
            # Imported by name: uvloop is optional (not a dependency), so the type check must not need it.
            uvloop = importlib.import_module("uvloop")
        except ImportError:
            if choice == "uvloop":
                raise SystemExit("chatgpt-api: server.event_loop is uvloop but uvloop is not installed") from None
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()


def check_listen(host: str, port: int) -> None:
    """Resolve `host` and bind each of its addresses as the server will (then let go); raise the
    OSError (or UnicodeError for a name IDNA cannot encode) that listening would meet."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's create_server
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(address)


def listen_failure(error: OSError | UnicodeError, host: str, port: int) -> str:
    """One line naming the setting that made listening fail, and why."""
    if isinstance(error, UnicodeError):
        return f"setting server.host: cannot resolve {host!r} (not a valid host name)"
    reason = error.strerror or str(error)
    if isinstance(error, socket.gaierror):
        return f"setting server.host: cannot resolve {host!r} ({reason})"
    if error.errno == errno.EADDRINUSE:
        return f"setting server.port: port {port} on {host} is already in use ({reason})"
    if error.errno == errno.EACCES:
        return f"setting server.port: not allowed to listen on port {port} ({reason})"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"setting server.host: {host} is not an address of this machine ({reason})"
    return f"settings server.host/server.port: cannot listen on {host}:{port} ({reason})"
