"""Engines that send request files whole (`openai_batch`, `vllm_batch`): the request files, their
records, the collector, and the life cycle they share (`FileEngine`).

The rows of a pass are written as request files (`write_requests`), one JSONL line per row in the
Batch API's format (`custom_id` is the row's id, the body is `wire.body`), beside a Parquet file of
the rows themselves, so the results can be joined back by id. Each request file has a record
(`BatchRecord`) in the engine's directory; the record is the life cycle's memory: a killed driver
reruns, finds what was uploaded, created and collected, and never sends a file twice. The order of
the steps is what makes that hold:
1. the request file and its rows are written, then the record (status `written`);
2. the upload, then the record with the file id;
3. before creating a batch, the batches of the account are searched for one made from that file
   (a kill between the create and the record's save leaves one): found, it is adopted;
4. the record follows the batch's states; once the batch has ended, its output and error files
   are read a chunk at a time into the stage's results (under a name of the record, so a
   collection killed half-way is redone whole), then `collected` is set;
5. a collected retry or re-ask file's rows replace the rows they were asked again for (`settled`).
A row that has no line in either file (an expired or cancelled batch, a failed validation) comes
back as request_failed with the batch's reason; so does a line that cannot be read.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ValidationError

from alpagasus_ray import columns as C
from alpagasus_ray.llm import wire
from alpagasus_ray.llm.context import api_context
from alpagasus_ray.llm.engines.base import Engine
from alpagasus_ray.llm.task import (
    FIRST,
    REASK,
    LLMTask,
    Results,
    failed,
    reply_result,
    temperature,
    with_results,
)
from alpagasus_ray.progress import batch_counts
from alpagasus_ray.rules.budget import usd, worst_case_tokens
from alpagasus_ray.rules.prompts import estimate_tokens
from alpagasus_ray.store.layout import (
    STAGING_PREFIX,
    open_filesystem,
    publish,
    staging_path,
)

log = logging.getLogger(__name__)

# A batch in one of these states changes no more.
ENDED = ("completed", "failed", "expired", "cancelled")
# Lines of an output or error file turned into results at a time.
COLLECT_LINES = 4096
REQUEST = "__request__"  # the request line of a row, made on the workers
# A request's tokens: [its input at 4 characters a token, the most its prompt and its reply can be billed for].
TOKENS = "__tokens__"
# Ray resources of the light step that makes request lines.
LIGHT = {"num_cpus": 0.1}
_MISSING = {
    "completed": "the batch completed without a result for this row",
    "expired": "the batch expired before this row was answered",
    "cancelled": "the batch was cancelled before this row was answered",
    "failed": "the batch failed",
}


class QueueFull(Exception):
    """The Batch API refused to create a batch because the account's queue is full (a 429 at
    create): the request file waits and is sent again as batches end."""


class BatchRecord(BaseModel):
    """One request file and what became of it."""

    number: int
    round: str  # "first", "retry", "reask": which pass over the rows made it
    attempts: int  # the ask this is for each of its rows (2 for a re-ask)
    url: str = "/v1/chat/completions"  # the endpoint of every line (`batch_url`)
    rows: int
    bytes: int
    input_file_id: str | None = None
    uploaded_at: float | None = None
    batch_id: str | None = None
    status: str = "written"  # then the batch's own: validating, in_progress, finalizing, completed, ...
    request_counts: dict[str, int] = {}
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[str] = []
    # The most its requests can be billed for (`rules.budget.worst_case_tokens`), for the spending cap.
    worst_tokens_in: int = 0
    worst_tokens_out: int = 0
    # Its input tokens at 4 characters a token, as the dry run counts them: what it takes of the
    # account's queue of enqueued tokens (`batch_enqueued_token_limit`) while it runs.
    tokens_estimate: int = 0
    # Batches made from it that failed because the account's queue was full: it was sent again.
    requeued: list[str] = []
    collected: bool = False
    collect_seconds: float | None = None  # how long reading its results took
    settled: bool = False  # the rows it replaces have been removed (retry and re-ask rounds)

    @property
    def name(self) -> str:
        return f"{self.number:05d}"

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @property
    def answered(self) -> int:
        """Rows the batch has answered, by its own counts."""
        if self.collected:
            return self.rows
        return self.request_counts.get("completed", 0) + self.request_counts.get("failed", 0)


class BatchStore:
    """An engine's directory (e.g. `<run_dir>/batches/`): per request file `NNNNN.requests.jsonl`,
    `NNNNN.rows.parquet`, `NNNNN.json` (the record) and, for vllm_batch, `NNNNN.output.jsonl`."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.path = open_filesystem(uri)

    def file(self, name: str) -> str:
        return f"{self.path}/{name}"

    def records(self) -> list[BatchRecord]:
        found = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        names = sorted(f.path for f in found if f.path.endswith(".json") and not os.path.basename(f.path).startswith("."))
        records = []
        for path in names:
            with self.fs.open_input_stream(path) as f:
                records.append(BatchRecord.model_validate_json(f.read()))
        return records

    def save(self, record: BatchRecord) -> None:
        self.fs.create_dir(self.path, recursive=True)
        final = self.file(f"{record.name}.json")
        with self.fs.open_output_stream(staging_path(self.fs, final)) as f:
            f.write(record.model_dump_json(indent=1).encode())
        publish(self.fs, final)

    def remove_unrecorded(self) -> None:
        """Delete the files of request files a kill left without their record (never sent)."""
        recorded = {r.name for r in self.records()}
        found = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        for f in found:
            base = os.path.basename(f.path)
            if base.startswith(STAGING_PREFIX) or (base.split(".")[0] not in recorded and not base.endswith(".json")):
                self.fs.delete_file(f.path)

    def rows(self, record: BatchRecord, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.file(f"{record.name}.rows.parquet"), filesystem=self.fs, columns=columns)


