"""The one pipeline every door shares (PROTOCOL.md E.1): maintenance → per-IP limit → model → trim
context → charge quota → provider and key (one retry on a key refusal) → stream → account."""
from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, TypeVar

from chatgpt.domain.accounting import Meter, QuestionRecord
from chatgpt.domain.accounts import Accounts
from chatgpt.domain.answer import Answer, produced
from chatgpt.domain.charging import Accounted
from chatgpt.domain.errors import AnswerBlocked, ModelNotFound, UpstreamFailed
from chatgpt.domain.gate import Gate
from chatgpt.domain.keypool import fingerprint
from chatgpt.domain.limits import LimiterTable
from chatgpt.domain.moderation import AnswerWatch, Moderation
from chatgpt.domain.pictures import PictureStore, StoredImage
from chatgpt.domain.provider import ChatRequest, Delta, GeneratedImage
from chatgpt.domain.question import Payer, Question, fit_context
from chatgpt.domain.upstreams import UPSTREAM_FAILURES, Progress, Route, Upstreams, opened
from chatgpt.domain.usage import TokenUsage
from chatgpt.domain.wordfilter import WordFilter
from chatgpt.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")


async def _one(call: Awaitable[T]) -> AsyncGenerator[T, None]:
    """A single awaited result as a stream of one, so pictures share the chat's key-retry loop."""
    yield await call


def _checked(batch: list[Delta], progress: Progress, record: QuestionRecord,
             watch: AnswerWatch) -> tuple[list[Delta], AnswerBlocked | None]:
    """Count a batch of deltas and show it to the content watch. A delta refused (moderation.action
    refuse) ends the batch: what came before it is still shown, then the refusal is raised; refused
    before anything was shown, it is raised at once (no door has sent a byte)."""
    watched = watch.active
    record.reads += 1
    for index, delta in enumerate(batch):
        if delta.usage is not None:
            record.usage = delta.usage
        if produced(delta):
            record.token()
            if watched and (delta.text or delta.reasoning):
                try:
                    watch.feed(delta.text, delta.reasoning)  # before anyone sees it
                except AnswerBlocked as blocked:
                    shown = progress.produced
                    progress.produced = True  # it went upstream and came back: charged
                    if not shown:
                        raise
                    return batch[:index], blocked
            progress.produced = True
    return batch, None


