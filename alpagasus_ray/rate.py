"""The rating stage: score every row with an LLM grader and keep every row, rated or set aside.

    alpagasus rate --config configs/rate_openai.yaml rate.concurrency=64

Reads `data.path`, sends the rows not yet rated to the backend through Ray Data, and saves each
finished block to `<run_dir>/rated/` as it arrives (write to a temporary name, then rename), so a
killed job loses only what was in flight. Rerunning the same command sends only the rest. At the
end the parts are compacted and `<run_dir>/rated_summary.json` is written. Rows in == rows out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alpagasus_ray import columns as C
from alpagasus_ray.backends import MAX_ASKS, RESULT_SCHEMA, Rating, make_backend, ratings_table
from alpagasus_ray.config import Config, ConfigError, config_for_record
from alpagasus_ray.data import INVALID_REASON, InputError, Rows, read_rows
from alpagasus_ray.layout import RunDir
from alpagasus_ray.ray_runtime import ensure_ray
from alpagasus_ray.prompts import CHARS_PER_TOKEN, PROMPT_VERSION, RATING_SYSTEM, RATING_USER

log = logging.getLogger(__name__)

RATED_SCHEMA = pa.schema([
    (C.ID, pa.string()), (C.INSTRUCTION, pa.string()), (C.INPUT, pa.string()), (C.OUTPUT, pa.string()),
    (C.SCORE, pa.float64()), (C.SCORE_EXPECTED, pa.float64()), (C.STATUS, pa.string()), (C.REVIEW, pa.string()),
    (C.GRADER, pa.string()), (C.DIMENSION, pa.string()), (C.PROMPT_VERSION, pa.string()),
    (C.ATTEMPTS, pa.int32()), (C.ERROR, pa.string()), (C.TOKENS_IN, pa.int64()), (C.TOKENS_OUT, pa.int64()),
    (C.SOURCE, pa.string()),
])


class RatedStore:
    """`<run_dir>/rated/`: Parquet parts written atomically, read back with one row per id."""

    def __init__(self, run_dir: str):
        self.path = RunDir(run_dir).rated

    def write(self, table: pa.Table, prefix: str = "part") -> None:
        """Save `table` as a new part; readers never see a half-written file."""
        os.makedirs(self.path, exist_ok=True)
        name = f"{prefix}-{uuid.uuid4().hex[:12]}.parquet"
        tmp = os.path.join(self.path, f".tmp-{name}")
        pq.write_table(table, tmp)
        os.replace(tmp, os.path.join(self.path, name))

    def parts(self) -> list[str]:
        if not os.path.isdir(self.path):
            return []
        return sorted(
            os.path.join(self.path, n) for n in os.listdir(self.path)
            if n.endswith(".parquet") and not n.startswith((".", "_"))
        )

    def read(self) -> pa.Table:
        """Every rated row so far, one per id, in id order.

        An id can sit in two parts (a rerun of request_failed rows, a Ray task retried after it
        delivered); the better status wins: ok, parse_failed, request_failed, invalid_input.
        """
        tables = [pq.read_table(p, schema=RATED_SCHEMA) for p in self.parts()]
        if not tables:
            return RATED_SCHEMA.empty_table()
        table = pa.concat_tables(tables)
        if table.num_rows == 0:
            return table
        # C.STATUSES lists ok first, so the index of a row's status is its rank.
        rank = pc.index_in(table[C.STATUS], value_set=pa.array(C.STATUSES))
        table = table.append_column("_rank", rank).sort_by(
            [(C.ID, "ascending"), ("_rank", "ascending"), (C.ATTEMPTS, "descending")]
        )
        ids = table[C.ID].combine_chunks()
        first_of_id = pa.concat_arrays([pa.array([True]), pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))])
        table = table.filter(first_of_id)
        return table.drop_columns(["_rank"])

    def compact(self) -> None:
        """Replace the many small parts by one deduplicated file; a kill half-way loses nothing."""
        old = self.parts()
        if len(old) <= 1:
            return
        self.write(self.read().sort_by(C.ID), prefix="data")
        for path in old:
            os.remove(path)


def run_rate(config: Config, dry_run: bool = False) -> dict:
    """Rate every row of `config.data` into `config.run_dir`; returns the summary.

    Raises:
        InputError: the input cannot be read, or holds no row that can be rated (nothing was sent).
        ConfigError: the run directory holds ratings made with another grader, dimension or prompt.
    """
    started = time.time()
    cfg = config.rate
    rows = read_rows(config.data)
    if rows.num_invalid == rows.table.num_rows:  # e.g. plain text, or the wrong field names: a stop, not a run
        first = rows.table.slice(0, 3).to_pylist()
        raise InputError(f"{', '.join(rows.files)}: no row can be rated ({rows.num_invalid:,} rows, none valid), e.g. "
                         + "; ".join(f"{r[C.SOURCE]} ({r[INVALID_REASON]})" for r in first))
    store = RatedStore(config.run_dir)
    grader = f"{cfg.backend}:{cfg.model}"
    done = store.read()
    _check_same_grader(done, grader, cfg.dimension, store.path)
    final = set(pc.filter(done[C.ID], _final_mask(done, cfg.retry_failed)).to_pylist())
    pending = rows.table.filter(pc.invert(pc.is_in(rows.table[C.ID], pa.array(list(final), pa.string()))))
    invalid = pending.filter(pc.is_valid(pending[INVALID_REASON]))
    valid = pending.filter(pc.is_null(pending[INVALID_REASON]))
    log.info(
        "rate: %s rows from %s (%s invalid, %s already rated); %s to send to %s",
        f"{rows.table.num_rows:,}", ", ".join(rows.files), f"{rows.num_invalid:,}", f"{len(final):,}",
        f"{valid.num_rows:,}", grader,
    )
    if rows.duplicate_ids:
        first = next(iter(rows.duplicate_ids.items()))
        log.warning("rate: %d ids repeat in the input (e.g. %r at %s); repeats get ids id~2, id~3, ...",
                    len(rows.duplicate_ids), first[0], ", ".join(first[1][:3]))
    if dry_run:
        return _dry_run_report(rows, valid, cfg)

    os.makedirs(config.run_dir, exist_ok=True)
    with open(RunDir(config.run_dir).rate_config, "w") as f:
        json.dump(config_for_record(config), f, indent=2)
    meta = {C.GRADER: grader, C.DIMENSION: cfg.dimension, C.PROMPT_VERSION: PROMPT_VERSION}
    if invalid.num_rows:
        ratings = [Rating(i, C.INVALID_INPUT, error=r) for i, r in
                   zip(invalid[C.ID].to_pylist(), invalid[INVALID_REASON].to_pylist())]
        store.write(_rated_rows(invalid, ratings_table(ratings), meta))
    if valid.num_rows:
        _rate_rows(valid, cfg, store, meta)
    store.compact()
    summary = _summarize(rows, store.read(), cfg, time.time() - started, valid.num_rows)
    with open(RunDir(config.run_dir).rated_summary, "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _rate_rows(valid: pa.Table, cfg, store: RatedStore, meta: dict) -> None:
    """Send `valid` through the backend and save each finished block as it arrives."""
    import ray

    ensure_ray()
    backend = make_backend(cfg)
    # One block per batch, so each is saved as soon as it is rated rather than with a large block.
    needed = valid.select([C.ID, C.INSTRUCTION, C.INPUT, C.OUTPUT])
    dataset = ray.data.from_arrow([needed.slice(i, cfg.batch_size) for i in range(0, needed.num_rows, cfg.batch_size)])
    position = {rid: i for i, rid in enumerate(valid[C.ID].to_pylist())}
    reask = _save_as_they_come(backend.rate(dataset), valid, position, store, meta)
    if reask:
        # Backends that cannot re-ask inside a request (vLLM) get the unparseable rows once more.
        log.info("rate: asking again for %d rows whose reply had no score", len(reask))
        again = valid.take(pa.array(sorted(position[i] for i in reask))).select(needed.column_names)
        _save_as_they_come(backend.rate(ray.data.from_arrow(again), reask=True), valid, position, store, meta)


def _save_as_they_come(results_ds, valid: pa.Table, position: dict, store: "RatedStore", meta: dict) -> list[str]:
    """Consume a backend's results, saving each block as it arrives; returns ids to ask again."""
    done, counts, last_report, start = 0, Counter(), time.time(), time.time()
    reask = []
    for results in results_ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if results.num_rows == 0:
            continue
        results = results.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA)
        rows = valid.take(pa.array([position[i] for i in results[C.ID].to_pylist()]))
        store.write(_rated_rows(rows, results, meta))
        done += results.num_rows
        counts.update(results[C.STATUS].to_pylist())
        first_ask_failed = pc.and_(pc.equal(results[C.STATUS], C.PARSE_FAILED), pc.less(results[C.ATTEMPTS], MAX_ASKS))
        reask += pc.filter(results[C.ID], first_ask_failed).to_pylist()
        if time.time() - last_report > 10:
            last_report = time.time()
            log.info("rate: %s rows done (%.1f rows/s) %s", f"{done:,}", done / (last_report - start), dict(counts))
    log.info("rate: %s rows done %s", f"{done:,}", dict(counts))
    return reask


