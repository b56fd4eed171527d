"""The batch backends of the LLM layer: request files sent whole, at half price or on one's own GPUs.

    openai_batch   OpenAI's Batch API (or a provider's that speaks it): upload a request file,
                   create a batch, poll it until it ends, download its output and error files.
    vllm_batch     the same request files run by vLLM's batch runner (`vllm run_batch`) on this
                   machine; its output file is read by the same collector.

A stage writes its rows as request files (`write_requests`), one JSONL line per row in the Batch
API's format (`custom_id` is the row's id) beside a Parquet file of the rows themselves, so the
results can be joined back by id. Each request file has a record (`BatchRecord`) under the stage's
batch directory; the record is the life cycle's memory: a killed driver reruns, finds what was
uploaded, created and collected, and never sends a file twice. The order of the steps is what makes
that hold:
1. the request file and its rows are written, then the record (status `written`);
2. the upload, then the record with the file id;
3. before creating a batch, the batches of the account are searched for one made from that file
   (a kill between the create and the record's save leaves one): found, it is adopted;
4. the record follows the batch's states; once the batch has ended, its output and error files
   are read a chunk at a time and handed to the stage's `save` (a stage writes each chunk under a
   name of the record, so a collection killed half-way is redone whole), then `collected` is set.
A row that has no line in either file (an expired or cancelled batch, a failed validation) comes
back as request_failed with the batch's reason; so does a line that cannot be read.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ValidationError

from alpagasus_ray import columns as C
from alpagasus_ray.config import EndpointConfig, api_key
from alpagasus_ray.layout import STAGING_PREFIX, is_local, open_filesystem, publish, staging_path
from alpagasus_ray.llm_map import (
    REASK_TEMPERATURE, Reply, needs_reask, read_reply as read_task_reply, result_row, with_results,
)

log = logging.getLogger(__name__)

URL = "/v1/chat/completions"
# A batch in one of these states changes no more.
ENDED = ("completed", "failed", "expired", "cancelled")
# Lines of an output or error file turned into results at a time.
COLLECT_LINES = 4096
REQUEST = "__request__"  # the request line of a row, made on the workers
_MISSING = {
    "completed": "the batch completed without a result for this row",
    "expired": "the batch expired before this row was answered",
    "cancelled": "the batch was cancelled before this row was answered",
    "failed": "the batch failed",
}


class BatchRecord(BaseModel):
    """One request file and what became of it."""

    number: int
    round: str  # "first", "retry", "reask": which pass over the rows made it
    attempts: int  # the ask this is for each of its rows (2 for a re-ask)
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
    """A stage's batch directory (e.g. `<run_dir>/batches/`): per request file `NNNNN.requests.jsonl`,
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
        self._put(f"{record.name}.json", record.model_dump_json(indent=1).encode())

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

    def _put(self, name: str, data: bytes) -> None:
        self.fs.create_dir(self.path, recursive=True)
        final = self.file(name)
        with self.fs.open_output_stream(staging_path(self.fs, final)) as f:
            f.write(data)
        publish(self.fs, final)


def request_body(request, endpoint: EndpointConfig, attempts: int) -> dict:
    """The body of one chat request, as the synchronous backend sends it (a re-ask is sampled:
    a greedy re-ask would repeat the reply word for word)."""
    body = {"model": endpoint.model, "messages": request.messages, "max_tokens": request.max_tokens,
            "temperature": REASK_TEMPERATURE if attempts > 1 else endpoint.temperature}
    if request.top_logprobs:
        body.update(logprobs=True, top_logprobs=request.top_logprobs)
    body.update(endpoint.extra_body)
    return body


def add_requests(batch: pa.Table, task, endpoint: EndpointConfig, attempts: int, id_column: str = C.ID) -> pa.Table:
    """`batch` with each row's request line, whose `custom_id` is the row's `id_column` (as Ray
    Data `map_batches` on the workers, or on a few rows)."""
    lines = [json.dumps({"custom_id": row[id_column], "method": "POST", "url": URL,
                         "body": request_body(task.request(row), endpoint, attempts)}, ensure_ascii=False)
             for row in batch.to_pylist()]
    return batch.append_column(REQUEST, pa.array(lines, pa.string()))


