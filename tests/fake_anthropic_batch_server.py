"""A small but real fake of Anthropic's Message Batches API, for tests.

It answers, the way the API does (``anthropic`` SDK 2.x):

- ``POST /v1/messages/batches``: ``{"requests": [{"custom_id", "params"}, ...]}`` -> a MessageBatch;
- ``GET /v1/messages/batches/{id}``, ``GET /v1/messages/batches`` (newest first, ``limit``,
  ``after_id``), ``POST /v1/messages/batches/{id}/cancel``;
- ``GET /v1/messages/batches/{id}/results``: JSONL, one line per request, once the batch has ended:
  ``succeeded`` (a Message), ``errored``, ``canceled`` or ``expired``.

Each request is answered by the chat fake (``fake_openai_server.FakeOpenAI.answer``) from the
request's system and messages, so ``rules``, ``replies``, ``marker`` and faults work as there: a
request whose answer is an HTTP error comes back ``errored``. A batch moves on a timer
(``batch_seconds`` from creation to its end), answering its requests in order as it goes.

Config keys: every key of ``fake_openai_server``, plus ``batch_seconds`` (1.0), ``batches`` (a
plan per created batch, in order: ``{"outcome": "completed"}``, or ``{"outcome": "expired",
"done": N}``: N requests answered, the rest expire at the end) and ``create_faults`` ("429",
"500" or "ok" for the successive creates). ``/stats`` adds ``batches_created``,
``batch_requests`` (requests of created batches), ``answered`` ({custom_id: times answered}),
``cancels`` and ``batches`` ({id: processing status}).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any, Iterator

from aiohttp import web

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fake_openai_server  # noqa: E402
from fake_openai_server import FakeOpenAI, retry_after_headers, validate_config  # noqa: E402

DEFAULTS: dict[str, Any] = {"batch_seconds": 1.0, "batches": [], "create_faults": []}


def validate_anthropic_config(config: dict | None) -> dict:
    config = dict(config or {})
    extra = {**DEFAULTS, **{k: config.pop(k) for k in DEFAULTS if k in config}}
    for plan in extra["batches"]:
        if plan.get("outcome", "completed") not in ("completed", "expired") or set(plan) - {"outcome", "done"}:
            raise ValueError(f"a batch plan is {{'outcome': 'completed' | 'expired', 'done': N}}: {plan!r}")
    if any(f not in ("429", "500", "ok") for f in extra["create_faults"]):
        raise ValueError("create_faults are '429', '500' or 'ok'")
    return {**validate_config(config), **extra}


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def _error(status: int, kind: str, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"type": "error", "error": {"type": kind, "message": message}}, status=status,
                             headers=headers)


class _Batch:
    def __init__(self, id_: str, requests: list[dict], plan: dict, seconds: float) -> None:
        self.id, self.requests, self.plan, self.seconds = id_, requests, plan, seconds
        self.created = time.time()
        self.results: list[dict] = []  # in request order, as they are answered
        self.status = "in_progress"
        self.ended_at: float | None = None
        self.cancel_at: float | None = None

    def counts(self) -> dict:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        for result in self.results:
            counts[result["result"]["type"]] += 1
        counts["processing"] = len(self.requests) - len(self.results)
        return counts

    def to_json(self, base: str) -> dict:
        return {"id": self.id, "type": "message_batch", "processing_status": self.status,
                "request_counts": self.counts(), "created_at": _iso(self.created), "ended_at": _iso(self.ended_at),
                "expires_at": _iso(self.created + 24 * 3600), "archived_at": None,
                "cancel_initiated_at": _iso(self.cancel_at),
                "results_url": f"{base}/v1/messages/batches/{self.id}/results" if self.status == "ended" else None}


class FakeAnthropicBatches(FakeOpenAI):
    """The chat fake plus the Message Batches endpoints."""

    def __init__(self, config: dict | None = None) -> None:
        self.config = validate_anthropic_config(config)
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.batches: dict[str, _Batch] = {}
        self.create_attempts = 0
        self.cancels = 0
        self.answered: dict[str, int] = {}

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/v1/messages/batches", self.create)
        app.router.add_get("/v1/messages/batches", self.list)
        app.router.add_get("/v1/messages/batches/{id}", self.retrieve)
        app.router.add_post("/v1/messages/batches/{id}/cancel", self.cancel)
        app.router.add_get("/v1/messages/batches/{id}/results", self.results)
        return app

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response({**self.stats.to_json(), "batches_created": len(self.batches),
                                  "batch_requests": sum(len(b.requests) for b in self.batches.values()),
                                  "answered": self.answered, "cancels": self.cancels,
                                  "batches": {b.id: b.status for b in self.batches.values()}})

    def _base(self, request: web.Request) -> str:
        return f"{request.scheme}://{request.host}"

    async def create(self, request: web.Request) -> web.Response:
        attempt = self.create_attempts
        self.create_attempts += 1
        faults = self.config["create_faults"]
        fault = faults[attempt] if attempt < len(faults) else None
        if fault == "429":
            return _error(429, "rate_limit_error", "Too many batch requests in the queue (fake).",
                          retry_after_headers(self.config["retry_after"]))
        if fault == "500":
            return _error(500, "api_error", "Internal server error (fake).")
        try:
            requests = json.loads(await request.read())["requests"]
            ids = [r["custom_id"] for r in requests]
            assert all(isinstance(r["params"]["messages"], list) and r["params"]["max_tokens"] > 0 for r in requests)
        except (ValueError, KeyError, TypeError, AssertionError):
            return _error(400, "invalid_request_error", "requests: each needs custom_id and params (model, max_tokens, messages)")
        if len(set(ids)) != len(ids) or not ids:
            return _error(400, "invalid_request_error", "custom_id values must be unique, and there must be requests")
        plans = self.config["batches"]
        plan = plans[len(self.batches)] if len(self.batches) < len(plans) else {"outcome": "completed"}
        batch = _Batch(f"msgbatch_{len(self.batches) + 1:04d}", requests, plan, float(self.config["batch_seconds"]))
        self.batches[batch.id] = batch
        return web.json_response(batch.to_json(self._base(request)))

    async def retrieve(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "not_found_error", "No such batch.")
        await self._advance(batch)
        return web.json_response(batch.to_json(self._base(request)))

    async def list(self, request: web.Request) -> web.Response:
        newest = list(reversed(self.batches.values()))
        after = request.query.get("after_id")
        if after in self.batches:
            newest = newest[[b.id for b in newest].index(after) + 1:]
        limit = int(request.query.get("limit", 20))
        page = newest[:limit]
        for batch in page:
            await self._advance(batch)
        return web.json_response({"data": [b.to_json(self._base(request)) for b in page], "has_more": len(newest) > limit,
                                  "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None})

    async def cancel(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "not_found_error", "No such batch.")
        await self._advance(batch)
        if batch.status == "ended":
            return _error(409, "invalid_request_error", "The batch has ended and cannot be canceled.")
        if batch.cancel_at is None:
            batch.cancel_at = time.time()
            batch.status = "canceling"
            self.cancels += 1
        return web.json_response(batch.to_json(self._base(request)))

    async def results(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None or batch.status != "ended":
            return _error(404, "not_found_error", "No results: the batch has not ended.")
        return web.Response(body="".join(json.dumps(r) + "\n" for r in batch.results).encode(),
                            content_type="application/binary")

    async def _advance(self, batch: _Batch) -> None:
        """Bring `batch` to the state its timer (or a cancel) has reached."""
        if batch.status == "ended":
            return
        if batch.status == "canceling":  # ended at the first look after the cancel
            self._end(batch, "canceled")
            return
        elapsed = (time.time() - batch.created) / batch.seconds if batch.seconds else 1.0
        total = len(batch.requests)
        due = total if batch.plan.get("outcome") != "expired" else min(total, batch.plan.get("done", 0))
        await self._answer_upto(batch, min(due, int(total * min(1.0, elapsed / 0.8))))
        if elapsed >= 1.0:
            self._end(batch, "expired")

    async def _answer_upto(self, batch: _Batch, n: int) -> None:
        while len(batch.results) < n:
            item = batch.requests[len(batch.results)]
            batch.results.append({"custom_id": item["custom_id"], "result": await self._result(item["params"])})
            self.answered[item["custom_id"]] = self.answered.get(item["custom_id"], 0) + 1

    async def _result(self, params: dict) -> dict:
        """A request answered by the chat fake, as a Message Batch result."""
        messages = ([{"role": "system", "content": params["system"]}] if params.get("system") else []) + params["messages"]
        number = self.stats.arrive(None)
        try:
            response = await self.answer({"model": params.get("model"), "messages": messages,
                                          "max_tokens": params["max_tokens"]}, number, wait=False)
        finally:
            self.stats.in_flight -= 1
        self.stats.by_status[str(response.status)] += 1
        body = json.loads(response.body) if response.body else {}
        if response.status != 200:
            return {"type": "errored", "error": {"type": "error", "error": {
                "type": "api_error", "message": f"HTTP {response.status} (fake)"}}}
        choice = body["choices"][0]
        return {"type": "succeeded", "message": {
            "id": body["id"].replace("chatcmpl", "msg"), "type": "message", "role": "assistant", "model": body["model"],
            "content": [{"type": "text", "text": choice["message"]["content"]}],
            "stop_reason": "max_tokens" if choice["finish_reason"] == "length" else "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": body["usage"]["prompt_tokens"], "output_tokens": body["usage"]["completion_tokens"]}}}

    def _end(self, batch: _Batch, rest: str) -> None:
        """End the batch; the requests not answered end `rest` (canceled or expired)."""
        for item in batch.requests[len(batch.results):]:
            batch.results.append({"custom_id": item["custom_id"], "result": {"type": rest}})
        batch.status, batch.ended_at = "ended", time.time()


stats = fake_openai_server.stats
reset = fake_openai_server.reset


@contextlib.contextmanager
def serve(config: dict | None = None, *, startup_timeout: float = 30.0) -> Iterator[str]:
    """Run the server in a subprocess; yield its root URL ``http://127.0.0.1:PORT`` (the SDK's base_url)."""
    with fake_openai_server.serve(config, startup_timeout=startup_timeout, script=os.path.abspath(__file__),
                                  validate=validate_anthropic_config) as base_url:
        yield base_url[: -len("/v1")]


def main(argv: list[str] | None = None) -> None:
    fake_openai_server.main(argv, server_class=FakeAnthropicBatches, description="Fake Anthropic Message Batches API.")


if __name__ == "__main__":
    main()
