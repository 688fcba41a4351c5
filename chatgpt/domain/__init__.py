"""The rules: questions, answers, the pipeline and everything it decides. Never imports aiohttp."""