def write_requests(store: BatchStore, batches: Iterable[pa.Table], endpoint: EndpointConfig, round: str,
                   attempts: int, id_column: str = C.ID) -> list[BatchRecord]:
    """Write the rows of `batches` (each with its `REQUEST` column, see `add_requests`) as request
    files of at most `batch_max_requests` lines and `batch_max_bytes` bytes, each with its rows
    file and then its record. Holds one batch and one file's writer at a time."""
    store.fs.create_dir(store.path, recursive=True)
    numbers = [r.number for r in store.records()]
    written: list[BatchRecord] = []
    current = None

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
        lines = batch[REQUEST].to_pylist()
        rows = batch.drop_columns([REQUEST])
        start = 0
        for i, line in enumerate(lines):
            data = (line + "\n").encode()
            if len(data) > endpoint.batch_max_bytes:
                raise ValueError(f"row {batch[id_column][i]}: its request alone ({len(data):,} bytes) is larger than "
                                 f"batch_max_bytes ({endpoint.batch_max_bytes:,})")
            if current is not None and (current[2].rows == endpoint.batch_max_requests
                                        or current[2].bytes + len(data) > endpoint.batch_max_bytes):
                if i > start:
                    current[1].write_table(rows.slice(start, i - start))
                start = i
                close()
            if current is None:
                number = max(numbers + [r.number for r in written], default=0) + 1
                record = BatchRecord(number=number, round=round, attempts=attempts, rows=0, bytes=0)
                staged = {s: staging_path(store.fs, store.file(f"{record.name}.{s}")) for s in ("requests.jsonl", "rows.parquet")}
                current = (store.fs.open_output_stream(staged["requests.jsonl"]),
                           pq.ParquetWriter(staged["rows.parquet"], rows.schema, filesystem=store.fs), record)
            current[0].write(data)
            current[2].rows += 1
            current[2].bytes += len(data)
        if current is not None and start < batch.num_rows:
            current[1].write_table(rows.slice(start))
    close()
    return written


# --------------------------------------------------------------------------- running the batches


class OpenAIBatches:
    """The Batch API life cycle through the `openai` client (its own retries, Retry-After honoured)."""

    def __init__(self, endpoint: EndpointConfig, store: BatchStore):
        import openai

        self.cfg, self.store = endpoint, store
        self.client = openai.OpenAI(base_url=endpoint.base_url, api_key=api_key(endpoint),
                                    max_retries=endpoint.max_retries, timeout=endpoint.request_timeout)

    def submit(self, record: BatchRecord) -> None:
        """Upload the request file and create its batch, recording each step."""
        if record.input_file_id is None:
            path = self.store.file(f"{record.name}.requests.jsonl")
            with self.store.fs.open_input_file(path) as f:  # streamed by the client, never whole in memory
                uploaded = self.client.files.create(file=(f"{record.name}.requests.jsonl", f), purpose="batch")
            record.input_file_id, record.uploaded_at = uploaded.id, time.time()
            self.store.save(record)
        if record.batch_id is None:
            batch = self._made_from(record) or self.client.batches.create(
                input_file_id=record.input_file_id, endpoint=URL, completion_window=self.cfg.batch_completion_window,
                metadata={"alpagasus_request_file": record.name})
            self._update(record, batch)

    def refresh(self, record: BatchRecord) -> None:
        self._update(record, self.client.batches.retrieve(record.batch_id))

    def cancel(self, record: BatchRecord) -> None:
        import openai

        try:
            self._update(record, self.client.batches.cancel(record.batch_id))
        except openai.ConflictError:  # it ended meanwhile
            self.refresh(record)

    def lines(self, record: BatchRecord) -> Iterator[bytes]:
        """The lines of the batch's output file, then of its error file, as they download."""
        for file_id in (record.output_file_id, record.error_file_id):
            if file_id:
                with self.client.files.with_streaming_response.content(file_id) as response:
                    yield from response.iter_lines()

    def _made_from(self, record: BatchRecord):
        """A batch already created from the record's file (a kill came before its record was saved)."""
        since = (record.uploaded_at or 0) - 600
        for batch in self.client.batches.list(limit=100):
            if batch.created_at < since:
                return None
            if batch.input_file_id == record.input_file_id:
                log.info("batch %s was created from request file %s before a restart: adopted", batch.id, record.name)
                return batch
        return None

    def _update(self, record: BatchRecord, batch) -> None:
        counts = batch.request_counts
        record.batch_id, record.status = batch.id, batch.status
        record.request_counts = counts.model_dump() if counts is not None else {}
        record.output_file_id, record.error_file_id = batch.output_file_id, batch.error_file_id
        errors = getattr(batch.errors, "data", None) or []
        record.errors = [f"{e.code}: {e.message}" + (f" (line {e.line})" if e.line else "") for e in errors]
        self.store.save(record)