def batch_url(task: LLMTask) -> str:
    """The endpoint every line of a task's request files goes to."""
    return "/v1" + (wire.CHAT_PATH if task.chat else wire.COMPLETION_PATH)


def add_requests(batch: pa.Table, task: LLMTask, endpoint, attempts: int) -> pa.Table:
    """`batch` with each row's request line, whose `custom_id` is the row's id (as Ray Data
    `map_batches` on the workers, or on a few rows)."""
    url, sampled = batch_url(task), temperature(attempts, endpoint.temperature)
    lines, worst = [], []
    for row in batch.to_pylist():
        request = task.request(row)
        lines.append(json.dumps({"custom_id": row[C.ID], "method": "POST", "url": url,
                                 "body": wire.body(request, endpoint.model, sampled, endpoint.extra_body)},
                                ensure_ascii=False))
        texts = [m["content"] for m in request.messages] if request.messages is not None else [request.prompt]
        worst.append([sum(estimate_tokens(t) for t in texts), *worst_case_tokens(texts, request.max_tokens)])
    return batch.append_column(REQUEST, pa.array(lines, pa.string())).append_column(TOKENS, pa.array(worst, pa.list_(pa.int64())))


@dataclass
class Room:
    """What request files may still be written for under a spending cap: `usd` for their worst
    case, priced by `price(tokens_in, tokens_out)`; `cut` counts the rows left unwritten."""

    usd: float
    price: Callable[[int, int], float]
    cut: int = 0


