"""The `openai_batch` engine: OpenAI's Batch API (or a provider's that speaks it), at its batch price.

Upload a request file, create a batch, poll it until it ends, download its output and error files;
the life cycle and its records are `files.FileEngine`'s. Calls go through the `openai` client
(its own retries, Retry-After honoured).
"""

from __future__ import annotations

import logging
import time
from typing import Iterator

from alpagasus_ray.config import api_key
from alpagasus_ray.llm.engines.api import require_key
from alpagasus_ray.llm import wire
from alpagasus_ray.llm.engines.files import BatchApiEngine, BatchRecord, QueueFull

log = logging.getLogger(__name__)

# The error code of a batch that failed because the account's enqueued tokens were at their limit.
QUEUE_LIMIT = "token_limit_exceeded"


class OpenAIBatchEngine(BatchApiEngine):
    """The Batch API through the `openai` client."""

    def __init__(self, endpoint, workdir: str | None = None):
        import openai

        super().__init__(endpoint, workdir)
        self.client = openai.OpenAI(base_url=endpoint.base_url, api_key=api_key(endpoint),
                                    max_retries=endpoint.max_retries, timeout=endpoint.request_timeout)

    def check(self, section: str) -> None:
        require_key(self.cfg, section)

    def sync_engine(self):
        """With `reask: sync`, the same endpoint's synchronous API (its pool keys apply)."""
        if self.cfg.reask != "sync":
            return None
        from alpagasus_ray.llm.engines.api import ApiEngine

        return ApiEngine(self.cfg)

    def submit(self, record: BatchRecord) -> None:
        """Upload the request file and create its batch, recording each step.

        Raises:
            QueueFull: the API answered 429 to the create (the account's queue is full); the
                file stays uploaded and waits.
        """
        import openai

        store = self.store
        if record.input_file_id is None:
            path = store.file(f"{record.name}.requests.jsonl")
            with store.fs.open_input_file(path) as f:  # streamed by the client, never whole in memory
                uploaded = self.client.files.create(file=(f"{record.name}.requests.jsonl", f), purpose="batch")
            record.input_file_id, record.uploaded_at = uploaded.id, time.time()
            store.save(record)
        if record.batch_id is None:
            batch = self._made_from(record)
            if batch is None:
                try:
                    batch = self.client.batches.create(
                        input_file_id=record.input_file_id, endpoint=record.url,
                        completion_window=self.cfg.batch_completion_window,
                        metadata={"alpagasus_request_file": record.name})
                except openai.RateLimitError as e:  # after the client's own retries: the queue is full
                    raise QueueFull(wire.describe_error(e)) from None
            self._update(record, batch)

    def refresh(self, record: BatchRecord) -> None:
        self._update(record, self.client.batches.retrieve(record.batch_id))

    def cancel_batch(self, record: BatchRecord) -> None:
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
            if batch.input_file_id == record.input_file_id and batch.id not in record.requeued:
                log.info("batch %s was created from request file %s before a restart: adopted", batch.id, record.name)
                return batch
        return None

    def _update(self, record: BatchRecord, batch) -> None:
        errors = getattr(batch.errors, "data", None) or []
        if batch.status == "failed" and any(e.code == QUEUE_LIMIT for e in errors):
            # Not a failure of its rows: the account's queue was full. The file waits to be sent
            # again, as a new batch (its input file stays uploaded).
            record.requeued.append(batch.id)
            record.batch_id, record.status, record.request_counts = None, "written", {}
            log.info("batch %s of request file %s failed for the enqueued token limit (%s): sent again as the "
                     "queue has room", batch.id, record.name, errors[0].message)
            self.store.save(record)
            return
        counts = batch.request_counts
        record.batch_id, record.status = batch.id, batch.status
        record.request_counts = counts.model_dump() if counts is not None else {}
        record.output_file_id, record.error_file_id = batch.output_file_id, batch.error_file_id
        record.errors = [f"{e.code}: {e.message}" + (f" (line {e.line})" if e.line else "") for e in errors]
        self.store.save(record)
