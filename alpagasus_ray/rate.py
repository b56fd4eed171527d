"""The rating stage: score every row with an LLM grader and keep every row, rated or set aside.

    alpagasus rate --config configs/rate_openai.yaml rate.concurrency=64

The data path is Ray Data from end to end, so the driver holds counts, not rows:
1. a pass over the input on the workers counts it and finds repeated ids (`data.scan_input`);
2. the input is read again on the workers, each row normalized and given its final id there;
3. rows whose id is already written are skipped (the ids of the parts, sorted by a Ray task and
   searched by the readers);
4. the rest go through the LLM layer (`llm_map`); rows that cannot be rated are set aside with
   their reason;
5. the worker where a batch finishes writes it as a Parquet part to `<run_dir>/rated/` (local, a
   shared mount, s3:// or gs://); a part is whole or absent.
A kill (of the driver or the whole job) loses the requests in flight and the batches partly done;
rerunning the same command sends only the rest. Then come the re-ask pass (vLLM) and, with
`rate.retry_failed`, a pass over the request failures; the summary is counted by scanning the
parts into `<run_dir>/rated_summary.json`. Rows in == rows out.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from alpagasus_ray import columns as C
from alpagasus_ray.backends.openai_api import require_key
from alpagasus_ray.config import BATCH_BACKENDS, Config, ConfigError, RateConfig, config_for_record
from alpagasus_ray.data import INVALID_REASON, InputError, InputScan, input_dataset, scan_input
from alpagasus_ray.layout import RunDir, open_filesystem
from alpagasus_ray.llm_map import Reply, Request, llm_map, run_to_end
from alpagasus_ray.progress import watch
from alpagasus_ray.prompts import (
    CHARS_PER_TOKEN, PROMPT_VERSION, RATING_SYSTEM, RATING_USER, SCORE_CHOICES, expected_score, parse_score,
    rating_messages,
)
from alpagasus_ray.rated import RATED_SCHEMA, PartWriter, RatedStore, ask_again_filter, done_ids, skip_done
from alpagasus_ray.ray_runtime import ensure_ray

log = logging.getLogger(__name__)

# What the LLM layer is given of a row.
SENT_COLUMNS = [C.ID, C.INSTRUCTION, C.INPUT, C.OUTPUT, C.SOURCE]
# Ray resources of the light steps around the LLM (filters, writes). Ray Data's own filter and
# projection tasks take a whole CPU, which a vLLM engine on a two-core node leaves no room for.
LIGHT = {"num_cpus": 0.1}
# Bytes of a rating request line besides the prompt's text: custom_id, url, model, sampling fields.
REQUEST_LINE_OVERHEAD = 300


class RatingTask:
    """The rating prompt (the paper's Fig. 4) and its reader, for the LLM layer."""

    fields = pa.schema([(C.SCORE, pa.float64()), (C.SCORE_EXPECTED, pa.float64()), (C.REVIEW, pa.string())])
    chat = True

    def __init__(self, cfg: RateConfig):
        self.cfg = cfg
        self.constrained = cfg.backend == "vllm" and cfg.constrained
        # vLLM: logprobs after the structured-output mask, a distribution over the allowed scores.
        self.engine_kwargs = {"logprobs_mode": "processed_logprobs"} if cfg.backend == "vllm" else {}

    def request(self, row: dict) -> Request:
        cfg = self.cfg
        return Request(
            messages=rating_messages(row[C.INSTRUCTION], row[C.INPUT], row[C.OUTPUT], cfg.dimension),
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


def run_rate(config: Config, dry_run: bool = False, detach: bool = False, cancel: bool = False) -> dict:
    """Rate every row of `config.data` into `config.run_dir`; returns the summary.

    With a batch backend (openai_batch, vllm_batch; see `rate_batch`): `detach` returns once every
    request file is sent, with `running_batches` in place of the summary (rerun the same command to
    collect them); `cancel` cancels the run's batches that have not ended and collects what they had
    answered.

    Raises:
        InputError: the input cannot be read, or holds no row that can be rated (nothing was sent).
        ConfigError: the run directory holds ratings made with another grader, dimension or prompt.
    """
    started = time.time()
    cfg = config.rate
    if (detach or cancel) and cfg.backend not in BATCH_BACKENDS:
        raise ConfigError(f"--detach and --cancel are for the batch backends ({', '.join(BATCH_BACKENDS)}), "
                          f"not rate.backend={cfg.backend}")
    if not dry_run:
        require_key(cfg, "rate")
    ensure_ray()
    if cancel:
        from alpagasus_ray.rate_batch import cancel_batches

        return cancel_batches(config)
    scan = scan_input(config.data)
    if scan.valid == 0:  # e.g. plain text, or the wrong field names: a stop, not a run
        raise InputError(f"{', '.join(scan.files)}: no row can be rated ({scan.rows:,} rows, none valid), e.g. "
                         + "; ".join(f"{e['source']} ({e['reason']})" for e in scan.invalid_examples))
    store = RatedStore(config.run_dir)
    grader = f"{cfg.backend}:{cfg.model}"
    _check_same_grader(store, grader, cfg.dimension)
    before = store.status_counts()
    rated_before = sum(before.values())
    log.info("rate: %s rows from %s (%s invalid, %s already rated); %s to send to %s", f"{scan.rows:,}",
             ", ".join(scan.files), f"{scan.invalid:,}", f"{rated_before:,}",
             f"{max(0, scan.valid - rated_before + before[C.INVALID_INPUT]):,}", grader)
    if scan.repeats:
        rid, sources = next(iter(scan.repeat_sources.items()))
        log.warning("rate: %d ids repeat in the input (e.g. %r at %s); repeats get ids id~2, id~3, ...",
                    len(scan.repeats), rid, ", ".join(sources[:3]))
    if dry_run:
        return _dry_run_report(scan, cfg, before)

    run = RunDir(config.run_dir)
    _write_json(run.rate_config, config_for_record(config))
    meta = rating_meta(cfg)
    running = []
    with watch("rate", total=scan.rows, cost=cfg.cost, done=rated_before) as progress:
        if cfg.backend in BATCH_BACKENDS:  # the retries and re-asks are rounds of batches
            from alpagasus_ray.rate_batch import rate_in_batches

            running = rate_in_batches(config, scan, store, meta, progress, detach=detach)
        else:
            _rate_new_rows(config, scan, store, meta, progress)
            if cfg.retry_failed:
                _ask_again(store, cfg, meta, progress, store.ids_to_ask_again(retry_failed=True, reask=False),
                           reask=False)
            if cfg.backend == "vllm":  # an API re-asks inside the request
                _ask_again(store, cfg, meta, progress, store.ids_to_ask_again(retry_failed=False, reask=True),
                           reask=True)
    if running:
        return {"running_batches": [{"batch_id": r.batch_id, "status": r.status, "rows": r.rows} for r in running]}
    counts = progress.final
    sent = counts.get("rows", 0) - counts.get(C.INVALID_INPUT, 0)
    summary = _summarize(scan, store, cfg, time.time() - started, sent)
    if cfg.backend in BATCH_BACKENDS:
        from alpagasus_ray.rate_batch import batch_summary

        summary["batches"] = batch_summary(config)
    _write_json(run.rated_summary, summary)
    return summary


def _rate_new_rows(config: Config, scan: InputScan, store: RatedStore, meta: dict, progress) -> None:
    """Read, skip what is written, rate or set aside, write: one Ray Data job on the workers."""
    store.remove_unfinished()
    done = done_ids(config.run_dir)
    rows = input_dataset(config.data, scan.files, scan.repeats)
    if done is not None:
        rows = rows.map_batches(skip_done, fn_kwargs={"done": [done]}, batch_format="pyarrow", batch_size=None, **LIGHT)
    sink = PartWriter(config.run_dir, functools.partial(_rated_rows, meta=meta))
    valid = rows.map_batches(_rows_to_send, batch_format="pyarrow", batch_size=None, **LIGHT)
    rated = llm_map(valid, RatingTask(config.rate), config.rate, progress=progress, sink=sink)
    if scan.invalid:
        rated = rated.union(set_aside_dataset(rows, config.run_dir, meta, progress))
    run_to_end(rated)


def _ask_again(store: RatedStore, cfg: RateConfig, meta: dict, progress, ids: list[str], reask: bool) -> None:
    """Rate `ids` once more from their rated rows (a re-ask, or a retry of request failures),
    then remove the rows they replace."""
    import ray

    if not ids:
        return
    what = "whose reply had no score" if reask else "whose request failed"
    log.info("rate: asking again for %s rows %s", f"{len(ids):,}", what)
    old_parts = store.parts()
    # The failures only, read here: a few rows next to the run.
    wanted = pc.field(C.ID).isin(ids) & (pc.field(C.STATUS) != C.OK)
    table = pa.Table.from_batches(list(store.batches(SENT_COLUMNS, wanted)), schema=pa.schema([RATED_SCHEMA.field(n) for n in SENT_COLUMNS]))
    rows = ray.data.from_arrow([table.slice(i, cfg.batch_size) for i in range(0, table.num_rows, cfg.batch_size)])
    sink = PartWriter(store.run_dir, functools.partial(_rated_rows, meta=meta))
    run_to_end(llm_map(rows, RatingTask(cfg), cfg, reask=reask, progress=progress, sink=sink))
    replaced = ask_again_filter(retry_failed=not reask, reask=reask)
    store.drop_rows(ids, replaced, keep_parts=set(store.parts()) - set(old_parts))


def _rated_rows(batch: pa.Table, meta: dict) -> pa.Table:
    """Output rows: each row's text and source beside its rating, in the columns of RATED_SCHEMA."""
    n = batch.num_rows
    columns = {name: batch[name] for name in batch.column_names}
    columns.update({k: pa.array([v] * n, pa.string()) for k, v in meta.items()})
    return pa.table({f.name: columns[f.name] for f in RATED_SCHEMA}, schema=RATED_SCHEMA)


def rating_meta(cfg: RateConfig) -> dict:
    """What every rated row records of the rating that made it (a run directory never mixes them)."""
    return {C.GRADER: f"{cfg.backend}:{cfg.model}", C.DIMENSION: cfg.dimension, C.PROMPT_VERSION: PROMPT_VERSION}


def set_aside_dataset(rows, run_dir: str, meta: dict, progress):
    """The rows of `rows` that cannot be rated, written as invalid_input parts by the workers
    (a Dataset of one row of counts per batch)."""
    sink = PartWriter(run_dir, functools.partial(_set_aside, meta=meta))
    return rows.map_batches(_set_aside_rows, fn_kwargs={"sink": sink, "progress": progress},
                            batch_format="pyarrow", batch_size=None, **LIGHT)


def _set_aside(batch: pa.Table, meta: dict) -> pa.Table:
    """Rows that cannot be rated, as rated rows with status invalid_input and the reason."""
    n = batch.num_rows
    results = {
        C.SCORE: pa.nulls(n, pa.float64()), C.SCORE_EXPECTED: pa.nulls(n, pa.float64()),
        C.STATUS: pa.array([C.INVALID_INPUT] * n, pa.string()), C.REVIEW: pa.array([""] * n, pa.string()),
        C.ATTEMPTS: pa.array([0] * n, pa.int32()), C.ERROR: batch[INVALID_REASON],
        C.TOKENS_IN: pa.array([0] * n, pa.int64()), C.TOKENS_OUT: pa.array([0] * n, pa.int64()),
    }
    table = batch.select([C.ID, C.INSTRUCTION, C.INPUT, C.OUTPUT, C.SOURCE])
    for name, values in results.items():
        table = table.append_column(name, values)
    return _rated_rows(table, meta)


def _rows_to_send(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch[INVALID_REASON])).select(SENT_COLUMNS)


def _set_aside_rows(batch: pa.Table, sink, progress=None) -> pa.Table:
    """Write the rows set aside; one row of counts comes out, as from the LLM layer."""
    batch = batch.filter(pc.is_valid(batch[INVALID_REASON]))
    sink(batch)
    if progress is not None:
        progress.add(pa.table({C.STATUS: pa.array([C.INVALID_INPUT] * batch.num_rows, pa.string())}))
    return pa.table({"rows": [batch.num_rows]})


def _check_same_grader(store: RatedStore, grader: str, dimension: str) -> None:
    for column, wanted in ((C.GRADER, grader), (C.DIMENSION, dimension), (C.PROMPT_VERSION, PROMPT_VERSION)):
        found = store.values(column) - {wanted}
        if found:
            raise ConfigError(
                f"{store.uri} already holds ratings with {column}={sorted(found)[0]!r}, this run asks for {wanted!r}: "
                "use another run_dir (ratings from different graders are never mixed)"
            )


def _dry_run_report(scan: InputScan, cfg: RateConfig, before: dict) -> dict:
    to_send = max(0, scan.valid - (sum(before.values()) - before[C.INVALID_INPUT]))
    fixed = len(RATING_SYSTEM) + len(RATING_USER.format(dimension=cfg.dimension))
    text_chars = scan.text_chars * to_send / scan.valid if scan.valid else 0
    prompt_tokens = math.ceil((text_chars + fixed * to_send) / CHARS_PER_TOKEN)
    report = {
        "rows_in": scan.rows,
        "invalid_input": scan.invalid,
        "to_send": to_send,
        "prompt_tokens_estimate": prompt_tokens,
        "completion_tokens_at_most": to_send * cfg.max_tokens,
        "cost_usd_at_most": cfg.cost(prompt_tokens, to_send * cfg.max_tokens),
    }
    if cfg.backend in BATCH_BACKENDS:
        # A request line is the prompt's text as JSON plus the body's other fields.
        request_bytes = text_chars + (fixed + REQUEST_LINE_OVERHEAD) * to_send
        report["request_files"] = max(math.ceil(to_send / cfg.batch_max_requests),
                                      math.ceil(request_bytes / cfg.batch_max_bytes))
        report["request_bytes_estimate"] = math.ceil(request_bytes)
        report["cost_usd_at_most_synchronous"] = cfg.model_copy(update={"backend": "openai"}).cost(
            prompt_tokens, to_send * cfg.max_tokens)
    return report


def _summarize(scan: InputScan, store: RatedStore, cfg: RateConfig, seconds: float, sent: int) -> dict:
    """The summary, counted by one streaming scan of the parts."""
    statuses, scores, tokens, rows = Counter(), Counter(), Counter(), 0
    not_ok = []
    for batch in store.batches([C.ID, C.STATUS, C.SCORE, C.TOKENS_IN, C.TOKENS_OUT, C.SOURCE, C.ERROR]):
        table = pa.Table.from_batches([batch])
        rows += table.num_rows
        for item in pc.value_counts(table[C.STATUS]).to_pylist():
            statuses[item["values"]] += item["counts"]
        ok = pc.equal(table[C.STATUS], C.OK)
        for item in pc.value_counts(table.filter(ok)[C.SCORE]).to_pylist():
            scores[item["values"]] += item["counts"]
        tokens.update({C.TOKENS_IN: pc.sum(table[C.TOKENS_IN]).as_py() or 0,
                       C.TOKENS_OUT: pc.sum(table[C.TOKENS_OUT]).as_py() or 0})
        if len(not_ok) < 20:
            not_ok += table.filter(pc.invert(ok)).slice(0, 20 - len(not_ok)).to_pylist()
    if rows != scan.rows:
        raise RuntimeError(f"rows in != rows out: {scan.rows:,} rows in the input, {rows:,} rated rows in {store.uri}")
    return {
        "rows_in": scan.rows,
        "rows_out": rows,
        "by_status": {s: statuses.get(s, 0) for s in C.STATUSES},
        "grader": f"{cfg.backend}:{cfg.model}",
        "dimension": cfg.dimension,
        "prompt_version": PROMPT_VERSION,
        "tokens_in": tokens[C.TOKENS_IN],
        "tokens_out": tokens[C.TOKENS_OUT],
        "cost_usd": cfg.cost(tokens[C.TOKENS_IN], tokens[C.TOKENS_OUT]),
        "wall_seconds": round(seconds, 2),
        "rows_sent_this_run": sent,
        "score_histogram": {f"{k:g}": v for k, v in sorted(scores.items())},
        "duplicate_ids": {"count": len(scan.repeats), "examples": scan.repeat_sources},
        "not_ok_examples": [{"id": r[C.ID], "status": r[C.STATUS], "source": r[C.SOURCE], "error": r[C.ERROR]}
                            for r in not_ok],
        "input_files": scan.files,
    }


def _write_json(uri: str, record: dict) -> None:
    fs, path = open_filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(record, indent=2).encode())