def write_requests(store: BatchStore, batches: Iterable[pa.Table], endpoint, round: str, attempts: int,
                   url: str = "/v1/chat/completions", room: Room | None = None) -> list[BatchRecord]:
    """Write the rows of `batches` (each with its `REQUEST` and `TOKENS` columns, see
    `add_requests`) as request files of at most `batch_max_requests` lines, `batch_max_bytes`
    bytes and `batch_enqueued_token_limit` tokens, each with its rows file and then its record.
    Holds one batch and one file's writer at a time. With `room`, the files stop where the worst
    case of all of them would pass `room.usd`: the rows after that are not written (counted in
    `room.cut`)."""
    store.fs.create_dir(store.path, recursive=True)
    numbers = [r.number for r in store.records()]
    written: list[BatchRecord] = []
    current = None
    worst_in = worst_out = 0  # of every line written
    queue = getattr(endpoint, "batch_enqueued_token_limit", None)

    def close():
        nonlocal current
        if current is None:
            return
        requests, rows, record = current
        requests.close()
        rows.close()
        for suffix in ("requests.jsonl", "rows.parquet"):
            publish(store.fs, store.file(f"{record.name}.{suffix}"))
        store.save(record)
        written.append(record)
        current = None

    for batch in batches:
        if room is not None and room.cut:  # past the cap: the rest is counted, not written
            room.cut += batch.num_rows
            continue
        lines, tokens = batch[REQUEST].to_pylist(), batch[TOKENS].to_pylist()
        rows = batch.drop_columns([REQUEST, TOKENS])
        start = 0
        for i, line in enumerate(lines):
            estimate, line_in, line_out = tokens[i]
            if room is not None and room.price(worst_in + line_in, worst_out + line_out) > room.usd:
                room.cut = batch.num_rows - i
                lines = lines[:i]
                break
            worst_in, worst_out = worst_in + line_in, worst_out + line_out
            data = (line + "\n").encode()
            if len(data) > endpoint.batch_max_bytes:
                raise ValueError(f"row {batch[C.ID][i]}: its request alone ({len(data):,} bytes) is larger than "
                                 f"batch_max_bytes ({endpoint.batch_max_bytes:,})")
            if queue is not None and estimate > queue:
                raise ValueError(f"row {batch[C.ID][i]}: its request alone (about {estimate:,} tokens) is more than "
                                 f"batch_enqueued_token_limit ({queue:,})")
            if current is not None and (current[2].rows == endpoint.batch_max_requests
                                        or current[2].bytes + len(data) > endpoint.batch_max_bytes
                                        or (queue is not None and current[2].tokens_estimate + estimate > queue)):
                if i > start:
                    current[1].write_table(rows.slice(start, i - start))
                start = i
                close()
            if current is None:
                number = max(numbers + [r.number for r in written], default=0) + 1
                record = BatchRecord(number=number, round=round, attempts=attempts, url=url, rows=0, bytes=0)
                staged = {s: staging_path(store.fs, store.file(f"{record.name}.{s}")) for s in ("requests.jsonl", "rows.parquet")}
                current = (store.fs.open_output_stream(staged["requests.jsonl"]),
                           pq.ParquetWriter(staged["rows.parquet"], rows.schema, filesystem=store.fs), record)
            current[0].write(data)
            current[2].rows += 1
            current[2].bytes += len(data)
            current[2].worst_tokens_in += line_in
            current[2].worst_tokens_out += line_out
            current[2].tokens_estimate += estimate
        if current is not None and start < len(lines):
            current[1].write_table(rows.slice(start, len(lines) - start))
    close()
    return written


