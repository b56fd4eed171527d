"""The `openai` engine: any OpenAI-compatible endpoint, called from a pool of Ray Data actors.

Each actor keeps up to `concurrency / num_workers` requests in flight on one event loop (the
largest number of workers, when `num_workers` is a range [min, max] for an autoscaling pool).
Retries of 429, 5xx and timeouts are the openai client's own (bounded by `max_retries`,
honouring Retry-After). Requests-per-minute and tokens-per-minute limits are held by one shared
limiter actor for all workers, which a 429's Retry-After also pauses. A reply that cannot be read
is asked once more inside the same request (`MAX_ASKS`), so the driver's re-ask pass finds none.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from dataclasses import dataclass

import httpx
import openai
import pyarrow as pa
from pydantic import ValidationError

from alpagasus_ray import columns as C
from alpagasus_ray.config import ConfigError, api_key, pool_size
from alpagasus_ray.llm import wire
from alpagasus_ray.llm.context import api_context
from alpagasus_ray.llm.engines.base import StreamingEngine
from alpagasus_ray.llm.task import (
    MAX_ASKS,
    Request,
    failed,
    reply_result,
    temperature,
    with_results,
)
from alpagasus_ray.rules.budget import usd, worst_case_tokens
from alpagasus_ray.rules.prompts import estimate_tokens
from alpagasus_ray.rules.ratelimit import SharedLimiter

# The API path's object-store budget and read block size. Ray Data gives each stage a share of
# the budget; at 64 MB the actor pool's share was too small to keep its tasks running (-40%
# rows/s), at 256 MB the batches waiting for it stay near 22 MB.
OBJECT_STORE_BYTES = 256 * 2**20
READ_BLOCK_BYTES = 4 * 2**20


class ApiEngine(StreamingEngine):
    """An OpenAI-compatible chat or completions endpoint under concurrency and rate limits."""

    def check(self, section: str) -> None:
        require_key(self.cfg, section)

    def context(self):
        return api_context(self.cfg)

    def price_factor(self) -> float | None:
        return 1.0

    def map(self, rows, task, *, attempt: int = 1, sink=None, progress=None):
        """`rows` mapped through `task` by `ApiMapper` actors, `num_workers` of them, sharing the
        endpoint's concurrency and one limiter for its requests- and tokens-per-minute limits."""
        import ray
        from ray.data import ActorPoolStrategy

        endpoint = self.cfg
        bound_blocks(rows)
        limiter = None
        if endpoint.requests_per_minute or endpoint.tokens_per_minute:
            limiter = (
                ray.remote(SharedLimiter)
                .options(num_cpus=0, max_concurrency=10_000)
                .remote(endpoint.requests_per_minute, endpoint.tokens_per_minute)
            )
        fewest, most = pool_size(endpoint.num_workers)
        slots = endpoint.concurrency // most  # the concurrency holds with the pool at its largest
        # Blocks of a few batches: an actor pool grows with the blocks waiting for it, and a large
        # block (a read yields one per input file) would keep one actor busy while the others idle;
        # each batch is still saved as soon as it finishes.
        rows = self.in_blocks(rows)
        block_rows = self.block_rows
        # Enough blocks per actor that a full batch is waiting whenever one finishes (the batches of
        # a block run at once, their rows queued for the slots in order).
        calls = math.ceil(slots / block_rows) + 1
        # An autoscaling pool grows when its actors hold more blocks than they run at once (Ray Data
        # adds actors at 1.75 blocks queued or running per call slot): let blocks queue up to twice that.
        queued = 2 * calls if most > fewest else calls
        return rows.map_batches(
            ApiMapper,
            batch_size=endpoint.batch_size,
            batch_format="pyarrow",
            fn_constructor_kwargs={"endpoint": endpoint, "slots": slots, "limiter": limiter, "task": task,
                                   "progress": progress, "sink": sink, "attempt": attempt, "spending": self.spending},
            compute=ActorPoolStrategy(
                min_size=fewest, max_size=most, max_tasks_in_flight_per_actor=queued, max_concurrent_calls_per_actor=calls
            ),
            num_cpus=0.5,
            resources=endpoint.worker_resources or None,
        )


