"""Rating through a batch backend (openai_batch, vllm_batch): the rows go out as request files
(`backends.batches`) and come back as the same rated rows as the synchronous backends give, with
the same statuses, re-ask and summary.

    alpagasus rate --config configs/rate_openai_batch.yaml              submit, wait, collect
    alpagasus rate --config configs/rate_openai_batch.yaml --detach     exit once submitted
    alpagasus rate --config configs/rate_openai_batch.yaml --cancel     cancel, keep what finished

One pass (`rate_in_batches`):
1. the input is read on the workers, rows already rated or sent in a batch still running are
   skipped, rows that cannot be rated are set aside, and each of the rest gets its request line;
   the driver writes them into request files as they stream by;
2. every request file not yet sent is uploaded and its batch created;
3. the batches are polled; each one that ends is collected into rated parts;
4. with `rate.retry_failed`, the rows that ended request_failed go out again in a new batch;
5. rows whose reply had no score are asked once more: in a small batch, or with `rate.reask=sync`
   through the synchronous API.
A rerun (after `--detach`, or a kill) starts again at 1 and finds the rest in the run directory:
nothing is written or sent twice.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from alpagasus_ray import columns as C
from alpagasus_ray.backends.batches import (
    BatchRecord, BatchStore, add_requests, batch_client, collect, follow, write_requests,
)
from alpagasus_ray.config import Config
from alpagasus_ray.data import InputScan, input_dataset
from alpagasus_ray.layout import RunDir
from alpagasus_ray.llm_map import run_to_end, small_blocks
from alpagasus_ray.progress import batch_counts
from alpagasus_ray.rated import RATED_SCHEMA, RatedStore, ask_again_filter, done_ids, skip_done

log = logging.getLogger(__name__)


def rate_in_batches(config: Config, scan: InputScan, store: RatedStore, meta: dict, progress, *,
                    detach: bool = False) -> list[BatchRecord]:
    """Rate the rows of `config.data` not yet rated, through request files (see the module
    docstring). Returns the records of the batches still running: none unless `detach`."""
    from alpagasus_ray.rate import LIGHT, RatingTask, SENT_COLUMNS, _ask_again, _rows_to_send, set_aside_dataset

    cfg = config.rate
    batches = BatchStore(RunDir(config.run_dir).batches)
    batches.remove_unrecorded()
    client = batch_client(cfg, batches)
    task = RatingTask(cfg)
    followed = _Answered(progress)

    # 1. New rows: skip what is rated or already in a request file, set aside what cannot be rated.
    waiting = [r for r in batches.records() if not r.collected]
    done = done_ids(config.run_dir, (batches.uri, [batches.file(f"{r.name}.rows.parquet") for r in waiting]))
    rows = input_dataset(config.data, scan.files, scan.repeats)
    if done is not None:
        rows = rows.map_batches(skip_done, fn_kwargs={"done": [done]}, batch_format="pyarrow", batch_size=None, **LIGHT)
    if scan.invalid:
        run_to_end(set_aside_dataset(rows, config.run_dir, meta, progress))
    requests = rows.map_batches(_rows_to_send, batch_format="pyarrow", batch_size=None, **LIGHT).map_batches(
        add_requests, fn_kwargs={"task": task, "endpoint": cfg, "attempts": 1}, batch_format="pyarrow",
        batch_size=None, **LIGHT)
    small_blocks(requests)  # the driver writes the request lines a block at a time
    new = write_requests(batches, requests.iter_batches(batch_size=None, batch_format="pyarrow"), cfg, "first", 1)
    if new:
        log.info("rate: %s rows written into %d request files", f"{sum(r.rows for r in new):,}", len(new))

    retried = reasked = False
    while True:
        # 2-3. Send what is not sent, follow every batch not collected, collect each as it ends.
        open_records = [r for r in batches.records() if not r.collected]
        for record in open_records:
            if record.batch_id is None and not record.ended:
                client.submit(record)
                log.info("rate: request file %s (%s rows) sent as batch %s", record.name, f"{record.rows:,}",
                         record.batch_id or "(run here)")
        collect_one = functools.partial(_collect, client, batches, store, task, meta, progress)
        running = follow(client, open_records, cfg, collect_one, once=detach,
                         on_poll=lambda: followed.update(open_records))
        if running:
            return running
        _settle(batches, store)
        # 4-5. A new round for the rows that failed, once per run of the command.
        if cfg.retry_failed and not retried:
            retried = True
            if _new_round(batches, store, cfg, task, "retry", store.ids_to_ask_again(retry_failed=True, reask=False),
                          SENT_COLUMNS):
                continue
        if not reasked:
            reasked = True
            ids = store.ids_to_ask_again(retry_failed=False, reask=True)
            if ids and cfg.reask == "sync":
                _ask_again(store, cfg.model_copy(update={"backend": "openai"}), meta, progress, ids, reask=True)
            elif _new_round(batches, store, cfg, task, "reask", ids, SENT_COLUMNS):
                continue
        return []


def cancel_batches(config: Config) -> dict:
    """Cancel the run's batches that have not ended, wait for them to stop, and collect what they
    had answered (the rest: request_failed, `rate.retry_failed=true` sends them again)."""
    from alpagasus_ray.rate import RatingTask, rating_meta

    cfg = config.rate
    batches = BatchStore(RunDir(config.run_dir).batches)
    client = batch_client(cfg, batches)
    store = RatedStore(config.run_dir)
    meta = rating_meta(cfg)
    open_records = [r for r in batches.records() if not r.collected]
    for record in open_records:
        if record.batch_id is None:  # written, never sent: nothing to cancel at the API
            record.status = "cancelled"
            batches.save(record)
        elif not record.ended:
            client.cancel(record)
            log.info("rate: cancelling batch %s (request file %s)", record.batch_id, record.name)
    follow(client, open_records, cfg, functools.partial(_collect, client, batches, store, RatingTask(cfg), meta, None))
    _settle(batches, store)
    return {"cancelled": sum(r.status == "cancelled" for r in open_records),
            "ended_before": sum(r.status != "cancelled" for r in open_records),
            "by_status": store.status_counts()}


def batch_summary(config: Config) -> dict:
    """The run's request files and batches, by state (for the rating summary)."""
    records = BatchStore(RunDir(config.run_dir).batches).records()
    timed = [r for r in records if r.collect_seconds]
    seconds = sum(r.collect_seconds for r in timed)
    return {"request_files": len(records), "by_status": dict(Counter(r.status for r in records)),
            "batch_ids": [r.batch_id for r in records if r.batch_id],
            "collected_rows_per_second": round(sum(r.rows for r in timed) / seconds, 1) if seconds else None}