class FileEngine(Engine):
    """The life cycle of request files, shared by the engines that send them. A subclass supplies
    the client part: `submit`, `refresh`, `cancel_batch` and `lines` of one record."""

    sends_files = True

    def __init__(self, endpoint, workdir: str | None = None):
        super().__init__(endpoint, workdir)
        if workdir is None:
            raise ValueError(f"backend {endpoint.backend} needs a directory for its request files")
        self.store = BatchStore(workdir)
        self._held = False  # whether the batches of earlier runs are counted in flight under the cap
        self._queue_full = False  # the API refused a batch for its queue since a batch of this run last ended

    # Seconds between the first polls of running batches, and the most they back off to.
    poll_seconds, poll_max_seconds = 1.0, 10.0

    def sync_engine(self) -> Engine | None:
        """The engine that re-asks unreadable replies at once instead of in a follow-up batch, if any."""
        return None

    # The client part.
    def submit(self, record: BatchRecord) -> None:
        raise NotImplementedError

    def refresh(self, record: BatchRecord) -> None:
        raise NotImplementedError

    def cancel_batch(self, record: BatchRecord) -> None:
        raise NotImplementedError

    def lines(self, record: BatchRecord) -> Iterator[bytes]:
        raise NotImplementedError

    # The life cycle.
    def ask(self, rows, task: LLMTask, results: Results, *, attempt: int = 1, round: str = FIRST, progress=None,
            detach: bool = False) -> list:
        """Write `rows` as request files, send every file not sent (this pass's and any an earlier
        run left), follow their batches and collect each one that ends. Returns the records still
        running: none unless `detach`."""
        sync = self.sync_engine() if round == REASK else None
        if sync is not None and rows is not None:
            sync.spending, sync.section = self.spending, self.section  # one cap for both
            sync.ask(rows, task, results, attempt=attempt, round=round, progress=progress)
            rows = None
        store = self.store
        store.remove_unrecorded()
        room = self._room()
        if rows is not None:
            from alpagasus_ray.llm.engines.api import small_blocks

            requests = rows.map_batches(add_requests, fn_kwargs={"task": task, "endpoint": self.cfg, "attempts": attempt},
                                        batch_format="pyarrow", batch_size=None, **LIGHT)
            small_blocks(requests)  # the driver writes the request lines a block at a time
            new = write_requests(store, requests.iter_batches(batch_size=None, batch_format="pyarrow"), self.cfg,
                                 round, attempt, batch_url(task), room)
            if new:
                log.info("%s rows written into %d request files (%s)", f"{sum(r.rows for r in new):,}", len(new), round)
        open_records = [r for r in store.records() if not r.collected]
        capped: list[BatchRecord] = []  # request files the spending cap keeps from being sent
        self._send_waiting(open_records, capped)
        if room is not None and room.cut:
            log.info("%s rows not written into request files: their worst case would pass %s.max_cost_usd",
                     f"{room.cut:,}", self.section)
            self.spending.refuse.remote(room.cut)
        answered = _Answered(progress)
        following = [r for r in open_records if r not in capped]

        def poll() -> None:  # as batches end, the queue has room for the files still waiting
            self._send_waiting(open_records, capped)
            following[:] = [r for r in following if r not in capped]
            answered.update(open_records)

        running = self.follow(following, lambda r: self._collect(r, task, results, progress), once=detach,
                              on_poll=poll)
        if running:
            return running
        self.stop_at_cap()  # before the rows asked again replace theirs, as a streaming engine does
        self._settle(results)
        return []

    def _send_waiting(self, records: list[BatchRecord], capped: list[BatchRecord]) -> None:
        """Send the request files of `records` not sent yet, in order, while the account's queue of
        enqueued tokens has room for them (`batch_enqueued_token_limit`) and the API takes them;
        those the spending cap refuses go to `capped`, for good."""
        limit = getattr(self.cfg, "batch_enqueued_token_limit", None)
        for record in records:
            if record.batch_id is not None or record.ended or record in capped:
                continue
            enqueued = sum(r.tokens_estimate for r in records if r.batch_id is not None and not r.ended)
            if limit is not None and enqueued + record.tokens_estimate > limit:
                return  # the rest wait their turn, in order
            if self._queue_full and enqueued:
                return  # the API said the queue is full: wait for a batch of this run to end
            if not self._book(record):
                capped.append(record)
                continue
            try:
                self.submit(record)
            except QueueFull as e:
                self._unbook(record)
                self._queue_full = True
                log.info("request file %s waits: the Batch API's queue is full (%s)", record.name, e)
                return
            log.info("request file %s (%s rows) sent as batch %s", record.name, f"{record.rows:,}",
                     record.batch_id or "(run here)")

    def _unbook(self, record: BatchRecord) -> None:
        """A request file booked under the spending cap is not in flight after all."""
        if self.spending is not None:
            self.spending.settle.remote(self._worst_usd(record), 0.0)

    def _worst_usd(self, record: BatchRecord) -> float:
        return self._price(record.worst_tokens_in, record.worst_tokens_out)

    def _price(self, tokens_in: int, tokens_out: int) -> float:
        return usd(tokens_in, tokens_out, self.cfg.price_input_per_million, self.cfg.price_output_per_million,
                   self.price_factor())

    def _room(self) -> Room | None:
        """Under a spending cap, the room left for new request files; the batches an earlier run
        sent and this one follows are counted in flight first."""
        import ray

        if self.spending is None:
            return None
        if not self._held:
            for record in self.store.records():
                if record.batch_id is not None and not record.collected:
                    self.spending.hold.remote(self._worst_usd(record))
            self._held = True
        # A hair under the room: the files' worst cases, booked one by one, then fit whatever the rounding.
        return Room(max(0.0, ray.get(self.spending.room.remote()) - 1e-9), self._price)

    def _book(self, record: BatchRecord) -> bool:
        """Whether the request file may be sent under the spending cap (booked at its worst case)."""
        import ray

        if self.spending is None:
            return True
        return ray.get(self.spending.book.remote(self._worst_usd(record), record.rows))

    def in_flight(self) -> tuple[str, list[str]] | None:
        waiting = [self.store.file(f"{r.name}.rows.parquet") for r in self.store.records() if not r.collected]
        return (self.store.uri, waiting) if waiting else None

    def cancel(self, task: LLMTask, results: Results) -> dict:
        """Cancel the batches that have not ended, wait for them to stop, and collect what they had
        answered (the rest: request_failed, which `retry_failed` sends again)."""
        open_records = [r for r in self.store.records() if not r.collected]
        for record in open_records:
            if record.batch_id is None:  # written, never sent: nothing to cancel at the API
                record.status = "cancelled"
                self.store.save(record)
            elif not record.ended:
                self.cancel_batch(record)
                log.info("cancelling batch %s (request file %s)", record.batch_id, record.name)
        self.follow(open_records, lambda r: self._collect(r, task, results, None))
        self._settle(results)
        return {"cancelled": sum(r.status == "cancelled" for r in open_records),
                "ended_before": sum(r.status != "cancelled" for r in open_records)}

    def summary(self) -> dict:
        """The request files and batches, by state."""
        records = self.store.records()
        timed = [r for r in records if r.collect_seconds]
        seconds = sum(r.collect_seconds for r in timed)
        return {"request_files": len(records), "by_status": dict(Counter(r.status for r in records)),
                "batch_ids": [r.batch_id for r in records if r.batch_id],
                "collected_rows_per_second": round(sum(r.rows for r in timed) / seconds, 1) if seconds else None}

    def follow(self, records: list[BatchRecord], on_end: Callable[[BatchRecord], None], *, once: bool = False,
               on_poll: Callable[[], None] | None = None) -> list[BatchRecord]:
        """Poll the records' batches until every one has ended (or once, with `once`), handing each
        batch that has ended to `on_end` (to collect it) as soon as it has; the polls back off from
        `poll_seconds` by x1.5 up to `poll_max_seconds`. Returns the records still running."""
        delay = self.poll_seconds
        while True:
            for record in records:
                if not record.ended and record.batch_id is not None:
                    self.refresh(record)
                    if record.batch_id is None:  # its batch failed for the queue's limit: it waits to be sent again
                        self._unbook(record)
                        self._queue_full = True
                    elif record.ended:
                        self._queue_full = False  # a batch ended: the queue has room again
                if record.ended and not record.collected:
                    on_end(record)
            if on_poll is not None:
                on_poll()
            running = [r for r in records if not r.ended]
            if not running or once:
                return running
            time.sleep(delay)
            delay = min(delay * 1.5, self.poll_max_seconds)

    def _collect(self, record: BatchRecord, task: LLMTask, results: Results, progress) -> None:
        """Collect an ended batch into parts named after its request file (what an interrupted
        collection of it wrote is removed first), then mark it collected."""
        prefix = f"batch{record.name}"
        results.remove_parts(prefix)
        write = results.writer(prefix)
        usage = Counter()

        def save(table: pa.Table) -> None:
            write(table)
            usage.update({C.TOKENS_IN: pc.sum(table[C.TOKENS_IN]).as_py() or 0,
                          C.TOKENS_OUT: pc.sum(table[C.TOKENS_OUT]).as_py() or 0})
            if progress is not None:  # the rows were counted from the batch's own counts
                progress.add_counts({k: v for k, v in batch_counts(table).items() if k != "rows"})

        started = time.time()
        problems = collect(self, record, task, save)
        record.collected, record.collect_seconds = True, round(time.time() - started, 3)
        self.store.save(record)
        if self.spending is not None and record.batch_id is not None:
            self.spending.settle.remote(self._worst_usd(record), self._price(usage[C.TOKENS_IN], usage[C.TOKENS_OUT]))
        log.info("batch %s (request file %s) %s, collected%s", record.batch_id, record.name, record.status,
                 "".join(f", {v:,} {k.replace('_', ' ')}" for k, v in problems.items() if v))

    def _settle(self, results: Results) -> None:
        """Remove the rows that a collected retry or re-ask round replaces."""
        for record in self.store.records():
            if record.round == FIRST or not record.collected or record.settled:
                continue
            ids = self.store.rows(record, [C.ID])[C.ID].to_pylist()
            mine = {p for p in results.parts() if p.rsplit("/", 1)[-1].startswith(f"batch{record.name}-")}
            results.replace(ids, record.round, keep_parts=mine)
            record.settled = True
            self.store.save(record)


