"""Shared test helpers, one module per kind: outside programs, ports and server processes, websocket
frames, and the session-wide secrets capture. Fakes of outside services live in tests/fakes/."""