def bound_blocks(rows) -> None:
    """Bound what a Dataset's whole pipeline (the read included) may hold for a slow API.

    Ray keeps an object under 100 KB (a block of a few batches) in the memory of the process that
    owns it, the driver: blocks read ahead of a slow API piled up there (+110 MB after 94k of 520k
    rows), and a read block (up to 128 MiB by default) is cut into batches all at once (4,067 at
    520k rows). A capped object-store budget and small read blocks bound them.
    """
    context = rows.context
    limits = context.execution_options.resource_limits
    context.execution_options.resource_limits = limits.copy(
        object_store_memory=min(limits.object_store_memory, OBJECT_STORE_BYTES))
    small_blocks(rows)


def small_blocks(rows) -> None:
    """Cap the blocks of `rows`'s whole pipeline, the read included, at `READ_BLOCK_BYTES` (Ray
    Data's default is 128 MiB: a driver that takes the blocks in would hold that much)."""
    context = rows.context
    context.target_max_block_size = min(context.target_max_block_size or READ_BLOCK_BYTES, READ_BLOCK_BYTES)


def require_key(endpoint, section: str) -> None:
    """OpenAI's own endpoint needs a key in the environment; fail before anything is sent."""
    if endpoint.base_url is None and not os.environ.get(endpoint.api_key_env):
        raise ConfigError(
            f"{section}.backend={endpoint.backend} with OpenAI's endpoint needs an API key in ${endpoint.api_key_env}; "
            f"set it in the environment (never in a config), or set {section}.base_url to a server without auth"
        )


class NotSent(Exception):
    """The spending cap kept a request from being sent."""


