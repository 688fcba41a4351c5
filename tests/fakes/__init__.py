"""Fakes of the outside world the app talks to: upstreams (real aiohttp applications) and clocks."""
