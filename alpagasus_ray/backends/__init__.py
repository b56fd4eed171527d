"""The two ways to call a model, shared by the rating, generation and judging stages.

`openai_api` holds the Ray Data actors that call an OpenAI-compatible API (slots, the shared
RPM/TPM limiter, Retry-After pauses, the ask-again loop); `vllm_engine` builds the Ray Data LLM
processors on vLLM engines. This module holds the rating stage's side: the `Backend` interface
chosen by `rate.backend`, which turns a Ray Dataset of rows (id, instruction, input, output) into
a Dataset of `Rating`s (the columns of `RESULT_SCHEMA`), one per row, joined back to its row by id.
Heavy imports (vllm, openai) stay inside the backend modules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Protocol

import pyarrow as pa

from alpagasus_ray import columns as C
from alpagasus_ray.config import RateConfig
from alpagasus_ray.prompts import ParsedScore

if TYPE_CHECKING:
    import ray.data

# Asks per row: a reply with no readable score is asked once more, then kept as parse_failed.
MAX_ASKS = 2

RESULT_SCHEMA = pa.schema([
    (C.ID, pa.string()),
    (C.STATUS, pa.string()),
    (C.SCORE, pa.float64()),
    (C.SCORE_EXPECTED, pa.float64()),
    (C.REVIEW, pa.string()),
    (C.ATTEMPTS, pa.int32()),
    (C.ERROR, pa.string()),
    (C.TOKENS_IN, pa.int64()),
    (C.TOKENS_OUT, pa.int64()),
])


@dataclass
class Rating:
    """The outcome for one row. `score` is set exactly when `status` is ok."""

    id: str
    status: str
    score: float | None = None
    score_expected: float | None = None
    review: str = ""
    attempts: int = 0
    error: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0


def rating_from_reply(row_id: str, parsed: ParsedScore, expected: float | None, **counts) -> Rating:
    """A Rating from a parsed reply: ok with its score, or parse_failed with the parser's reason."""
    if parsed.score is None:
        return Rating(row_id, C.PARSE_FAILED, review=parsed.review, error=parsed.error, **counts)
    return Rating(row_id, C.OK, parsed.score, expected, parsed.review, **counts)


def ratings_table(ratings: list[Rating]) -> pa.Table:
    """Ratings as an Arrow table with the fixed result schema (no type guessing on all-null columns)."""
    return pa.Table.from_pylist([asdict(r) for r in ratings], schema=RESULT_SCHEMA)


class Backend(Protocol):
    """What the rating stage needs from a grader."""

    def rate(self, rows: "ray.data.Dataset", reask: bool = False) -> "ray.data.Dataset":
        """Rate every row; the result has the columns of RESULT_SCHEMA, one row per input row.

        A backend that can re-ask within a request does so and never returns parse_failed with
        attempts < MAX_ASKS; one that cannot returns it, and is called again with `reask=True`.
        """
        ...


def make_backend(rate: RateConfig) -> Backend:
    """The backend that `rate.backend` names."""
    if rate.backend == "openai":
        from alpagasus_ray.backends.openai_api import OpenAIBackend

        return OpenAIBackend(rate)
    from alpagasus_ray.backends.vllm_engine import VLLMBackend

    return VLLMBackend(rate)
