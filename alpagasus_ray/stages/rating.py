"""The rating task and the rated row: what a row asks the grader (the paper's Fig. 4 prompt), how the
reply is read, and what is stored of each row, rated or set aside (`store.rated.RATED_SCHEMA`).

Every function here that takes a batch runs on the workers (Ray Data `map_batches`).
"""

from __future__ import annotations

import functools

import pyarrow as pa
import pyarrow.compute as pc

from alpagasus_ray import columns as C
from alpagasus_ray.config import RateConfig
from alpagasus_ray.llm.engines import Engine
from alpagasus_ray.llm.task import Reply, Request
from alpagasus_ray.rules.prompts import (
    PROMPT_VERSION,
    SCORE_CHOICES,
    expected_score,
    parse_score,
    prompt_version,
    rating_messages,
)
from alpagasus_ray.rules.injection import suspect
from alpagasus_ray.llm.results import PartResults
from alpagasus_ray.store.inputs import INVALID_REASON, SET_ASIDE_STATUS
from alpagasus_ray.store.parts import PartWriter
from alpagasus_ray.store.rated import RATED_SCHEMA, RatedStore

# What the LLM layer is given of a row.
SENT_COLUMNS = [C.ID, C.INSTRUCTION, C.INPUT, C.OUTPUT, C.SOURCE]
# Ray resources of the light steps around the LLM (filters, writes). Ray Data's own filter and
# projection tasks take a whole CPU, which a vLLM engine on a two-core node leaves no room for.
LIGHT = {"num_cpus": 0.1}


class RatingTask:
    """The rating prompt (the paper's Fig. 4) and its reader, for the LLM layer."""

    fields = pa.schema([(C.SCORE, pa.float64()), (C.SCORE_EXPECTED, pa.float64()), (C.REVIEW, pa.string())])
    chat = True

    def __init__(self, cfg: RateConfig, engine: Engine):
        self.cfg = cfg
        # Only an engine that constrains replies can be held to the scores alone; its logprobs
        # are then a distribution over the allowed scores.
        self.constrained = engine.constrains and cfg.constrained

    def messages(self, row: dict) -> list[dict]:
        return rating_messages(row[C.INSTRUCTION], row[C.INPUT], row[C.OUTPUT], self.cfg.dimension, self.cfg.fence)

    def request(self, row: dict) -> Request:
        cfg = self.cfg
        return Request(
            messages=self.messages(row),
            max_tokens=4 if self.constrained else cfg.max_tokens,
            top_logprobs=cfg.top_logprobs if cfg.logprobs else 0,
            constraint={"choice": list(SCORE_CHOICES)} if self.constrained else None,
        )

    def read(self, row: dict, reply: Reply) -> tuple[dict, str | None]:
        parsed = parse_score(reply.text)
        if parsed.score is None:
            return {C.REVIEW: parsed.review}, parsed.error
        expected = expected_score(reply.positions) if reply.positions else None
        return {C.SCORE: parsed.score, C.SCORE_EXPECTED: expected, C.REVIEW: parsed.review}, None


def rated_rows(batch: pa.Table, meta: dict) -> pa.Table:
    """Output rows: each row's text and source beside its rating, in the columns of RATED_SCHEMA,
    with the pattern that flags a row as talking to the grader (`rules.injection.suspect`)."""
    n = batch.num_rows
    columns = {name: batch[name] for name in batch.column_names}
    columns.update({k: pa.array([v] * n, pa.string()) for k, v in meta.items()})
    columns[C.SUSPECT] = pa.array([suspect([i, x], o) for i, x, o in zip(*(batch[c].to_pylist() for c in C.TEXT_FIELDS))],
                                  pa.string())
    return pa.table({f.name: columns[f.name] for f in RATED_SCHEMA}, schema=RATED_SCHEMA)


def rating_meta(cfg: RateConfig) -> dict:
    """What every rated row records of the rating that made it (a run directory never mixes them)."""
    return {C.GRADER: f"{cfg.backend}:{cfg.model}", C.DIMENSION: cfg.dimension,
            C.PROMPT_VERSION: prompt_version(PROMPT_VERSION, cfg.fence)}


