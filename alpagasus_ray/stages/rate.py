"""The rating stage: score every row with an LLM grader and keep every row, rated or set aside.

    alpagasus rate --config configs/rate_openai.yaml rate.concurrency=64

The data path is Ray Data from end to end, so the driver holds counts, not rows:
1. a pass over the input on the workers counts it and finds repeated ids (`inputs.scan_input`);
2. the input is read again on the workers, each row normalized and given its final id there;
3. rows whose id is already written (or sent in a request file still running) are skipped (the
   ids, sorted by a Ray task and searched by the readers);
4. rows that cannot be rated are set aside with their reason (`rating`);
5. the rest go through the LLM layer's driver (`llm.driver`): the grader's engine asks them, and
   the worker where a batch finishes writes it as a Parquet part to `<run_dir>/rated/` (local, a
   shared mount, s3:// or gs://); a part is whole or absent. Then, with `rate.retry_failed`, the
   request failures are sent again, and the replies with no score are asked once more.
A kill (of the driver or the whole job) loses the requests in flight and the batches partly done;
rerunning the same command sends only the rest. The summary is counted by scanning the parts into
`<run_dir>/rated_summary.json` (`rate_summary`). Rows in == rows out.
"""

from __future__ import annotations

import logging
import os
import time

import pyarrow as pa
import pyarrow.compute as pc

from alpagasus_ray import columns as C
from alpagasus_ray.config import OPERATIONAL, Config, ConfigError, config_for_record, result_settings
from alpagasus_ray.errors import InputError
from alpagasus_ray.llm import driver
from alpagasus_ray.llm.engines import engine_for
from alpagasus_ray.llm.engines.base import run_to_end
from alpagasus_ray.progress import ROWS_AGAIN, watch
from alpagasus_ray.ray_runtime import ensure_ray
from alpagasus_ray.stages.rate_summary import dry_run_report, summarize
from alpagasus_ray.stages.chat_rating import ConversationRating, TooLong, TurnRating
from alpagasus_ray.stages.rating import LIGHT, RowRating
from alpagasus_ray.store.inputs import input_dataset, scan_input
from alpagasus_ray.store.layout import RunDir, exists, is_dir, join, list_dir, read_json, write_json
from alpagasus_ray.store.parts import PartStore, done_ids, skip_done, token_sums

# The name of the parts that hold the ratings taken from a pilot.
PILOT_PREFIX = "pilot"

log = logging.getLogger(__name__)


def run_rate(config: Config, dry_run: bool = False, detach: bool = False, cancel: bool = False) -> dict:
    """Rate every row of `config.data` into `config.run_dir`; returns the summary.

    With an engine that sends request files (openai_batch, vllm_batch): `detach` returns once every
    request file is sent, with `running_batches` in place of the summary (rerun the same command to
    collect them); `cancel` cancels the run's batches that have not ended and collects what they had
    answered.

    Raises:
        InputError: the input cannot be read, or holds no row that can be rated (nothing was sent).
        ConfigError: the run directory holds ratings made with another grader, dimension or prompt.
    """
    started = time.time()
    cfg = config.rate
    engine = engine_for(cfg, RunDir(config.run_dir).batches)
    if (detach or cancel) and not engine.sends_files:
        raise ConfigError(f"--detach and --cancel are for the backends that send request files (openai_batch, "
                          f"vllm_batch), not rate.backend={cfg.backend}")
    if not dry_run:
        engine.check("rate")
    ensure_ray()
    context = engine.context()
    check = TooLong(cfg, engine, context) if context else None
    scan = scan_input(config.data, check)
    plan = rating_plan(config, engine, scan)
    if cancel:
        return {**engine.cancel(plan.task, plan.results), "by_status": plan.store.status_counts()}
    if scan.valid == 0:  # e.g. plain text, or the wrong field names: a stop, not a run
        raise InputError(f"{', '.join(scan.files)}: no row can be rated ({scan.rows:,} rows, none valid), e.g. "
                         + "; ".join(f"{e['source']} ({e['reason']})" for e in scan.invalid_examples))
    grader = engine.name
    for store in plan.stores:
        _check_same_grader(store, grader, cfg.dimension, plan.meta[C.PROMPT_VERSION])
    requests, text_bytes = plan.requests(scan)
    piloted = pilot_ratings(config, plan.results.store)
    if piloted is not None and not dry_run:
        plan.results.store.write(piloted, prefix=PILOT_PREFIX)
        log.info("rate: %s ratings the pilot made with this grader and settings taken as they are (not sent again)",
                 f"{piloted.num_rows:,}")
    before = plan.results.store.status_counts()  # what earlier runs saved: rows, or turns
    asked = sum(before.values()) - sum(before[s] for s in C.SET_ASIDE)
    if piloted is not None and dry_run:
        asked += piloted.num_rows
    log.info("rate: %s rows from %s (%s invalid); %s of %s requests (one per %s) to send to %s", f"{scan.rows:,}",
             ", ".join(scan.files), f"{scan.invalid:,}", f"{max(0, requests - asked):,}", f"{requests:,}",
             plan.unit, grader)
    if scan.repeats:
        rid, sources = next(iter(scan.repeat_sources.items()))
        log.warning("rate: %d ids repeat in the input (e.g. %r at %s); repeats get ids id~2, id~3, ...",
                    len(scan.repeats), rid, ", ".join(sources[:3]))
    if dry_run:
        return dry_run_report(scan, cfg, engine, max(0, requests - asked),
                              text_bytes / requests if requests else 0, plan.prompt_bytes(), context,
                              _spent_tokens(plan.results.store, piloted))

    write_json(RunDir(config.run_dir).rate_config, config_for_record(config))
    engine.cap_spending([plan.results.store], "rate")
    total = requests if plan.unit == "turn" else scan.rows  # the rows set aside count as done too
    with watch("rate", total=total, cost=engine.cost, done=sum(before.values()), unit=plan.unit) as progress:
        for store in plan.stores:
            store.remove_unfinished()  # what a kill left half-written
        rows = input_dataset(config.data, scan.files, scan.repeats, check=check)
        done = done_ids(plan.results.store, engine.in_flight())

        def skip(dataset):
            if done is None:
                return dataset
            return dataset.map_batches(skip_done, fn_kwargs={"done": [done]}, batch_format="pyarrow",
                                       batch_size=None, **LIGHT)

        set_aside = plan.set_aside(skip(rows), progress) if scan.invalid else None
        if set_aside is not None:
            run_to_end(set_aside)
        running = driver.ask(engine, plan.task, plan.to_ask(rows, skip), plan.results, progress=progress,
                             retry_failed=cfg.retry_failed, detach=detach)
    if running:
        return {"running_batches": [{"batch_id": r.batch_id, "status": r.status, "rows": r.rows} for r in running]}
    plan.finish(input_dataset(config.data, scan.files, scan.repeats, check=check), scan)
    counts = progress.final
    sent = counts.get("rows", 0) + counts.get(ROWS_AGAIN, 0) - sum(counts.get(s, 0) for s in C.SET_ASIDE)
    summary = summarize(scan, plan.store, cfg, engine, time.time() - started, sent, plan.meta[C.PROMPT_VERSION],
                        context)
    summary.update(plan.summary(sent))
    if engine.summary() is not None:
        summary["batches"] = engine.summary()
    write_json(RunDir(config.run_dir).rated_summary, summary)
    return summary