def _rated_rows(rows: pa.Table, results: pa.Table, meta: dict) -> pa.Table:
    """Output rows: the input row's text and source beside its rating, matched by id."""
    assert rows[C.ID].equals(results[C.ID]), "ratings must be aligned to rows by id"
    n = rows.num_rows
    columns = {
        C.ID: rows[C.ID], C.INSTRUCTION: rows[C.INSTRUCTION], C.INPUT: rows[C.INPUT], C.OUTPUT: rows[C.OUTPUT],
        C.SCORE: results[C.SCORE], C.SCORE_EXPECTED: results[C.SCORE_EXPECTED], C.STATUS: results[C.STATUS],
        C.REVIEW: results[C.REVIEW], C.ATTEMPTS: results[C.ATTEMPTS], C.ERROR: results[C.ERROR],
        C.TOKENS_IN: results[C.TOKENS_IN], C.TOKENS_OUT: results[C.TOKENS_OUT], C.SOURCE: rows[C.SOURCE],
        **{k: pa.array([v] * n, pa.string()) for k, v in meta.items()},
    }
    return pa.table({f.name: columns[f.name] for f in RATED_SCHEMA}, schema=RATED_SCHEMA)


def _final_mask(done: pa.Table, retry_failed: bool):
    """Rows not to send again: all but unparseable first asks (and request failures on request)."""
    final = pc.invert(pc.and_(pc.equal(done[C.STATUS], C.PARSE_FAILED), pc.less(done[C.ATTEMPTS], MAX_ASKS)))
    if retry_failed:
        final = pc.and_(final, pc.not_equal(done[C.STATUS], C.REQUEST_FAILED))
    return final


