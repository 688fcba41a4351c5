"""Fakes of the outside world the app talks to, each a real aiohttp application that behaves like the
real service (OpenAI-compatible upstreams, WeChat), and a clock the test moves by hand."""