def _collect(client, batches: BatchStore, store: RatedStore, task, meta: dict, progress, record: BatchRecord) -> None:
    """Collect an ended batch into rated parts named after its request file (what an interrupted
    collection of it wrote is removed first), then mark it collected."""
    from alpagasus_ray.rate import _rated_rows

    prefix = f"batch{record.name}"
    store.remove_parts(prefix)

    def save(table: pa.Table) -> None:
        store.write(_rated_rows(table, meta), prefix=prefix)
        if progress is not None:  # the rows were counted from the batch's own counts
            progress.add_counts({k: v for k, v in batch_counts(table).items() if k != "rows"})

    started = time.time()
    problems = collect(client, batches, record, task, save)
    record.collected, record.collect_seconds = True, round(time.time() - started, 3)
    batches.save(record)
    log.info("rate: batch %s (request file %s) %s, collected%s", record.batch_id, record.name, record.status,
             "".join(f", {v:,} {k.replace('_', ' ')}" for k, v in problems.items() if v))


def _settle(batches: BatchStore, store: RatedStore) -> None:
    """Remove the rows that a collected retry or re-ask round replaces."""
    for record in batches.records():
        if record.round == "first" or not record.collected or record.settled:
            continue
        ids = batches.rows(record, [C.ID])[C.ID].to_pylist()
        replaced = ask_again_filter(retry_failed=record.round == "retry", reask=record.round == "reask")
        mine = {p for p in store.parts() if p.rsplit("/", 1)[-1].startswith(f"batch{record.name}-")}
        store.drop_rows(ids, replaced, keep_parts=mine)
        record.settled = True
        batches.save(record)


def _new_round(batches: BatchStore, store: RatedStore, cfg, task, round: str, ids: list[str],
               columns: list[str]) -> list[BatchRecord]:
    """Write request files for `ids` (failures: few rows) from their rated rows."""
    if not ids:
        return []
    attempts = 2 if round == "reask" else 1
    wanted = pc.field(C.ID).isin(ids) & (pc.field(C.STATUS) != C.OK)
    schema = pa.schema([RATED_SCHEMA.field(n) for n in columns])
    rows = (add_requests(pa.Table.from_batches([b], schema=schema), task, cfg, attempts)
            for b in store.batches(columns, wanted) if b.num_rows)
    records = write_requests(batches, rows, cfg, round, attempts)
    what = "whose request failed" if round == "retry" else "whose reply had no score"
    log.info("rate: asking again for %s rows %s, in %d request files", f"{len(ids):,}", what, len(records))
    return records


class _Answered:
    """Feeds the progress bar the rows the batches have answered, from their own counts."""

    def __init__(self, progress):
        self.progress = progress
        self.shown: dict[int, int] = {}

    def update(self, records: list[BatchRecord]) -> None:
        if self.progress is None:
            return
        more = 0
        for record in records:
            more += record.answered - self.shown.get(record.number, 0)
            self.shown[record.number] = record.answered
        if more:
            self.progress.add_counts({"rows": more})
