"""The vocabulary of the LLM layer, at its bottom: what a stage asks and what comes back.

A stage supplies an `LLMTask`: which `Request` a row makes and how a `Reply` is read into the
task's `fields`. Every result row holds the input row's columns, the task's fields, and the
layer's own columns (`STATUS_FIELDS`): `status` (ok, parse_failed, request_failed), `attempts`,
`error`, `tokens_in`, `tokens_out`.

The ask-again policy is stated here once: a reply the task cannot read is asked once more
(`MAX_ASKS` asks in all, the second sampled at `REASK_TEMPERATURE`, since a greedy re-ask would
repeat the reply word for word), then kept as parse_failed; a request that failed is sent again
only when the user asks for it (`retry_failed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from alpagasus_ray import columns as C

# Asks per row: a reply that cannot be read is asked once more, then kept as parse_failed.
MAX_ASKS = C.MAX_ASKS
# The one re-ask of an unreadable reply samples instead of repeating the greedy reply.
REASK_TEMPERATURE = 0.7
# The layer's own result columns, after the task's fields.
STATUS_FIELDS = pa.schema([
    (C.STATUS, pa.string()), (C.ATTEMPTS, pa.int32()), (C.ERROR, pa.string()),
    (C.TOKENS_IN, pa.int64()), (C.TOKENS_OUT, pa.int64()),
])
# Why generation stopped.
STOP, LENGTH = "stop", "length"


@dataclass(frozen=True)
class Request:
    """What one row asks: chat `messages` or a plain `prompt` (no chat template)."""

    messages: list[dict] | None = None
    prompt: str | None = None
    max_tokens: int = 256
    top_logprobs: int = 0  # alternatives per generated token to return; 0 for none
    constraint: dict | None = None  # structured outputs, e.g. {"choice": [...]} or {"regex": ...}


@dataclass
class Reply:
    """What came back: the text, the top logprobs per generated token (the chosen token first),
    and why generation stopped (`stop` or `length`)."""

    text: str
    positions: list[list[tuple[str, float]]] = field(default_factory=list)
    finish_reason: str | None = None


class LLMTask(Protocol):
    """What a stage supplies to the layer."""

    fields: pa.Schema  # the columns `read` fills; null when the request failed
    chat: bool  # messages through the model's chat template, or a plain prompt

    def request(self, row: dict) -> Request:
        """The request `row` makes."""
        ...

    def read(self, row: dict, reply: Reply) -> tuple[dict[str, Any], str | None]:
        """The task's fields from a reply, and a problem when the reply cannot be used (it is
        then asked once more, and kept as parse_failed if it still cannot)."""
        ...


# Where a finished batch (rows with their results) goes: called on the worker where it finished.
Sink = Callable[[pa.Table], None]


def temperature(attempt: int, configured: float) -> float:
    """The sampling temperature of an ask: the configured one, sampled for a re-ask.

    >>> temperature(1, 0.0), temperature(2, 0.0)
    (0.0, 0.7)
    """
    return REASK_TEMPERATURE if attempt > 1 else configured


def result_schema(task: LLMTask) -> pa.Schema:
    """The columns the layer adds to each row."""
    return pa.schema([*task.fields, *STATUS_FIELDS])


def result_row(task: LLMTask, fields: dict | None, status: str, attempts: int, error: str | None,
               tokens_in: int = 0, tokens_out: int = 0) -> dict:
    """The result columns of one row, in the order of `result_schema`."""
    fields = fields or {}
    return {**{f.name: fields.get(f.name) for f in task.fields}, C.STATUS: status, C.ATTEMPTS: attempts,
            C.ERROR: error, C.TOKENS_IN: tokens_in, C.TOKENS_OUT: tokens_out}


def failed(task: LLMTask, attempts: int, error: str, tokens_in: int = 0, tokens_out: int = 0) -> dict:
    """The result of a request that got no usable reply."""
    return result_row(task, None, C.REQUEST_FAILED, attempts, error, tokens_in, tokens_out)


def reply_result(task: LLMTask, row: dict, reply: Reply, attempts: int, tokens_in: int, tokens_out: int) -> dict:
    """The result of a reply that came back: ok, or parse_failed with the task's reason."""
    fields, problem = task.read(row, reply)
    status = C.OK if problem is None else C.PARSE_FAILED
    return result_row(task, fields, status, attempts, problem, tokens_in, tokens_out)


def with_results(batch: pa.Table, task: LLMTask, results: list[dict], progress=None, sink: Sink | None = None) -> pa.Table:
    """`batch` with the result columns appended (results are in the batch's row order), handed to
    `sink` when there is one (then only the batch's counts are returned)."""
    table = pa.Table.from_pylist(results, schema=result_schema(task))
    for name in table.column_names:
        if name in batch.column_names:
            batch = batch.drop_columns([name])
        batch = batch.append_column(table.schema.field(name), table[name])
    if sink is not None:
        sink(batch)  # counted below only once it is saved
    if progress is not None:
        progress.add(table)
    return batch if sink is None else pa.table({"rows": [batch.num_rows]})


class Results(Protocol):
    """Where a stage's results go, and what the layer asks of them between passes. The stage
    supplies one (see `store.parts.PartResults`); the engines write to it from the workers."""

    def writer(self, prefix: str = "part") -> Sink:
        """A sink (picklable, called on workers) that saves each finished batch as a new part
        whose name starts with `prefix-`."""
        ...

    def parts(self) -> list[str]:
        """The saved parts."""
        ...

    def remove_parts(self, prefix: str) -> int:
        """Delete the parts whose names start with `prefix-` (what an interrupted collection wrote)."""
        ...

    def ids_to_ask_again(self, retry_failed: bool, reask: bool) -> list[str]:
        """Ids whose best result is a request failure (`retry_failed`) or a first unreadable reply (`reask`)."""
        ...

    def rows(self, ids: list[str]) -> list[pa.Table]:
        """The rows as sent (the stage's columns, not the results) of the failed results of `ids`."""
        ...

    def replace(self, ids: list[str], round: str, keep_parts: set[str]) -> None:
        """Remove the rows of `ids` that a finished `round` (retry or reask) replaces, but those in
        `keep_parts` (the round's own)."""
        ...


def replaced_by(round: str) -> pc.Expression:
    """The result rows that a finished round replaces: its request failures (retry) or its first
    unreadable replies (reask)."""
    return C.to_ask_again(retry_failed=round == RETRY, reask=round == REASK)


# The passes of the driver: the first over new rows, then the asks again.
FIRST, RETRY, REASK = "first", "retry", "reask"