class VllmBatches:
    """vLLM's batch runner on this machine: a request file in, an output file out (`vllm run_batch`)."""

    def __init__(self, endpoint: EndpointConfig, store: BatchStore):
        if not is_local(store.uri):
            raise ValueError(f"vllm_batch runs request files on this machine: {store.uri} must be a local path")
        self.cfg, self.store = endpoint, store

    def submit(self, record: BatchRecord) -> None:
        from alpagasus_ray.backends.vllm_engine import engine_env
        from alpagasus_ray.tiny_model import resolve_model

        output = self.store.file(f"{record.name}.output.jsonl")
        command = [sys.executable, "-m", "vllm.entrypoints.openai.run_batch",
                   "-i", self.store.file(f"{record.name}.requests.jsonl"), "-o", f"{output}.part",
                   "--model", resolve_model(self.cfg.model), "--served-model-name", self.cfg.model,
                   "--max-model-len", str(self.cfg.max_model_len)]
        if not self.cfg.use_gpu:
            command += ["--dtype", "float32", "--enforce-eager"]
        for key, value in self.cfg.engine_kwargs.items():
            command += [f"--{key.replace('_', '-')}", str(value)]
        record.status = "in_progress"
        self.store.save(record)
        log.info("vllm_batch: running request file %s (%d rows)", record.name, record.rows)
        messages = self.store.file(f"{record.name}.vllm.log")
        with open(messages, "wb") as out:
            done = subprocess.run(command, env={**os.environ, **engine_env(self.cfg)}, stdout=out,
                                  stderr=subprocess.STDOUT)
        if done.returncode != 0:
            with open(messages, "rb") as f:
                tail = f.read().decode(errors="replace").strip().splitlines()[-3:]
            record.status = "failed"
            record.errors = [f"vllm run_batch exit {done.returncode} (see {messages}): {' | '.join(tail)}"]
        else:
            os.replace(f"{output}.part", output)
            record.status, record.output_file_id = "completed", os.path.basename(output)
        self.store.save(record)

    def refresh(self, record: BatchRecord) -> None:
        pass  # a run ends before `submit` returns

    def cancel(self, record: BatchRecord) -> None:
        pass

    def lines(self, record: BatchRecord) -> Iterator[bytes]:
        if record.output_file_id:
            with open(self.store.file(record.output_file_id), "rb") as f:
                yield from f


def batch_client(endpoint: EndpointConfig, store: BatchStore):
    return (OpenAIBatches if endpoint.backend == "openai_batch" else VllmBatches)(endpoint, store)


def follow(client, records: list[BatchRecord], endpoint: EndpointConfig, on_end: Callable[[BatchRecord], None], *,
           once: bool = False, on_poll: Callable[[], None] | None = None) -> list[BatchRecord]:
    """Poll the records' batches until every one has ended (or once, with `once`), handing each
    batch that has ended to `on_end` (to collect it) as soon as it has; the polls back off from
    `batch_poll_seconds` by x1.5 up to `batch_poll_max_seconds`. Returns the records still running."""
    delay = endpoint.batch_poll_seconds
    while True:
        for record in records:
            if not record.ended:
                client.refresh(record)
            if record.ended and not record.collected:
                on_end(record)
        if on_poll is not None:
            on_poll()
        running = [r for r in records if not r.ended]
        if not running or once:
            return running
        time.sleep(delay)
        delay = min(delay * 1.5, endpoint.batch_poll_max_seconds)


def collect(client, store: BatchStore, record: BatchRecord, task, save: Callable[[pa.Table], None],
            id_column: str = C.ID) -> dict:
    """Read the ended batch's results into rows with the layer's result columns, `COLLECT_LINES`
    at a time, and hand each chunk to `save` (which must replace what an earlier, interrupted
    collection of this record saved). Every row of the request file comes out once. Returns
    counts of the lines that could not be used."""
    problems = _collect_rows(client, store, record, task, save, id_column)
    # Arrow's allocator keeps the pages that a file's rows and results took up for reuse (about
    # 60 MB for a file of 50,000 rows); unless they are returned now, the driver grows file by file.
    pa.default_memory_pool().release_unused()
    return problems


