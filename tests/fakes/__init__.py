"""Fake services for the tests, each a real aiohttp application that behaves like the real one."""
