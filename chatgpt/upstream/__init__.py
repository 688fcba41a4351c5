"""Implementations of the domain's provider interface: OpenAI-compatible, Baixing, offline."""