def _collect_rows(client, store: BatchStore, record: BatchRecord, task, save: Callable[[pa.Table], None],
                  id_column: str) -> dict:
    rows = store.rows(record)
    position_of = {row_id: i for i, row_id in enumerate(rows[id_column].to_pylist())}
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

    for raw in client.lines(record):
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
            results = [result_row(task, None, C.REQUEST_FAILED, record.attempts, reason, 0, 0)] * taken.num_rows
            with_results(taken, task, results, sink=save)
    if any(problems.values()):
        log.warning("batch %s (request file %s): %s", record.batch_id, record.name,
                    ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in problems.items() if v))
    return problems


def ask_in_batches(rows: list[dict], task, endpoint: EndpointConfig, store: BatchStore, save, progress=None,
                   id_column: str = "key") -> None:
    """For small stages (judge): ask every row through request files and hand each collected
    chunk to `save` (a list of rows, each with its result). A rerun passes the rows not yet saved:
    those already in a request file are collected from its batch, not sent again. A reply that
    cannot be read is asked once more, in a follow-up batch."""
    store.remove_unrecorded()
    client = batch_client(endpoint, store)
    waiting = {k for r in store.records() if not r.collected for k in store.rows(r, [id_column])[id_column].to_pylist()}
    new = [row for row in rows if row[id_column] not in waiting]
    if new:
        table = add_requests(pa.Table.from_pylist(new), task, endpoint, 1, id_column)
        write_requests(store, [table], endpoint, "first", 1, id_column)
    again: list[dict] = []
    names = set(rows[0]) if rows else set()

    def save_chunk(table: pa.Table) -> None:
        save(table.to_pylist())
        if progress is not None:
            progress.add(table)
        unread = table.filter(needs_reask(table))
        again.extend(unread.select([n for n in unread.column_names if n in names]).to_pylist())

    for round in ("first", "reask"):
        records = [r for r in store.records() if not r.collected]
        for record in records:
            if record.batch_id is None and not record.ended:
                client.submit(record)
        follow(client, records, endpoint,
               lambda r: (collect(client, store, r, task, save_chunk, id_column), _mark_collected(store, r)))
        if round == "first" and again:
            table = add_requests(pa.Table.from_pylist(again), task, endpoint, 2, id_column)
            write_requests(store, [table], endpoint, "reask", 2, id_column)


def _mark_collected(store: BatchStore, record: BatchRecord) -> None:
    record.collected = True
    store.save(record)


def line_result(task, row: dict, line: dict, attempts: int) -> dict:
    """The result of one line of an output or error file: the task's reading of the reply, or
    request_failed with the API's reason."""
    from alpagasus_ray.backends.openai_api import ChatBody, body_problem, read_reply, usage

    response = line.get("response") or {}
    status = response.get("status_code")
    body = response.get("body")
    if line.get("error") or status != 200:
        return result_row(task, None, C.REQUEST_FAILED, attempts, _reason(status, body, line.get("error")), 0, 0)
    try:
        completion = ChatBody.model_validate(body)
    except ValidationError as e:
        problem = f"unreadable response body: {str(body)[:200]!r} ({body_problem(e)})"
        return result_row(task, None, C.REQUEST_FAILED, attempts, problem, 0, 0)
    tokens_in, tokens_out = usage(completion)
    if not completion.choices:
        return result_row(task, None, C.REQUEST_FAILED, attempts, "a response with no choices", tokens_in, tokens_out)
    text, positions = read_reply(completion)
    reply = Reply(text, positions, completion.choices[0].finish_reason)
    return read_task_reply(task, row, reply, attempts, tokens_in, tokens_out)


def _reason(status, body, error) -> str:
    """One line saying why a batch line failed, from its error object or its response body
    (the Batch API puts the error in the body, vLLM's runner in `error`)."""
    detail = error or body
    if isinstance(detail, dict) and isinstance(detail.get("error"), dict):
        detail = detail["error"]
    if isinstance(detail, dict):
        detail = " ".join(str(detail[k]) for k in ("type", "code", "message") if detail.get(k)) or detail
    return f"batch line {status or 'error'}: {detail}".splitlines()[0][:300]