def rating_plan(config: Config, engine, scan) -> RowRating:
    """How this input is rated: alpaca rows, or conversations by turn or whole (`rate.unit`)."""
    if not scan.conversations:
        return RowRating(config, engine)
    return TurnRating(config, engine) if config.rate.unit == "turn" else ConversationRating(config, engine)


def _spent_tokens(store, piloted: pa.Table | None) -> tuple[int, int]:
    """The usage saved in `store`, and in the pilot's ratings it is about to take."""
    tokens_in, tokens_out = store.tokens()
    if piloted is not None:
        more_in, more_out = token_sums(piloted)
        tokens_in, tokens_out = tokens_in + more_in, tokens_out + more_out
    return tokens_in, tokens_out


def pilot_ratings(config: Config, store) -> pa.Table | None:
    """The ratings a pilot (`alpagasus rate --pilot`) made into this run directory with the same
    grader and settings as `config.rate`, as rows of `store` (this run's results), with each row's
    source in the input; None when there are none, or they were taken already."""
    run = RunDir(config.run_dir)
    if not is_dir(run.pilot()) or any(os.path.basename(p).startswith(f"{PILOT_PREFIX}-") for p in store.parts()):
        return None
    wanted = result_settings(config.rate)
    for name in list_dir(run.pilot()):
        record = join(run.pilot(name), "rate_config.json")
        if not exists(record):
            continue
        settings = {k: v for k, v in read_json(record)["rate"].items() if k not in OPERATIONAL}
        if settings != wanted:
            continue
        rows = PartStore(join(run.pilot(name), store.uri.rstrip("/").rsplit("/", 1)[-1]), store.schema).read()
        rows = rows.filter(pc.invert(pc.is_in(rows[C.STATUS], pa.array(C.SET_ASIDE))))
        if C.SOURCE in rows.column_names:  # where the row is in the input, not in the sample file
            sources = read_json(run.pilot("sample_sources.json"))
            where = rows.schema.get_field_index(C.SOURCE)
            rows = rows.set_column(where, C.SOURCE, pa.array([sources.get(i) for i in rows[C.ID].to_pylist()], pa.string()))
        return rows if rows.num_rows else None
    return None


def _check_same_grader(store, grader: str, dimension: str, prompt_version: str) -> None:
    for column, wanted in ((C.GRADER, grader), (C.DIMENSION, dimension), (C.PROMPT_VERSION, prompt_version)):
        found = store.values(column) - {wanted}
        if found:
            raise ConfigError(
                f"{store.uri} already holds ratings with {column}={sorted(found)[0]!r}, this run asks for {wanted!r}: "
                "use another run_dir (ratings from different graders are never mixed)"
            )
