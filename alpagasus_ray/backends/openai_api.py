"""The `openai` backend of the LLM layer: any OpenAI-compatible endpoint, called from Ray Data
actors (`map_with_api`), for every stage.

Each actor keeps up to `concurrency / num_workers` requests in flight on one event loop (the largest
number of workers, when `num_workers` is a range [min, max] for an autoscaling pool).
Retries of 429, 5xx and timeouts are the openai client's own (bounded by `max_retries`,
honouring Retry-After). A reply is read into `ChatBody` or `TextBody`, only the fields a result
needs, from the raw body: the client's own typed `ChatCompletion` of a reply with logprobs costs
the event loop several times more (a bare loop of 64 requests in flight at 1 s reached 0.88 of
C/L with it, 0.985 without). Requests-per-minute and tokens-per-minute limits are held by one shared
limiter actor for all workers, which a 429's Retry-After also pauses.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import openai
import pyarrow as pa
from pydantic import BaseModel, ValidationError

from alpagasus_ray import columns as C
from alpagasus_ray.config import ConfigError, EndpointConfig, api_key, pool_size
from alpagasus_ray.llm_map import API_BATCHES_PER_BLOCK, MAX_ASKS, REASK_TEMPERATURE, Reply, result_row, with_results
from alpagasus_ray.prompts import estimate_tokens
from alpagasus_ray.ratelimit import SharedLimiter


def require_key(endpoint: EndpointConfig, section: str) -> None:
    """OpenAI's own endpoint needs a key in the environment; fail before anything is sent."""
    if endpoint.backend not in ("openai", "openai_batch"):
        return
    if endpoint.base_url is None and not os.environ.get(endpoint.api_key_env):
        raise ConfigError(
            f"{section}.backend={endpoint.backend} with OpenAI's endpoint needs an API key in ${endpoint.api_key_env}; "
            f"set it in the environment (never in a config), or set {section}.base_url to a server without auth"
        )


def map_with_api(rows, task, endpoint: EndpointConfig, progress=None, sink=None, reask: bool = False):
    """`rows` mapped through `task` (an `llm_map.LLMTask`) by `_ApiMapper` actors,
    `endpoint.num_workers` of them, sharing the endpoint's concurrency and one limiter for its
    requests- and tokens-per-minute limits. With `reask`, rows whose first reply could not be
    read elsewhere (e.g. in a batch) are asked once more, sampled, as their second ask."""
    import ray
    from ray.data import ActorPoolStrategy

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
    # block (a read yields up to 2,048 rows) would keep one actor busy while the others idle;
    # each batch is still saved as soon as it finishes.
    block_rows = endpoint.batch_size * API_BATCHES_PER_BLOCK
    rows = rows.repartition(target_num_rows_per_block=block_rows)
    # Enough blocks per actor that a full batch is waiting whenever one finishes (the batches of
    # a block run at once, their rows queued for the slots in order).
    calls = math.ceil(slots / block_rows) + 1
    # An autoscaling pool grows when its actors hold more blocks than they run at once (Ray Data
    # adds actors at 1.75 blocks queued or running per call slot): let blocks queue up to twice that.
    queued = 2 * calls if most > fewest else calls
    return rows.map_batches(
        _ApiMapper,
        batch_size=endpoint.batch_size,
        batch_format="pyarrow",
        fn_constructor_kwargs={"endpoint": endpoint, "slots": slots, "limiter": limiter, "task": task,
                               "progress": progress, "sink": sink, "reask": reask},
        compute=ActorPoolStrategy(
            min_size=fewest, max_size=most, max_tasks_in_flight_per_actor=queued, max_concurrent_calls_per_actor=calls
        ),
        num_cpus=0.5,
        resources=endpoint.worker_resources or None,
    )


