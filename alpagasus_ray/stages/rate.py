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

import functools
import logging
import time

from alpagasus_ray import columns as C
from alpagasus_ray.config import Config, ConfigError, config_for_record
from alpagasus_ray.errors import InputError
from alpagasus_ray.llm import driver
from alpagasus_ray.llm.engines import engine_for
from alpagasus_ray.llm.engines.base import run_to_end
from alpagasus_ray.llm.results import PartResults
from alpagasus_ray.progress import watch
from alpagasus_ray.ray_runtime import ensure_ray
from alpagasus_ray.rules.prompts import PROMPT_VERSION
from alpagasus_ray.stages.rate_summary import dry_run_report, summarize
from alpagasus_ray.stages.rating import (
    LIGHT,
    SENT_COLUMNS,
    RatingTask,
    rated_rows,
    rating_meta,
    rows_to_send,
    set_aside_dataset,
)
from alpagasus_ray.store.inputs import input_dataset, scan_input
from alpagasus_ray.store.layout import RunDir, write_json
from alpagasus_ray.store.parts import done_ids, skip_done
from alpagasus_ray.store.rated import RatedStore

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
    store = RatedStore(config.run_dir)
    meta = rating_meta(cfg)
    results = PartResults(store, SENT_COLUMNS, functools.partial(rated_rows, meta=meta))
    if cancel:
        return {**engine.cancel(RatingTask(cfg, engine), results), "by_status": store.status_counts()}
    scan = scan_input(config.data)
    if scan.valid == 0:  # e.g. plain text, or the wrong field names: a stop, not a run
        raise InputError(f"{', '.join(scan.files)}: no row can be rated ({scan.rows:,} rows, none valid), e.g. "
                         + "; ".join(f"{e['source']} ({e['reason']})" for e in scan.invalid_examples))
    if scan.conversations:
        raise InputError(f"{scan.files[0]}: conversations are read, but this version rates alpaca rows only")
    grader = engine.name
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
        return dry_run_report(scan, cfg, engine, before)

    write_json(RunDir(config.run_dir).rate_config, config_for_record(config))
    with watch("rate", total=scan.rows, cost=engine.cost, done=rated_before) as progress:
        store.remove_unfinished()
        rows = input_dataset(config.data, scan.files, scan.repeats)
        done = done_ids(store, engine.in_flight())
        if done is not None:
            rows = rows.map_batches(skip_done, fn_kwargs={"done": [done]}, batch_format="pyarrow", batch_size=None,
                                    **LIGHT)
        if scan.invalid:
            run_to_end(set_aside_dataset(rows, store, meta, progress))
        valid = rows.map_batches(rows_to_send, batch_format="pyarrow", batch_size=None, **LIGHT)
        running = driver.ask(engine, RatingTask(cfg, engine), valid, results, progress=progress,
                             retry_failed=cfg.retry_failed, detach=detach)
    if running:
        return {"running_batches": [{"batch_id": r.batch_id, "status": r.status, "rows": r.rows} for r in running]}
    counts = progress.final
    sent = counts.get("rows", 0) - counts.get(C.INVALID_INPUT, 0)
    summary = summarize(scan, store, cfg, engine, time.time() - started, sent)
    if engine.summary() is not None:
        summary["batches"] = engine.summary()
    write_json(RunDir(config.run_dir).rated_summary, summary)
    return summary


def _check_same_grader(store: RatedStore, grader: str, dimension: str) -> None:
    for column, wanted in ((C.GRADER, grader), (C.DIMENSION, dimension), (C.PROMPT_VERSION, PROMPT_VERSION)):
        found = store.values(column) - {wanted}
        if found:
            raise ConfigError(
                f"{store.uri} already holds ratings with {column}={sorted(found)[0]!r}, this run asks for {wanted!r}: "
                "use another run_dir (ratings from different graders are never mixed)"
            )