class ChatPipeline:
    """Every rule, once, for every door; faces hand it questions and turn what it gives into wire."""

    def __init__(self, settings: Settings, gate: Gate, accounts: Accounts, upstreams: Upstreams,
                 pictures: PictureStore, meter: Meter, usage: TokenUsage | None = None,
                 moderation: Moderation | None = None) -> None:
        self._settings = settings
        self.usage = usage  # tokens per pool key today (kept in the store: summed over instances)
        self._gate = gate
        self._accounts = accounts
        self._upstreams = upstreams
        self._pictures = pictures
        self._meter = meter
        self._moderation = moderation or Moderation(WordFilter(()))

    # --- admission and what the doors may ask about ---------------------------------------------------

    async def admit(self, door: str, identity: str) -> None:
        """First step of every question: maintenance, then the door's per-IP limit."""
        await self._gate.admit(door, identity)

    async def limit(self, door: str, identity: str) -> None:
        """A request that is not a question (e.g. `/v1/models`, the mini-program's routes): the limit only."""
        await self._gate.limit(door, identity)

    async def remaining(self, account: str) -> int:
        """Questions an anonymous account (`Question.account`) has left today (`查询次数`)."""
        return await self._accounts.remaining(account)

    async def reset_quota(self, identity: str | None) -> int:
        """Clear one identity's counters, or everyone's."""
        return await self._accounts.reset(identity)

    def health(self) -> dict[str, Any]:
        """Serving flag, key counts and upstream reachability, for `/healthz`."""
        return {"serving": self._gate.serving, **self._upstreams.health()}

    def limiter(self, door: str) -> LimiterTable:
        """The limiter table of `door`."""
        return self._gate.table(door)

    def picture_bytes(self, stored: StoredImage) -> bytes:
        """A saved picture's bytes (blocking: call it in a thread)."""
        return self._pictures.read(stored)

    # --- the rules ------------------------------------------------------------------------------------

    def model_for(self, requested: str | None, payer: Payer) -> str:
        """Blank or absent → the default; the caller's own key → any model; else only a model offered on
        the server's keys (PROTOCOL.md E.1)."""
        if requested is None or not requested.strip():
            return self._upstreams.default_model
        if payer.kind == "own" or self._upstreams.offers(requested):
            return requested
        raise ModelNotFound(requested)

    def _request(self, question: Question, model: str) -> ChatRequest:
        upstream = self._settings.upstream
        own = question.payer.kind == "own"
        # An SDK caller on its own key sends the context it wants; everyone else is held to the budget.
        history = question.messages if own and question.entry == "v1" else fit_context(
            question.messages, upstream.context_chars)
        if upstream.system_prompt and not own:
            history = [{"role": "system", "content": upstream.system_prompt}, *history]
        # The server's defaults and cap apply when the operator pays; on the caller's own key the
        # request is the caller's (what it did not set is not sent).
        max_tokens, temperature = question.max_tokens, question.temperature
        if not own:
            max_tokens = min(max_tokens or upstream.max_tokens, upstream.max_tokens)
            temperature = upstream.temperature if temperature is None else temperature
        model = self._upstreams.resolve(model)  # what clients say -> what upstreams are asked
        return ChatRequest(history, model, temperature, max_tokens, question.extra)

    def _record(self, question: Question, kind: str) -> QuestionRecord:
        record = self._meter.start(question.entry, question.identity, kind)
        record.payer = {"anonymous": "pool", "trusted": "trusted", "own": "own"}[question.payer.kind]
        # An own-key caller may name any model: only the offered ones become metric labels.
        model = question.model or self._upstreams.default_model
        record.model = model if self._upstreams.offers(model) else "other"
        if self._settings.logging.prompts:
            users = [m.get("content") for m in question.messages if m.get("role") == "user"]
            record.prompt = str(users[-1])[:2000] if users else ""
        return record

    # --- answering ------------------------------------------------------------------------------------

    def answer(self, question: Question) -> Answer:
        """The answer to an admitted question. The model rule, trimming and the word list refuse at once;
        charging, WeChat's check, the upstream and the accounting happen as the answer is read."""
        model = self.model_for(question.model, question.payer)
        request = self._request(question, model)
        # Only the newest prompt: a refused one stays in the mini-program's on-screen context, and must
        # not refuse every question after it.
        self._moderation.check_words(question.prompt)
        route = self._upstreams.route(question.payer, request.model, debug=self._accounts.debug)
        return Answer(model, self._stream(question, request, route), self._moderation.masking())

    def _accounted(self, question: Question, kind: str, route: Route) -> Accounted:
        """Charge the question, then account it however it ends: metrics, log line, refund rule."""
        return Accounted(self._accounts, self._meter, question, route, self._record(question, kind))

    async def _watched(self, question: Question, prompt: str) -> AnswerWatch:
        """WeChat's check of the prompt, then what watches the answer's content until it ends (the caller
        closes it). Entered after the charge, so a user with nothing left today costs no WeChat call;
        a refused prompt is refunded, since nothing went upstream."""
        await self._moderation.check_prompt(prompt, question.user)
        # The websocket shows the reasoning while only reasoning has arrived (ws.reasoning live).
        return self._moderation.watch(question.user, self._settings.ws.reasoning == "live")

    async def _stream(self, question: Question, request: ChatRequest,
                      route: Route) -> AsyncGenerator[list[Delta], None]:
        accounted = self._accounted(question, "chat", route)
        async with accounted as progress:
            record = accounted.record
            watch = await self._watched(question, question.prompt)
            try:
                batches = self._upstreams.call(route, lambda provider, key: provider.stream(request, key), progress)
                held: list[Delta] = []  # pieces before the first with something in it (the role chunk...)
                async with opened(batches):
                    async for batch in batches:
                        batch, blocked = _checked(batch, progress, record, watch)
                        if not progress.produced:
                            held += batch  # so that an empty answer fails before any door has sent a byte
                            continue
                        if held:
                            batch, held = held + batch, []
                        if batch:
                            yield batch
                        if blocked is not None:
                            raise blocked
                if not progress.produced:  # `[DONE]` straight away: nothing to show, nothing to charge
                    raise UpstreamFailed("empty")
                usage = record.usage
                if progress.upstream is not None:
                    record.upstream = progress.upstream.name
                if usage is not None and progress.pool_key is not None and self.usage is not None:
                    await self.usage.add(fingerprint(progress.pool_key), request.model, usage.counts())
                await watch.finish()  # the end of the answer waits for WeChat's verdict on its last segment
            finally:
                await watch.close()

    async def draw(self, question: Question, prompt: str, size: str | None = None) -> StoredImage:
        """One picture for `prompt`, saved; charged like a chat question. `size` is honoured only on the
        caller's own key: on the pool the operator pays for the configured size."""
        if question.payer.kind != "own" or not size:
            size = self._settings.images.size
        self._moderation.check_words(prompt)
        route = self._upstreams.drawing(question.payer)
        model = self._upstreams.image_model()
        accounted = self._accounted(question, "image", route)
        async with accounted as progress:
            record = accounted.record
            await (await self._watched(question, prompt)).close()  # a picture's content is not watched
            generated: GeneratedImage | None = None
            pictures = self._upstreams.call(
                route, lambda provider, key: _one(provider.generate_image(prompt, size, key, model)), progress)
            async with opened(pictures):
                async for generated in pictures:
                    progress.produced = True  # the upstream drew (and billed) it
            if generated is None:
                raise UpstreamFailed("empty")
            try:
                stored = await self._pictures.store(generated)
            except UPSTREAM_FAILURES as exc:
                raise self._upstreams.failed("picture download", exc, subject="picture") from exc
            record.token()
            return stored