def _check_same_grader(done: pa.Table, grader: str, dimension: str, where: str) -> None:
    for column, wanted in ((C.GRADER, grader), (C.DIMENSION, dimension), (C.PROMPT_VERSION, PROMPT_VERSION)):
        found = set(done[column].unique().to_pylist()) - {wanted}
        if found:
            raise ConfigError(
                f"{where} already holds ratings with {column}={sorted(found)[0]!r}, this run asks for {wanted!r}: "
                "use another run_dir (ratings from different graders are never mixed)"
            )


def _dry_run_report(rows: Rows, valid: pa.Table, cfg) -> dict:
    fixed = len(RATING_SYSTEM) + len(RATING_USER.format(dimension=cfg.dimension))
    text_chars = sum(pc.sum(pc.utf8_length(valid[c])).as_py() or 0 for c in C.TEXT_FIELDS)
    prompt_tokens = math.ceil((text_chars + fixed * valid.num_rows) / CHARS_PER_TOKEN)
    report = {
        "rows_in": rows.table.num_rows,
        "invalid_input": rows.num_invalid,
        "to_send": valid.num_rows,
        "prompt_tokens_estimate": prompt_tokens,
        "completion_tokens_at_most": valid.num_rows * cfg.max_tokens,
        "cost_usd_at_most": cfg.cost(prompt_tokens, valid.num_rows * cfg.max_tokens),
    }
    return report


def _summarize(rows: Rows, rated: pa.Table, cfg, seconds: float, sent: int) -> dict:
    ids_in = set(rows.table[C.ID].to_pylist())
    ids_out = set(rated[C.ID].to_pylist())
    if ids_in != ids_out:
        missing = sorted(ids_in - ids_out)[:10]
        raise RuntimeError(f"rows in != rows out: {len(ids_in - ids_out)} rows have no rating (e.g. {missing})")
    statuses = Counter(rated[C.STATUS].to_pylist())
    tokens_in = pc.sum(rated[C.TOKENS_IN]).as_py() or 0
    tokens_out = pc.sum(rated[C.TOKENS_OUT]).as_py() or 0
    ok = rated.filter(pc.equal(rated[C.STATUS], C.OK))
    not_ok = rated.filter(pc.not_equal(rated[C.STATUS], C.OK)).slice(0, 20)
    return {
        "rows_in": rows.table.num_rows,
        "rows_out": rated.num_rows,
        "by_status": {s: statuses.get(s, 0) for s in C.STATUSES},
        "grader": f"{cfg.backend}:{cfg.model}",
        "dimension": cfg.dimension,
        "prompt_version": PROMPT_VERSION,
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "cost_usd": cfg.cost(tokens_in, tokens_out) if cfg.backend == "openai" else None,
        "wall_seconds": round(seconds, 2),
        "rows_sent_this_run": sent,
        "score_histogram": {f"{k:g}": v for k, v in sorted(Counter(ok[C.SCORE].to_pylist()).items())},
        "duplicate_ids": {"count": len(rows.duplicate_ids), "examples": dict(list(rows.duplicate_ids.items())[:20])},
        "not_ok_examples": [
            {"id": i, "status": s, "source": src, "error": e}
            for i, s, src, e in zip(not_ok[C.ID].to_pylist(), not_ok[C.STATUS].to_pylist(),
                                     not_ok[C.SOURCE].to_pylist(), not_ok[C.ERROR].to_pylist())
        ],
        "input_files": rows.files,
    }

