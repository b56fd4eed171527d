"""The `openai` backend: any OpenAI-compatible chat endpoint, called from Ray Data actors.

Each actor keeps up to `rate.concurrency / rate.num_workers` requests in flight on one event loop.
Retries of 429, 5xx and timeouts are the openai client's own (bounded by `rate.max_retries`,
honouring Retry-After). Requests-per-minute and tokens-per-minute limits are held by one shared
limiter actor for all workers, which a 429's Retry-After also pauses.
"""

from __future__ import annotations

import asyncio
import json
import math
import os

import openai
import pyarrow as pa

from alpagasus_ray import columns as C
from alpagasus_ray.backends import MAX_ASKS, Rating, rating_from_reply, ratings_table
from alpagasus_ray.config import RateConfig, api_key
from alpagasus_ray.prompts import estimate_tokens, expected_score, parse_score, rating_messages
from alpagasus_ray.ratelimit import SharedLimiter


class OpenAIBackend:
    """Rates rows through an OpenAI-compatible API under concurrency and rate limits."""

    def __init__(self, rate: RateConfig):
        self.cfg = rate
        self.grader = f"openai:{rate.model}"
        if rate.base_url is None and not os.environ.get(rate.api_key_env):
            raise ValueError(
                f"rate.backend=openai with OpenAI's endpoint needs an API key in ${rate.api_key_env}; "
                "set it in the environment (never in a config), or set rate.base_url to a server without auth"
            )

    def rate(self, rows, reask: bool = False):
        import ray
        from ray.data import ActorPoolStrategy

        cfg = self.cfg
        limiter = None
        if cfg.requests_per_minute or cfg.tokens_per_minute:
            limiter = (
                ray.remote(SharedLimiter)
                .options(num_cpus=0, max_concurrency=10_000)
                .remote(cfg.requests_per_minute, cfg.tokens_per_minute)
            )
        slots = cfg.concurrency // cfg.num_workers
        # Enough blocks per actor that a full batch is waiting whenever one finishes.
        calls = 2 * math.ceil(slots / cfg.batch_size) + 1
        return rows.map_batches(
            _Rater,
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            fn_constructor_kwargs={"rate": cfg.model_dump(), "slots": slots, "limiter": limiter},
            compute=ActorPoolStrategy(
                size=cfg.num_workers, max_tasks_in_flight_per_actor=calls, max_concurrent_calls_per_actor=calls
            ),
            num_cpus=0.5,
        )


class _Rater:
    """Ray Data actor: rates the rows of each batch concurrently on the actor's event loop."""

    def __init__(self, rate: dict, slots: int, limiter=None):
        self.cfg = RateConfig(**rate)
        self.limiter = limiter
        self.slots = asyncio.Semaphore(slots)
        # The client's pool (1,000 connections) is larger than any slot count; the semaphore bounds use.
        http_client = openai.DefaultAsyncHttpxClient(event_hooks={"response": [self._on_response]})
        self.client = openai.AsyncOpenAI(
            base_url=self.cfg.base_url,
            api_key=api_key(self.cfg),
            max_retries=self.cfg.max_retries,
            timeout=self.cfg.request_timeout,
            http_client=http_client,
        )

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select([C.ID, C.INSTRUCTION, C.INPUT, C.OUTPUT]).to_pylist()
        ratings = await asyncio.gather(*(self._rate_row(row) for row in rows))
        return ratings_table(list(ratings))

    async def _rate_row(self, row: dict) -> Rating:
        messages = rating_messages(row[C.INSTRUCTION], row[C.INPUT], row[C.OUTPUT], self.cfg.dimension)
        tokens_in = tokens_out = 0
        problem = None
        for ask in range(1, MAX_ASKS + 1):
            try:
                reply = await self._request(messages)
            except json.JSONDecodeError as e:
                # A 200 whose body is not JSON: the client does not retry it; we ask once more.
                problem = f"unreadable response body: {e.msg}"
                continue
            except openai.APIError as e:
                # The client has already retried what is worth retrying (429, 5xx, timeouts).
                return Rating(row[C.ID], C.REQUEST_FAILED, attempts=ask, error=_describe(e),
                              tokens_in=tokens_in, tokens_out=tokens_out)
            counts = _usage(reply)
            tokens_in += counts[0]
            tokens_out += counts[1]
            text, positions, problem = _read_reply(reply)
            if problem is not None:
                continue
            parsed = parse_score(text)
            if parsed.score is None and ask < MAX_ASKS:
                problem = parsed.error
                continue
            expected = expected_score(positions) if parsed.score is not None and positions else None
            return rating_from_reply(row[C.ID], parsed, expected, attempts=ask,
                                     tokens_in=tokens_in, tokens_out=tokens_out)
        return Rating(row[C.ID], C.REQUEST_FAILED, attempts=MAX_ASKS, error=problem,
                      tokens_in=tokens_in, tokens_out=tokens_out)

    async def _request(self, messages: list[dict]):
        cfg = self.cfg
        extra = {"logprobs": True, "top_logprobs": cfg.top_logprobs} if cfg.logprobs else {}
        # Slot first, then the limiter: when a Retry-After pause begins, only requests already
        # past the limiter (at most one per slot) can still go out.
        async with self.slots:
            if self.limiter is not None:
                prompt = sum(estimate_tokens(m["content"]) for m in messages)
                await self.limiter.acquire.remote(prompt + cfg.max_tokens)
            return await self.client.chat.completions.create(
                model=cfg.model, messages=messages, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                extra_body=cfg.extra_body or None, **extra,
            )

    async def _on_response(self, response) -> None:
        """Tell the shared limiter about a 429's Retry-After, so every worker holds back."""
        if response.status_code != 429 or self.limiter is None:
            return
        seconds = retry_after_seconds(response.headers)
        if seconds:
            self.limiter.pause.remote(seconds)


def retry_after_seconds(headers) -> float | None:
    """Seconds a server asked us to wait, from `retry-after-ms` or a numeric `retry-after`.

    >>> retry_after_seconds({"retry-after": "2"}), retry_after_seconds({"retry-after-ms": "250"})
    (2.0, 0.25)
    >>> retry_after_seconds({}) is None
    True
    """
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return float(value) / scale
        except ValueError:
            continue  # an HTTP date: the client's own retry still honours it
    return None


def _read_reply(reply) -> tuple[str, list[list[tuple[str, float]]], str | None]:
    """(text, top logprobs per token, problem) of a chat completion; problem is None when readable."""
    choices = getattr(reply, "choices", None)
    if not choices:
        return "", [], f"unreadable response: {str(reply)[:200]!r}"
    choice = choices[0]
    text = (choice.message.content if choice.message else None) or ""
    positions = []
    content = getattr(choice.logprobs, "content", None) if choice.logprobs else None
    for entry in content or []:
        alternatives = [(t.token, t.logprob) for t in (entry.top_logprobs or []) if t.token != entry.token]
        positions.append([(entry.token, entry.logprob), *alternatives])
    return text, positions, None


def _usage(reply) -> tuple[int, int]:
    usage = getattr(reply, "usage", None)
    if usage is None:
        return 0, 0
    return usage.prompt_tokens or 0, usage.completion_tokens or 0


def _describe(error: Exception) -> str:
    """A one-line description of a failed request; never includes request headers (the key)."""
    status = getattr(error, "status_code", None)
    message = str(getattr(error, "message", None) or error).splitlines()[0][:300]
    return f"{type(error).__name__}{f' {status}' if status else ''}: {message}"