class ApiWorker:
    """An API client for a Ray actor: `slots` requests in flight on the actor's event loop, under
    the shared limiter, and the ask-again loop."""

    def __init__(self, endpoint: EndpointConfig, slots: int, limiter=None):
        self.cfg = endpoint
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

    async def chat(self, messages: list[dict], max_tokens: int, **extra):
        """One chat completion under the slots and the limiter."""
        prompt = sum(estimate_tokens(m["content"]) for m in messages)
        async with self._turn(prompt + max_tokens):
            raw = await self.client.chat.completions.with_raw_response.create(
                model=self.cfg.model, messages=messages, max_tokens=max_tokens, temperature=self.cfg.temperature,
                extra_body=self.cfg.extra_body or None, **extra,
            )
        return ChatBody.model_validate_json(raw.content)

    async def complete(self, prompt: str, max_tokens: int):
        """One plain completion (no chat template) under the slots and the limiter."""
        async with self._turn(estimate_tokens(prompt) + max_tokens):
            raw = await self.client.completions.with_raw_response.create(
                model=self.cfg.model, prompt=prompt, max_tokens=max_tokens, temperature=self.cfg.temperature,
                extra_body=self.cfg.extra_body or None,
            )
        return TextBody.model_validate_json(raw.content)

    async def ask(self, send: Callable[[], Awaitable], read: Callable[[Any], tuple[Any, str | None]],
                  first: int = 1) -> "Asked":
        """`send()` a request; ask once more when its reply cannot be used.

        A reply cannot be used when its body is not JSON, lacks a field a result is read from or
        has no choices (the client does not retry a 200), or when `read(reply)` returns a problem
        (e.g. no score in it); `read` returns (value, problem). An HTTP error the client has
        already retried (429, 5xx, timeouts) ends the asking at once. `first` is the number of
        this first ask (2 for a re-ask).
        """
        asked = Asked()
        for attempt in range(first, MAX_ASKS + 1):
            asked.attempts = attempt
            try:
                reply = await send()
            except ValidationError as e:
                asked.value, asked.error = None, f"unreadable response body: {body_problem(e)}"
                continue
            except openai.APIError as e:
                asked.value, asked.error, asked.failed = None, describe_error(e), True
                return asked
            tokens_in, tokens_out = usage(reply)
            asked.tokens_in += tokens_in
            asked.tokens_out += tokens_out
            if not reply.choices:
                asked.value, asked.error = None, f"unreadable response: {str(reply)[:200]!r}"
                continue
            asked.value, asked.error = read(reply)
            if asked.error is None:
                break
        return asked

    @contextlib.asynccontextmanager
    async def _turn(self, tokens: int):
        # Slot first, then the limiter: when a Retry-After pause begins, only requests already
        # past the limiter (at most one per slot) can still go out.
        async with self.slots:
            if self.limiter is not None:
                await self.limiter.acquire.remote(tokens)
            yield

    async def _on_response(self, response) -> None:
        """Tell the shared limiter about a 429's Retry-After, so every worker holds back."""
        if response.status_code != 429 or self.limiter is None:
            return
        seconds = retry_after_seconds(response.headers)
        if seconds:
            self.limiter.pause.remote(seconds)