class ApiWorker:
    """An API client for a Ray actor: `slots` requests in flight on the actor's event loop, under
    the shared limiter and the shared spending cap, and the ask-again loop."""

    def __init__(self, endpoint, slots: int, limiter=None, spending=None):
        self.cfg = endpoint
        self.limiter = limiter
        self.spending = spending
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

    async def send(self, request: Request, sampled: bool = False) -> wire.ChatBody | wire.TextBody:
        """One request (its body from `wire.body`) under the slots and the limiter; the reply
        read from the raw body.

        Raises:
            openai.APIError: the request failed after the client's retries.
            ValidationError: the body is not JSON or lacks a field a result is read from.
            NotSent: the spending cap kept it from being sent.
        """
        texts = [m["content"] for m in request.messages] if request.messages is not None else [request.prompt]
        path = wire.path(request)
        body = wire.body(request, self.cfg.model, temperature(2 if sampled else 1, self.cfg.temperature),
                         self.cfg.extra_body)
        worst = self._price(*worst_case_tokens(texts, request.max_tokens)) if self.spending is not None else 0.0
        async with self._turn(sum(estimate_tokens(t) for t in texts) + request.max_tokens, worst) as booked:
            cost = worst  # what a request whose usage is not known is counted at
            try:
                response = await self.client.post(path, body=body, cast_to=httpx.Response)
                completion = wire.parse(response.content, path)
                if booked and completion.usage is not None:  # else it stays at its worst case
                    cost = self._price(*wire.usage(completion))
                return completion
            except openai.APIError:
                cost = 0.0  # a request that failed is not billed
                raise
            finally:
                if booked:
                    await self.spending.settle.remote(worst, cost)

    async def ask(self, task, row: dict, first: int = 1) -> dict:
        """The result of `row`: its request sent, and asked once more when the reply cannot be
        used. A reply cannot be used when its body is not JSON, lacks a field a result is read
        from or has no choices (the client does not retry a 200), or when the task cannot read it
        (e.g. no score in it). An HTTP error the client has already retried (429, 5xx, timeouts)
        ends the asking at once. `first` is the number of this first ask (2 for a re-ask pass,
        which samples; the ask again inside a request keeps the configured temperature)."""
        request = task.request(row)
        asked = _Asked()
        for attempt in range(first, MAX_ASKS + 1):
            try:
                completion = await self.send(request, sampled=first > 1)
            except NotSent:
                if attempt == first:
                    return None  # never sent: the row is left for a rerun
                # The ask again was not sent: the row keeps what its first ask got (a rerun asks again).
                if asked.problem is not None:
                    return failed(task, attempt - 1, asked.problem, asked.tokens_in, asked.tokens_out)
                return asked.result
            except ValidationError as e:
                asked.problem = f"unreadable response body: {wire.body_problem(e)}"
                continue
            except openai.APIError as e:
                return failed(task, attempt, wire.describe_error(e), asked.tokens_in, asked.tokens_out)
            tokens_in, tokens_out = wire.usage(completion)
            asked.tokens_in += tokens_in
            asked.tokens_out += tokens_out
            if not completion.choices:
                asked.problem = f"unreadable response: {str(completion)[:200]!r}"
                continue
            asked.result = reply_result(task, row, wire.reply(completion), attempt, asked.tokens_in, asked.tokens_out)
            asked.problem = None
            if asked.result[C.STATUS] == C.OK:
                return asked.result
        if asked.problem is not None:  # the last reply could not be read at all
            return failed(task, MAX_ASKS, asked.problem, asked.tokens_in, asked.tokens_out)
        return asked.result

    @contextlib.asynccontextmanager
    async def _turn(self, tokens: int, worst: float = 0.0):
        # Slot first, then the limiter: when a Retry-After pause begins, only requests already
        # past the limiter (at most one per slot) can still go out. The cap books a request's worst
        # case once it has its slot, so what is in flight is what is being asked, not what waits.
        async with self.slots:
            booked = bool(worst)
            if booked and not await self.spending.book.remote(worst):
                raise NotSent()
            if self.limiter is not None:
                await self.limiter.acquire.remote(tokens)
            yield booked

    def _price(self, tokens_in: int, tokens_out: int) -> float:
        return usd(tokens_in, tokens_out, self.cfg.price_input_per_million, self.cfg.price_output_per_million)

    async def _on_response(self, response) -> None:
        """On a 429: an exhausted quota is not retried (the client would retry it `max_retries`
        times for every row, in vain); a Retry-After pauses every worker through the shared limiter.
        A 429 without one is retried by the client with its own backoff."""
        if response.status_code != 429:
            return
        await response.aread()  # a small error body; the client reads it again from the cache
        if wire.quota_exhausted(response.content):
            response.headers["x-should-retry"] = "false"  # obeyed by the openai client
            return
        seconds = wire.retry_after_seconds(response.headers)
        if seconds and self.limiter is not None:
            self.limiter.pause.remote(seconds)


@dataclass
class _Asked:
    result: dict | None = None  # the last readable reply's result
    problem: str | None = None  # why the last reply could not be read at all
    tokens_in: int = 0
    tokens_out: int = 0


class ApiMapper(ApiWorker):
    """Ray Data actor: the rows of each batch asked concurrently on the actor's event loop. Rows
    wait for a slot in the order they came, so a batch's rows go out before the next batch's and
    few batches are partly done at any time."""

    def __init__(self, endpoint, slots: int, limiter, task, progress=None, sink=None, attempt: int = 1, spending=None):
        super().__init__(endpoint, slots, limiter, spending)
        self.task, self.progress, self.sink, self.first = task, progress, sink, attempt

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        results = list(await asyncio.gather(*(self.ask(self.task, row, self.first) for row in rows)))
        if None in results:  # rows the spending cap kept from being sent: not saved, so a rerun sends them
            sent = [i for i, r in enumerate(results) if r is not None]
            batch, results = batch.take(pa.array(sent, pa.int64())), [results[i] for i in sent]
            if not sent and self.sink is not None:
                return pa.table({"rows": [0]})
        return with_results(batch, self.task, results, self.progress, self.sink)
