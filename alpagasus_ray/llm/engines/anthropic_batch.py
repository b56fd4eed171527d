"""The `anthropic_batch` engine: Anthropic's Message Batches API, at its batch price (half the
synchronous one), through the `anthropic` SDK.

The request files, their records and the life cycle are `files.FileEngine`'s, as for the OpenAI
Batch API; what differs is the client part:
- a batch is created with its requests in the call itself (no file upload): each line of the
  request file becomes `{custom_id, params}`, its system messages the `system` parameter;
- a batch is `in_progress`, `canceling` or `ended`; an ended batch is recorded `completed`,
  `expired` (some requests expired) or `cancelled` (a cancel was asked), so the rows a batch never
  answered get the reason of the OpenAI path;
- each result line (`succeeded` or `errored`) is read as the OpenAI Batch API's line of the same
  row, so the collector is the same; `canceled` and `expired` lines are rows never answered.
A batch has no metadata to find it by: before a create the record notes when it began, so a
driver killed between the create and the record's save finds the one batch created since then that
no record holds, and adopts it (the driver creates one batch at a time).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Iterator

from alpagasus_ray.config import ConfigError, api_key
from alpagasus_ray.llm.engines.files import BatchApiEngine, BatchRecord, QueueFull

log = logging.getLogger(__name__)

# The Messages API's parameters a request line's body carries over (the rest are OpenAI's own).
CARRIED = ("model", "max_tokens", "temperature", "top_p", "stop_sequences")


class AnthropicBatchEngine(BatchApiEngine):
    """Message Batches through the `anthropic` client."""

    def __init__(self, endpoint, workdir: str | None = None):
        import anthropic

        super().__init__(endpoint, workdir)
        self.client = anthropic.Anthropic(base_url=endpoint.base_url, api_key=api_key(endpoint),
                                          max_retries=endpoint.max_retries, timeout=endpoint.request_timeout)

    def check(self, section: str) -> None:
        if self.cfg.base_url is None and not os.environ.get(self.cfg.api_key_env):
            raise ConfigError(
                f"{section}.backend=anthropic_batch with Anthropic's endpoint needs an API key in ${self.cfg.api_key_env}; "
                f"set it in the environment (never in a config), or set {section}.base_url to a server without auth")

    def submit(self, record: BatchRecord) -> None:
        """Create the batch with the request file's requests (or adopt the one a kill left).

        Raises:
            QueueFull: the API answered 429 to the create; the file waits.
        """
        import anthropic

        batch = self._made_from(record) if record.uploaded_at is not None else None
        if batch is None:
            requests = [as_message_request(json.loads(line), self.cfg.extra_body) for line in self._request_lines(record)]
            record.uploaded_at = time.time()  # here: when its create began (what a restart adopts by)
            self.store.save(record)
            try:
                batch = self.client.messages.batches.create(requests=requests)
            except anthropic.RateLimitError as e:
                raise QueueFull(str(e).splitlines()[0][:300]) from None
        self._update(record, batch)

    def refresh(self, record: BatchRecord) -> None:
        self._update(record, self.client.messages.batches.retrieve(record.batch_id))

    def cancel_batch(self, record: BatchRecord) -> None:
        import anthropic

        try:
            self._update(record, self.client.messages.batches.cancel(record.batch_id))
        except anthropic.APIStatusError as e:
            if e.status_code not in (400, 409):  # not: it ended meanwhile
                raise
            self.refresh(record)

    def lines(self, record: BatchRecord) -> Iterator[bytes]:
        """The batch's result lines, each as the OpenAI Batch API's line of the same row."""
        if record.status not in ("completed", "expired", "cancelled"):
            return
        with self.client.messages.batches.with_streaming_response.results(record.batch_id) as response:
            for raw in response.iter_lines():
                if raw.strip():
                    line = openai_line(json.loads(raw))
                    if line is not None:
                        yield json.dumps(line).encode()

    def _request_lines(self, record: BatchRecord) -> Iterator[str]:
        with self.store.fs.open_input_stream(self.store.file(f"{record.name}.requests.jsonl")) as f:
            for raw in f.read().decode("utf-8").splitlines():
                if raw.strip():
                    yield raw

    def _made_from(self, record: BatchRecord):
        """The batch a kill left between its create and the record's save: created since the create
        began and held by no record."""
        held = {r.batch_id for r in self.store.records() if r.batch_id} | set(record.requeued)
        since = (record.uploaded_at or 0) - 60
        for batch in self.client.messages.batches.list(limit=100):
            if batch.created_at.timestamp() < since:
                return None
            if batch.id not in held:
                log.info("batch %s was created from request file %s before a restart: adopted", batch.id, record.name)
                return batch
        return None

    def _update(self, record: BatchRecord, batch) -> None:
        counts = batch.request_counts
        record.batch_id = batch.id
        record.request_counts = {"total": counts.processing + counts.succeeded + counts.errored + counts.canceled
                                 + counts.expired, "completed": counts.succeeded, "failed": counts.errored}
        record.status = batch_status(batch.processing_status, batch.cancel_initiated_at is not None, counts.expired)
        self.store.save(record)


def batch_status(processing: str, cancelled: bool, expired: int) -> str:
    """A Message Batch's state in the words of the records (OpenAI's).

    >>> batch_status("in_progress", False, 0), batch_status("ended", False, 0), batch_status("ended", True, 0)
    ('in_progress', 'completed', 'cancelled')
    >>> batch_status("ended", False, 3), batch_status("canceling", True, 0)
    ('expired', 'cancelling')
    """
    if processing == "in_progress":
        return "in_progress"
    if processing == "canceling":
        return "cancelling"
    if cancelled:
        return "cancelled"
    return "expired" if expired else "completed"


def as_message_request(line: dict, extra: dict | None = None) -> dict:
    """A request file's line (OpenAI's format) as a Message Batch request: the system messages
    become the `system` parameter, the endpoint's `extra_body` the Messages API's own parameters.

    >>> as_message_request({"custom_id": "r1", "body": {"model": "m", "max_tokens": 8, "temperature": 0.0,
    ...     "logprobs": True, "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]}})
    {'custom_id': 'r1', 'params': {'model': 'm', 'max_tokens': 8, 'temperature': 0.0, 'system': 'S', 'messages': [{'role': 'user', 'content': 'U'}]}}
    """
    body = line["body"]
    params = {k: body[k] for k in CARRIED if k in body}
    messages = body["messages"]
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    if system:
        params["system"] = system
    params["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
    params.update(extra or {})
    return {"custom_id": line["custom_id"], "params": params}


def openai_line(result: dict) -> dict | None:
    """A Message Batch result line as the OpenAI Batch API's line of the same row; None for a
    request the batch never answered (canceled, expired).

    >>> line = openai_line({"custom_id": "r1", "result": {"type": "succeeded", "message": {"id": "msg_1",
    ...     "model": "m", "content": [{"type": "text", "text": "4.5"}], "stop_reason": "end_turn",
    ...     "usage": {"input_tokens": 10, "output_tokens": 2}}}})
    >>> line["response"]["body"]["choices"][0]["message"]["content"], line["response"]["body"]["usage"]
    ('4.5', {'prompt_tokens': 10, 'completion_tokens': 2})
    >>> openai_line({"custom_id": "r2", "result": {"type": "errored", "error": {"type": "error",
    ...     "error": {"type": "invalid_request_error", "message": "bad"}}}})["response"]["status_code"]
    400
    >>> openai_line({"custom_id": "r3", "result": {"type": "expired"}}) is None
    True
    """
    outcome = result.get("result") or {}
    kind = outcome.get("type")
    if kind == "succeeded":
        message = outcome["message"]
        text = "".join(part.get("text", "") for part in message.get("content") or [] if part.get("type") == "text")
        usage = message.get("usage") or {}
        body = {"id": message.get("id"), "object": "chat.completion", "model": message.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": "length" if message.get("stop_reason") == "max_tokens" else "stop"}],
                "usage": {"prompt_tokens": usage.get("input_tokens", 0), "completion_tokens": usage.get("output_tokens", 0)}}
        return {"custom_id": result["custom_id"], "response": {"status_code": 200, "body": body}, "error": None}
    if kind == "errored":
        error = (outcome.get("error") or {}).get("error") or outcome.get("error") or {}
        status = 400 if error.get("type") == "invalid_request_error" else 500
        return {"custom_id": result["custom_id"], "response": {"status_code": status, "body": {"error": error}},
                "error": None}
    return None