class _ApiMapper(ApiWorker):
    """Ray Data actor: the rows of each batch asked concurrently on the actor's event loop. Rows
    wait for a slot in the order they came, so a batch's rows go out before the next batch's and
    few batches are partly done at any time."""

    def __init__(self, endpoint: EndpointConfig, slots: int, limiter, task, progress=None, sink=None,
                 reask: bool = False):
        if reask:  # a greedy re-ask would repeat the reply word for word
            endpoint = endpoint.model_copy(update={"temperature": REASK_TEMPERATURE})
        super().__init__(endpoint, slots, limiter)
        self.task, self.progress, self.sink = task, progress, sink
        self.first = MAX_ASKS if reask else 1

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        results = await asyncio.gather(*(self._one(row) for row in rows))
        return with_results(batch, self.task, list(results), self.progress, self.sink)

    async def _one(self, row: dict) -> dict:
        task = self.task
        request = task.request(row)
        extra = {"logprobs": True, "top_logprobs": request.top_logprobs} if request.top_logprobs else {}
        if request.messages is not None:
            send = functools.partial(self.chat, request.messages, request.max_tokens, **extra)
        else:
            send = functools.partial(self.complete, request.prompt, request.max_tokens)

        def read(reply):
            text, positions = read_reply(reply)
            fields, problem = task.read(row, Reply(text, positions, reply.choices[0].finish_reason))
            return (fields, problem), problem

        asked = await self.ask(send, read, self.first)
        if asked.value is None:  # the request failed, or no reply could be read at all
            return result_row(task, None, C.REQUEST_FAILED, asked.attempts, asked.error, asked.tokens_in,
                              asked.tokens_out)
        fields, problem = asked.value
        return result_row(task, fields, C.OK if problem is None else C.PARSE_FAILED, asked.attempts, problem,
                          asked.tokens_in, asked.tokens_out)


@dataclass
class Asked:
    """The outcome of `ApiWorker.ask`. `value` is what `read` made of the last usable reply, or
    None when the request failed (`failed`) or no reply could be read; `error` says why a value
    is missing or was not good enough."""

    value: Any = None
    error: str | None = None
    failed: bool = False
    attempts: int = 0
    tokens_in: int = 0
    tokens_out: int = 0


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


class _TopLogprob(BaseModel):
    token: str
    logprob: float


class _TokenLogprob(_TopLogprob):
    top_logprobs: list[_TopLogprob] = []


class _Logprobs(BaseModel):
    content: list[_TokenLogprob] | None = None


class _Message(BaseModel):
    content: str | None = None


class _ChatChoice(BaseModel):
    message: _Message
    logprobs: _Logprobs | None = None
    finish_reason: str | None = None


class _TextChoice(BaseModel):
    text: str
    finish_reason: str | None = None


class _Usage(BaseModel):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class ChatBody(BaseModel):
    """The part of a chat completion's body that a result is read from, with the attribute names
    of `openai`'s `ChatCompletion`. Only these fields are validated (not, say, each logprob's list
    of bytes); a body without them is an unreadable reply. Also a line of a Batch API output file."""

    choices: list[_ChatChoice]
    usage: _Usage | None = None


class TextBody(BaseModel):
    """The same for a plain completion (`/v1/completions`)."""

    choices: list[_TextChoice]
    usage: _Usage | None = None


def body_problem(error: ValidationError) -> str:
    """What is wrong with a body, in a few words: the first problem and how many there are.

    >>> try:
    ...     ChatBody.model_validate_json(b'{"choices": [{}]}')
    ... except ValidationError as e:
    ...     body_problem(e)
    'choices.0.message: Field required'
    """
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{where + ': ' if where else ''}{first['msg']}{more}"


def read_reply(reply: ChatBody | TextBody) -> tuple[str, list[list[tuple[str, float]]]]:
    """(text, top logprobs per token) of a chat or plain completion that has choices."""
    choice = reply.choices[0]
    if isinstance(choice, _TextChoice):
        return choice.text, []
    text = choice.message.content or ""
    positions = []
    content = getattr(choice.logprobs, "content", None) if choice.logprobs else None
    for entry in content or []:
        alternatives = [(t.token, t.logprob) for t in (entry.top_logprobs or []) if t.token != entry.token]
        positions.append([(entry.token, entry.logprob), *alternatives])
    return text, positions


def usage(reply) -> tuple[int, int]:
    usage = getattr(reply, "usage", None)
    if usage is None:
        return 0, 0
    return usage.prompt_tokens or 0, usage.completion_tokens or 0


def describe_error(error: Exception) -> str:
    """A one-line description of a failed request; never includes request headers (the key)."""
    status = getattr(error, "status_code", None)
    message = str(getattr(error, "message", None) or error).splitlines()[0][:300]
    return f"{type(error).__name__}{f' {status}' if status else ''}: {message}"