def set_aside_dataset(rows, store, to_stored, progress):
    """The rows of `rows` that cannot be rated, written to `store` as `to_stored` makes them
    by the workers (a Dataset of one row of counts per batch)."""
    sink = PartWriter(store.uri, store.schema, to_stored)
    return rows.map_batches(_set_aside_rows, fn_kwargs={"sink": sink, "progress": progress},
                            batch_format="pyarrow", batch_size=None, **LIGHT)


def set_aside_rows(batch: pa.Table, meta: dict) -> pa.Table:
    """Rows that cannot be rated, as rated rows with the status they were set aside with
    (invalid_input, too_long) and the reason."""
    n = batch.num_rows
    results = {
        C.SCORE: pa.nulls(n, pa.float64()), C.SCORE_EXPECTED: pa.nulls(n, pa.float64()),
        C.STATUS: batch[SET_ASIDE_STATUS], C.REVIEW: pa.array([""] * n, pa.string()),
        C.ATTEMPTS: pa.array([0] * n, pa.int32()), C.ERROR: batch[INVALID_REASON],
        C.TOKENS_IN: pa.array([0] * n, pa.int64()), C.TOKENS_OUT: pa.array([0] * n, pa.int64()),
    }
    table = batch.select([C.ID, C.INSTRUCTION, C.INPUT, C.OUTPUT, C.SOURCE])
    for name, values in results.items():
        table = table.append_column(name, values)
    return rated_rows(table, meta)


def rows_to_send(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch[INVALID_REASON])).select(SENT_COLUMNS)


def _set_aside_rows(batch: pa.Table, sink, progress=None) -> pa.Table:
    """Write the rows set aside; one row of counts comes out, as from the LLM layer."""
    batch = batch.filter(pc.is_valid(batch[INVALID_REASON]))
    sink(batch)
    if progress is not None:
        progress.add(pa.table({C.STATUS: batch[SET_ASIDE_STATUS]}))
    return pa.table({"rows": [batch.num_rows]})


class RowRating:
    """How rating one kind of row goes, for the rating stage: alpaca rows here, one request per
    row; conversations in `chat_rating`. The stage reads the input, skips what is done, sets aside
    what cannot be rated, hands the rest to the LLM layer, then calls `finish`."""

    unit = "row"  # what the LLM layer counts

    def __init__(self, config, engine: Engine):
        self.cfg = config.rate
        self.store = RatedStore(config.run_dir)
        self.task = RatingTask(self.cfg, engine)
        self.meta = rating_meta(self.cfg)
        self.results = PartResults(self.store, SENT_COLUMNS, functools.partial(rated_rows, meta=self.meta))

    @property
    def stores(self) -> list:
        """The stores this rating writes: every row in them comes from one grader, dimension and prompt."""
        return [self.store]

    def requests(self, scan) -> tuple[int, int]:
        """Requests the input makes, and the characters of text they carry (besides the prompt's own)."""
        return scan.valid, scan.text_bytes

    def prompt_bytes(self) -> int:
        """UTF-8 bytes of the prompt's own text in each request."""
        empty = {C.INSTRUCTION: "", C.INPUT: "", C.OUTPUT: ""}
        return sum(len(m["content"].encode("utf-8")) for m in self.task.messages(empty))

    def set_aside(self, rows, progress):
        """A Dataset writing the rows that cannot be rated (None: `finish` writes them)."""
        return set_aside_dataset(rows, self.store, functools.partial(set_aside_rows, meta=self.meta), progress)

    def to_ask(self, rows, skip):
        """The LLM layer's rows from the input's rows not yet done (`skip` drops the done ids)."""
        return skip(rows).map_batches(rows_to_send, batch_format="pyarrow", batch_size=None, **LIGHT)

    def finish(self, rows, scan) -> None:
        """Called with the whole input (and its scan) once the LLM layer is done."""

    def summary(self, sent: int) -> dict:
        """What the summary adds or replaces for this kind of row (`sent`: requests sent this run)."""
        return {}