class BatchApiEngine(FileEngine):
    """A provider's Batch API, paid at its batch price and polled at the endpoint's pace."""

    def __init__(self, endpoint, workdir: str | None = None):
        super().__init__(endpoint, workdir)
        self.poll_seconds, self.poll_max_seconds = endpoint.batch_poll_seconds, endpoint.batch_poll_max_seconds

    def context(self):
        return api_context(self.cfg)

    def price_factor(self) -> float | None:
        return self.cfg.batch_price_factor


def collect(engine: FileEngine, record: BatchRecord, task: LLMTask, save: Callable[[pa.Table], None]) -> dict:
    """Read the ended batch's results into rows with the layer's result columns, `COLLECT_LINES`
    at a time, and hand each chunk to `save` (which must replace what an earlier, interrupted
    collection of this record saved). Every row of the request file comes out once. Returns
    counts of the lines that could not be used."""
    problems = _collect_rows(engine, record, task, save)
    # Arrow's allocator keeps the pages that a file's rows and results took up for reuse (about
    # 60 MB for a file of 50,000 rows); unless they are returned now, the driver grows file by file.
    pa.default_memory_pool().release_unused()
    return problems


def _collect_rows(engine: FileEngine, record: BatchRecord, task: LLMTask, save: Callable[[pa.Table], None]) -> dict:
    rows = engine.store.rows(record)
    position_of = {row_id: i for i, row_id in enumerate(rows[C.ID].to_pylist())}
    seen = np.zeros(rows.num_rows, dtype=bool)
    problems = {"unreadable_lines": 0, "unknown_ids": 0, "repeated_ids": 0}
    # (row position, result): a line is read into its result at once, since a parsed line (a reply
    # with its logprobs) is tens of times larger than the result.
    chunk: list[tuple[int, dict]] = []

    def flush():
        if chunk:
            taken = rows.take(pa.array([p for p, _ in chunk], pa.int64()))
            with_results(taken, task, [result for _, result in chunk], sink=save)
            chunk.clear()

    for raw in engine.lines(record):
        try:
            line = json.loads(raw)
            custom_id = line["custom_id"]
        except (ValueError, KeyError, TypeError):
            problems["unreadable_lines"] += 1
            continue
        position = position_of.get(custom_id) if isinstance(custom_id, str) else None
        if position is None:
            problems["unknown_ids"] += 1
            continue
        if seen[position]:
            problems["repeated_ids"] += 1
            continue
        seen[position] = True
        chunk.append((position, line_result(task, rows.slice(position, 1).to_pylist()[0], line, record.attempts)))
        if len(chunk) >= COLLECT_LINES:
            flush()
    flush()
    missing = np.flatnonzero(~seen)
    if len(missing):
        reason = _MISSING.get(record.status, f"the batch ended {record.status}")
        if record.errors:
            reason += ": " + "; ".join(record.errors[:3])
        if record.status == "completed" and any(problems.values()):
            reason += f" ({', '.join(f'{v} {k}' for k, v in problems.items() if v)} in its files)"
        for start in range(0, len(missing), COLLECT_LINES):
            taken = rows.take(pa.array(missing[start:start + COLLECT_LINES]))
            with_results(taken, task, [failed(task, record.attempts, reason)] * taken.num_rows, sink=save)
    if any(problems.values()):
        log.warning("batch %s (request file %s): %s", record.batch_id, record.name,
                    ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in problems.items() if v))
    return problems


def line_result(task: LLMTask, row: dict, line: dict, attempts: int) -> dict:
    """The result of one line of an output or error file: the task's reading of the reply, or
    request_failed with the API's reason."""
    response = line.get("response") or {}
    status = response.get("status_code")
    body = response.get("body")
    if line.get("error") or status != 200:
        return failed(task, attempts, _reason(status, body, line.get("error")))
    try:
        completion = wire.parse(body, wire.CHAT_PATH if task.chat else wire.COMPLETION_PATH)
    except ValidationError as e:
        return failed(task, attempts, f"unreadable response body: {str(body)[:200]!r} ({wire.body_problem(e)})")
    tokens_in, tokens_out = wire.usage(completion)
    if not completion.choices:
        return failed(task, attempts, "a response with no choices", tokens_in, tokens_out)
    return reply_result(task, row, wire.reply(completion), attempts, tokens_in, tokens_out)


def _reason(status, body, error) -> str:
    """One line saying why a batch line failed, from its error object or its response body
    (the Batch API puts the error in the body, vLLM's runner in `error`)."""
    detail = error or body
    if isinstance(detail, dict) and isinstance(detail.get("error"), dict):
        detail = detail["error"]
    if isinstance(detail, dict):
        detail = " ".join(str(detail[k]) for k in ("type", "code", "message") if detail.get(k)) or detail
    return f"batch line {status or 'error'}: {detail}".splitlines()[0][:300]


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
            more += max(0, record.answered - self.shown.get(record.number, 0))
            self.shown[record.number] = max(record.answered, self.shown.get(record.number, 0))
        if more:
            self.progress.add_counts({"rows": more})
