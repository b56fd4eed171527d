"""A fake OpenAI Batch API (Files + Batches) on top of the fake chat server, for tests.

``FakeBatchAPI`` is ``fake_openai_server.FakeOpenAI`` (so ``/v1/chat/completions``,
``/v1/models``, ``/stats`` and ``/reset`` all still work) plus:

* ``POST /v1/files`` (multipart ``purpose`` = ``"batch"``, ``file``), ``GET /v1/files/{id}``,
  ``GET /v1/files/{id}/content``, ``DELETE /v1/files/{id}``.  Files live on disk, in a
  temporary directory the server removes when it stops, and are streamed in and out, so
  request files of 100 MB and more cost the server no memory.  An uploaded file is
  checked line by line at once: every non-empty line must be a JSON object
  with ``custom_id`` (a string), ``method``, ``url`` and ``body`` (an object).  A file
  that breaks this is still stored ("processed"), but a batch on it fails validation
  with ``errors.data[0].line`` naming the first bad line.
* ``POST /v1/batches``, ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``
  (409 once the batch is finished) and ``GET /v1/batches?limit=&after=`` (newest
  first, cursor pagination as the ``openai`` client expects).

A batch's status follows a timer from its creation, ``batch_seconds`` long:
``validating`` for the first 10 %, then ``in_progress`` until 80 %, ``finalizing``
until 100 %, then its outcome (an ``"expired"`` plan stays ``in_progress`` until the
end).  The state is worked out whenever a client looks (retrieve, list, cancel), and
request lines are answered then, once each, in file order: while ``in_progress``
the first ``floor(total * fraction of in_progress elapsed)`` lines are answered, so
``request_counts`` grow with time.  Each line's ``body`` is answered by the chat
server's own logic (``FakeOpenAI.answer`` without its sleeps), so ``reply``,
``replies``, ``rules`` and their fault scripts, ``fail_every`` and logprobs act on
batch lines as on chat requests, in the order the lines are answered; batch lines
also count in ``requests``/``by_status``/``by_rule``/``by_fault`` of ``/stats`` and
share the request number ``fail_every`` counts.

A line answered with HTTP 200 goes to the output file as ``{"id": "batch_req_N",
"custom_id", "response": {"status_code": 200, "request_id": "req_N", "body":
<chat.completion>}, "error": null}`` (a ``"garbage"`` fault's truncated body is put
there as a string; a ``"hang"`` is answered at once); any other status goes to the
error file in the same shape with that status and the error JSON as ``body``.  Lines
are written to those files as they are answered (and read from the input file as they
are needed); the files get their ids when the batch reaches its outcome, and
``output_file_id`` / ``error_file_id`` stay null when they would be empty.

Outcomes:

``completed``  every line answered; ``request_counts.completed``/``failed`` count the
               200s and the others.
``failed``     validation failed: ``failed`` right after ``validating``, with
               ``errors = {"object": "list", "data": [{"code": "invalid_request",
               "message", "param": null, "line"}]}``, no files, request_counts all 0.
               Also the outcome of a batch on an invalid file, an empty file, a line
               whose ``url`` is not the batch's endpoint or whose ``method`` is not
               POST, or a repeated ``custom_id``.
``expired``    at the end time, with only the first ``done`` lines answered (in the
               output/error files as usual); the rest are in neither file.
``cancelled``  ``POST .../cancel`` answers ``cancelling`` (``cancelling_at`` set) with
               the lines answered by then; the next look shows ``cancelled``
               (``cancelled_at``) with just those lines in the files.

From a test::

    from fake_batch_server import serve, stats

    with serve({"batch_seconds": 0.3, "batches": [{"outcome": "expired", "done": 3}]}) as url:
        client = openai.OpenAI(base_url=url, api_key="test")
        f = client.files.create(file=("in.jsonl", jsonl_bytes), purpose="batch")
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
        ...

By hand: ``python tests/fake_batch_server.py --port 8000 --config-json '{"batch_seconds": 5}'``.

Config keys: every key of ``fake_openai_server`` (``latency`` applies only to chat
requests, not to batch lines), plus (all optional):

``batch_seconds``  seconds from creation to a batch's outcome (1.0); 0 makes the first
                   look after the create show the outcome
``batches``        list of plans, one per created batch in creation order (0-based,
                   counting only batches actually created); a batch past the end of
                   the list completes.  A plan is ``{"outcome": "completed" | "failed" |
                   "expired", "done": N}``; ``done`` (only for "expired", default 0) is
                   how many lines, the first in file order, are answered before expiry
``create_faults``  list of fault kinds, "429", "500" or "ok" (none), for the successive
                   ``POST /v1/batches`` attempts: attempt n (0-based, every POST counts)
                   gets ``create_faults[n]`` while n < len and creates nothing.  A 429
                   has code ``token_limit_exceeded`` and the ``Retry-After`` /
                   ``retry-after-ms`` headers of ``retry_after``
``enqueued_token_limit``  the input tokens (a prompt's text / 4, as the chat fake counts
                   them) the open batches (validating, in progress, finalizing) may hold
                   together (None: no limit).  A create past it is refused the way
                   ``enqueued_limit_mode`` says: "fail" (OpenAI's: the batch is created, then
                   fails validation with ``errors.data[0].code = "token_limit_exceeded"``) or
                   "429" (a LiteLLM proxy's: a 429 with that code at create)

``/stats`` adds: ``files_uploaded``, ``batch_create_attempts``, ``batches_created``,
``batch_lines`` (request lines of created batches), ``batch_lines_answered``,
``cancels`` (accepted cancel requests), ``max_enqueued_tokens`` (the most the queue
held after a create), ``queue_refusals`` (creates past the limit) and ``batches``
({id: the status a client last saw}).  ``POST /reset`` clears those and forgets every file and batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Iterator

from aiohttp import web

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fake_openai_server  # noqa: E402
from fake_openai_server import FakeOpenAI, _error, _message_text, retry_after_headers, validate_config  # noqa: E402

CHAT_ENDPOINT = "/v1/chat/completions"
OUTCOMES = ("completed", "failed", "expired")
CREATE_FAULT_KINDS = ("429", "500", "ok")  # "ok": that attempt is served normally
BATCH_DEFAULTS: dict[str, Any] = {"batch_seconds": 1.0, "batches": [], "create_faults": [],
                                  "enqueued_token_limit": None, "enqueued_limit_mode": "fail"}
OPEN = ("validating", "in_progress", "finalizing")  # the states of a batch whose tokens are enqueued
PLAN_KEYS = {"outcome", "done"}
FINISHED = ("completed", "failed", "expired", "cancelled")
# Fractions of batch_seconds at which validating and in_progress end.
VALIDATING_END, IN_PROGRESS_END = 0.1, 0.8


def validate_batch_config(config: dict | None) -> dict:
    """Return ``config`` merged over the chat and batch defaults; raise ValueError on bad values."""
    config = dict(config or {})
    batch = {**BATCH_DEFAULTS, **{k: config.pop(k) for k in BATCH_DEFAULTS if k in config}}
    merged = {**validate_config(config), **batch}
    if float(merged["batch_seconds"]) < 0:
        raise ValueError("batch_seconds must be >= 0")
    if merged["enqueued_limit_mode"] not in ("fail", "429"):
        raise ValueError("enqueued_limit_mode is 'fail' (OpenAI's: the batch fails) or '429' (a proxy's: refused at create)")
    bad = [f for f in merged["create_faults"] if f not in CREATE_FAULT_KINDS]
    if bad:
        raise ValueError(f"unknown create_faults kinds {bad}; known: {CREATE_FAULT_KINDS}")
    plans = []
    for plan in merged["batches"]:
        if not isinstance(plan, dict) or set(plan) - PLAN_KEYS or plan.get("outcome", "completed") not in OUTCOMES:
            raise ValueError(f"a batch plan is {{'outcome': one of {OUTCOMES}, 'done': N}}: {plan!r}")
        outcome = plan.get("outcome", "completed")
        if "done" in plan and outcome != "expired":
            raise ValueError(f"'done' only goes with outcome 'expired': {plan!r}")
        done = int(plan.get("done", 0))
        if done < 0:
            raise ValueError(f"'done' must be >= 0: {plan!r}")
        plans.append({"outcome": outcome, "done": done} if outcome == "expired" else {"outcome": outcome})
    merged["batches"] = plans
    merged["create_faults"] = list(merged["create_faults"])
    return merged


# --------------------------------------------------------------------------- state


class _File:
    """A file on disk in the server's directory (a request file may be 200 MB: it is never held
    in memory, nor are the requests parsed from it)."""

    def __init__(self, id_: str, filename: str, purpose: str, path: str) -> None:
        self.id = id_
        self.filename = filename
        self.purpose = purpose
        self.path = path
        self.bytes = os.path.getsize(path)
        self.created_at = int(time.time())
        self.requests = 0  # request lines (valid ones, up to the first bad line)
        self.tokens = 0  # their input tokens, as the fake server counts a prompt's (its text / 4)
        self.invalid: tuple[int, str] | None = None  # (1-based line, message) of the first bad line
        # (line, message) of the first line a chat-completions batch rejects: another url, a method
        # other than POST, a repeated custom_id.
        self.rejected: tuple[int, str] | None = None

    def check_requests(self) -> None:
        """One pass over the lines: count the requests and note the first bad or rejected line."""
        seen: set[str] = set()
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    self.invalid = (number, f"Line {number} is not UTF-8 text.")
                    return
                if not line.strip():
                    continue
                try:
                    request = json.loads(line)
                except ValueError:
                    self.invalid = (number, f"Line {number} is not valid JSON.")
                    return
                if not isinstance(request, dict):
                    self.invalid = (number, f"Line {number} is not a JSON object.")
                    return
                missing = [k for k in ("custom_id", "method", "url", "body") if k not in request]
                if missing:
                    self.invalid = (number, f"Line {number} is missing {', '.join(missing)}.")
                    return
                if not isinstance(request["custom_id"], str) or not isinstance(request["body"], dict):
                    self.invalid = (number, f"Line {number}: custom_id must be a string and body an object.")
                    return
                self.requests += 1
                self.tokens += max(1, len(_message_text(request["body"].get("messages") or [])) // 4)
                if self.rejected is None:
                    if request["url"] != CHAT_ENDPOINT:
                        self.rejected = (number, f"Line {number}: url {request['url']!r} does not match the "
                                                 f"batch endpoint {CHAT_ENDPOINT!r}.")
                    elif str(request["method"]).upper() != "POST":
                        self.rejected = (number, f"Line {number}: method must be POST.")
                    elif request["custom_id"] in seen:
                        self.rejected = (number, f"Line {number}: custom_id {request['custom_id']!r} is repeated.")
                    seen.add(request["custom_id"])

    def each_request(self) -> Iterator[dict]:
        """The request lines in file order, read as they are asked for."""
        with open(self.path, "rb") as f:
            for raw in f:
                if raw.strip():
                    yield json.loads(raw)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


class _Batch:
    def __init__(self, id_: str, input_file: _File, body: dict, plan: dict, seconds: float, directory: str) -> None:
        self.id = id_
        self.input_file = input_file
        self.endpoint = body["endpoint"]
        self.completion_window = body["completion_window"]
        self.metadata = body.get("metadata")
        self.plan = plan
        self.seconds = seconds
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.created_at = int(self.wall0)
        self.status = "validating"
        self.total = input_file.requests
        # The lines answered so far go straight to the output file (HTTP 200) or the error file.
        self.pending = input_file.each_request()
        self.paths = {ok: os.path.join(directory, f"{id_}_{'output' if ok else 'error'}.jsonl") for ok in (True, False)}
        self.written = {True: open(self.paths[True], "w"), False: open(self.paths[False], "w")}
        self.answered = {True: 0, False: 0}
        self.times: dict[str, int | None] = dict.fromkeys(
            ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
             "cancelling_at", "cancelled_at"))
        self.errors: dict | None = None
        self.over_limit = False  # created past the enqueued token limit: fails at validation
        self.output_file_id: str | None = None
        self.error_file_id: str | None = None

    @property
    def lines_answered(self) -> int:
        return self.answered[True] + self.answered[False]

    def at(self, fraction: float) -> int:
        return int(self.wall0 + fraction * self.seconds)

    def counts(self) -> dict:
        if self.status == "failed":
            return {"total": 0, "completed": 0, "failed": 0}
        return {"total": self.total, "completed": self.answered[True], "failed": self.answered[False]}

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": self.errors,
            "input_file_id": self.input_file.id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.created_at + 24 * 3600,
            **self.times,
            "request_counts": self.counts(),
            "metadata": self.metadata,
        }


def _validation_error(batch: _Batch) -> tuple[int, str] | None:
    """(line, message) of why ``batch`` fails validation, or None."""
    if batch.over_limit:
        return None, ("Enqueued token limit reached for this model in the organization (fake). Please try again once "
                      "some in_progress batches have been completed.")
    if batch.plan.get("outcome") == "failed":
        return 1, "The batch failed validation (fake fault)."
    file = batch.input_file
    if file.invalid is not None:
        return file.invalid
    if not file.requests:
        return 1, "The input file has no requests."
    return file.rejected


# --------------------------------------------------------------------------- server


class FakeBatchAPI(FakeOpenAI):
    """The fake chat server plus in-memory Files and Batches endpoints."""

    def __init__(self, config: dict | None = None) -> None:
        # Not super().__init__: its validate_config rejects the batch keys.
        self.config = validate_batch_config(config)
        self.directory = tempfile.mkdtemp(prefix="fake-batch-api-")  # every file, removed at exit
        self.reset()

    def reset(self) -> None:
        super().reset()
        for name in os.listdir(self.directory):  # a batch still reading its input keeps its open file
            os.remove(os.path.join(self.directory, name))
        self.files: dict[str, _File] = {}
        self.batch_objects: dict[str, _Batch] = {}  # in creation order
        self.file_counter = 0
        self.batch_counter = 0
        self.line_counter = 0
        self.files_uploaded = 0
        self.batch_create_attempts = 0
        self.batch_lines = 0
        self.batch_lines_answered = 0
        self.cancels = 0
        self.max_enqueued_tokens = 0  # the most the queue held, at any create
        self.queue_refusals = 0  # creates past the enqueued token limit (failed batches, or 429s)

    def app(self) -> web.Application:
        app = super().app()
        app.middlewares.append(self._note_key)
        app.on_cleanup.append(self._remove_directory)
        app.router.add_post("/v1/files", self.upload_file)
        app.router.add_get("/v1/files/{file_id}", self.get_file)
        app.router.add_delete("/v1/files/{file_id}", self.delete_file)
        app.router.add_get("/v1/files/{file_id}/content", self.get_file_content)
        app.router.add_post("/v1/batches", self.create_batch)
        app.router.add_get("/v1/batches", self.list_batches)
        app.router.add_get("/v1/batches/{batch_id}", self.get_batch)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self.cancel_batch)
        return app

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response({
            **self.stats.to_json(),
            "files_uploaded": self.files_uploaded,
            "batch_create_attempts": self.batch_create_attempts,
            "batches_created": len(self.batch_objects),
            "batch_lines": self.batch_lines,
            "batch_lines_answered": self.batch_lines_answered,
            "cancels": self.cancels,
            "max_enqueued_tokens": self.max_enqueued_tokens,
            "queue_refusals": self.queue_refusals,
            "batches": {b.id: b.status for b in self.batch_objects.values()},
        })

    async def _remove_directory(self, app: web.Application) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    # ----------------------------------------------------------------- files

    def _new_file(self, filename: str, purpose: str, path: str) -> _File:
        """Register the file at ``path`` (in the server's directory) under a new id."""
        self.file_counter += 1
        file = _File(f"file-{self.file_counter}", filename, purpose, path)
        self.files[file.id] = file
        return file

    def _file_or_404(self, request: web.Request) -> _File | web.Response:
        file_id = request.match_info["file_id"]
        file = self.files.get(file_id)
        if file is None:
            return _error(404, f"No such File object: {file_id}", "invalid_request_error")
        return file

    async def upload_file(self, request: web.Request) -> web.Response:
        try:
            parts = await request.multipart()
        except (ValueError, AssertionError):
            return _error(400, "Expected a multipart/form-data body.", "invalid_request_error")
        purpose, filename, path = None, None, None
        try:
            while (part := await parts.next()) is not None:
                if part.name == "purpose":
                    purpose = await part.text()
                elif part.name == "file":  # streamed to disk a chunk at a time
                    filename = part.filename or "upload.jsonl"
                    path = os.path.join(self.directory, f"upload-{self.file_counter + 1}-{time.time_ns()}")
                    with open(path, "wb") as f:
                        while chunk := await part.read_chunk():
                            f.write(chunk)
            if purpose != "batch":
                return _error(400, f"The fake server only takes purpose 'batch', not {purpose!r}.",
                              "invalid_request_error", "invalid_value")
            if path is None:
                return _error(400, "Missing the 'file' part.", "invalid_request_error")
        except BaseException:
            if path is not None:
                os.remove(path)
            raise
        file = self._new_file(filename, "batch", path)
        path = None
        file.check_requests()
        self.files_uploaded += 1
        return web.json_response(file.to_json())

    async def get_file(self, request: web.Request) -> web.Response:
        file = self._file_or_404(request)
        return file if isinstance(file, web.Response) else web.json_response(file.to_json())

    async def delete_file(self, request: web.Request) -> web.Response:
        file = self._file_or_404(request)
        if isinstance(file, web.Response):
            return file
        del self.files[file.id]
        os.remove(file.path)  # a batch still reading it keeps its open file
        return web.json_response({"id": file.id, "object": "file", "deleted": True})

    async def get_file_content(self, request: web.Request) -> web.Response:
        file = self._file_or_404(request)
        if isinstance(file, web.Response):
            return file
        return web.FileResponse(file.path, headers={"Content-Type": "application/octet-stream"})

    # ----------------------------------------------------------------- batches

    def _batch_or_404(self, request: web.Request) -> _Batch | web.Response:
        batch_id = request.match_info["batch_id"]
        batch = self.batch_objects.get(batch_id)
        if batch is None:
            return _error(404, f"No such Batch object: {batch_id}", "invalid_request_error")
        return batch

    @web.middleware
    async def _note_key(self, request: web.Request, handler):
        """The Authorization header of every files and batches call, in the stats' `authorization`
        (chat requests note theirs themselves), so a test can prove which key a client sent."""
        authorization = request.headers.get("Authorization")
        if authorization and request.path.startswith(("/v1/files", "/v1/batches")):
            self.stats.authorization.add(authorization)
        return await handler(request)

    async def create_batch(self, request: web.Request) -> web.Response:
        config = self.config
        attempt = self.batch_create_attempts
        self.batch_create_attempts += 1
        fault = config["create_faults"][attempt] if attempt < len(config["create_faults"]) else None
        if fault == "429":
            return _error(429, "Enqueued token limit reached (fake fault).", "tokens",
                          "token_limit_exceeded", retry_after_headers(config["retry_after"]))
        if fault == "500":
            return _error(500, "The server had an error while processing your request (fake fault).",
                          "server_error")
        try:
            body = json.loads(await request.read())
            input_file_id = body["input_file_id"]
            endpoint = body["endpoint"]
            window = body["completion_window"]
        except (ValueError, KeyError, TypeError):
            return _error(400, "Body must be JSON with input_file_id, endpoint and completion_window.",
                          "invalid_request_error")
        if endpoint != CHAT_ENDPOINT:
            return _error(400, f"The fake server only supports endpoint {CHAT_ENDPOINT!r}.",
                          "invalid_request_error", "invalid_value")
        if window != "24h":
            return _error(400, "completion_window must be '24h'.", "invalid_request_error", "invalid_value")
        file = self.files.get(input_file_id)
        if file is None:
            return _error(404, f"No such File object: {input_file_id}", "invalid_request_error")
        if file.purpose != "batch":
            return _error(400, f"File {input_file_id} does not have purpose 'batch'.", "invalid_request_error")
        over = False
        if config["enqueued_token_limit"] is not None:
            for other in self.batch_objects.values():
                await self._advance(other)
            enqueued = sum(b.input_file.tokens for b in self.batch_objects.values() if b.status in OPEN and not b.over_limit)
            over = enqueued + file.tokens > config["enqueued_token_limit"]
            if over:
                self.queue_refusals += 1
                if config["enqueued_limit_mode"] == "429":
                    return _error(429, f"Enqueued token limit reached (fake): {enqueued:,} enqueued, limit "
                                  f"{config['enqueued_token_limit']:,}.", "tokens", "token_limit_exceeded",
                                  retry_after_headers(config["retry_after"]))
            else:
                self.max_enqueued_tokens = max(self.max_enqueued_tokens, enqueued + file.tokens)
        index = len(self.batch_objects)
        plans = config["batches"]
        plan = plans[index] if index < len(plans) else {"outcome": "completed"}
        self.batch_counter += 1
        batch = _Batch(f"batch_{self.batch_counter}", file, body, plan, float(config["batch_seconds"]), self.directory)
        batch.over_limit = over
        self.batch_objects[batch.id] = batch
        self.batch_lines += batch.total
        return web.json_response(batch.to_json())

    async def get_batch(self, request: web.Request) -> web.Response:
        batch = self._batch_or_404(request)
        if isinstance(batch, web.Response):
            return batch
        await self._advance(batch)
        return web.json_response(batch.to_json())

    async def list_batches(self, request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", 20))
        except ValueError:
            return _error(400, "limit must be an integer.", "invalid_request_error")
        if not 1 <= limit <= 100:
            return _error(400, "limit must be between 1 and 100.", "invalid_request_error")
        newest_first = list(reversed(self.batch_objects.values()))
        after = request.query.get("after")
        if after is not None:
            ids = [b.id for b in newest_first]
            newest_first = newest_first[ids.index(after) + 1:] if after in ids else []
        page = newest_first[:limit]
        for batch in page:
            await self._advance(batch)
        return web.json_response({
            "object": "list",
            "data": [b.to_json() for b in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(newest_first) > limit,
        })

    async def cancel_batch(self, request: web.Request) -> web.Response:
        batch = self._batch_or_404(request)
        if isinstance(batch, web.Response):
            return batch
        if batch.status != "cancelling":  # a second cancel returns it unchanged
            await self._advance(batch)  # answers the lines due by now
            if batch.status in FINISHED:
                return _error(409, f"Cannot cancel a batch with status {batch.status!r}.",
                              "invalid_request_error")
            batch.status = "cancelling"
            batch.times["cancelling_at"] = int(time.time())
            self.cancels += 1
        return web.json_response(batch.to_json())

    async def _advance(self, batch: _Batch) -> None:
        """Bring ``batch`` to the state its timer has reached, answering the lines due."""
        if batch.status in FINISHED:
            return
        if batch.status == "cancelling":  # cancelled from the first look after the cancel
            self._finish(batch, "cancelled", "cancelled_at", int(time.time()))
            return
        seconds = batch.seconds
        elapsed = time.monotonic() - batch.t0
        if elapsed < VALIDATING_END * seconds:
            return
        problem = _validation_error(batch)
        if problem is not None:
            line, message = problem
            code = "token_limit_exceeded" if batch.over_limit else "invalid_request"
            error = {"code": code, "message": message, "param": None, "line": line}
            batch.errors = {"object": "list", "data": [error]}
            self._finish(batch, "failed", "failed_at", batch.at(VALIDATING_END))
            return
        batch.times["in_progress_at"] = batch.at(VALIDATING_END)
        expired = batch.plan.get("outcome") == "expired"
        limit = min(batch.plan["done"], batch.total) if expired else batch.total
        if elapsed < IN_PROGRESS_END * seconds:
            fraction = (elapsed - VALIDATING_END * seconds) / ((IN_PROGRESS_END - VALIDATING_END) * seconds)
            await self._answer_upto(batch, min(limit, math.floor(batch.total * fraction)))
            batch.status = "in_progress"
            return
        await self._answer_upto(batch, limit)
        if elapsed < seconds:
            if not expired:
                batch.status = "finalizing"
                batch.times["finalizing_at"] = batch.at(IN_PROGRESS_END)
            else:
                batch.status = "in_progress"
            return
        if expired:
            self._finish(batch, "expired", "expired_at", batch.at(1.0))
        else:
            batch.times["finalizing_at"] = batch.at(IN_PROGRESS_END)
            self._finish(batch, "completed", "completed_at", batch.at(1.0))

    async def _answer_upto(self, batch: _Batch, n: int) -> None:
        # answer(wait=False) never suspends, so two looks at one batch cannot interleave here.
        while batch.lines_answered < n:
            row = await self._answer_line(next(batch.pending))
            ok = row["response"]["status_code"] == 200
            batch.written[ok].write(json.dumps(row) + "\n")
            batch.answered[ok] += 1

    async def _answer_line(self, request: dict) -> dict:
        stats = self.stats
        number = stats.arrive(None)
        status = 500
        try:
            try:
                response = await self.answer(request["body"], number, wait=False)
                status = response.status
                raw = response.body
                try:
                    body: Any = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
            except Exception as exc:  # a malformed body the chat logic trips over
                status = 500
                body = {"error": {"message": f"The fake server failed on this request: {exc!r}",
                                  "type": "server_error", "param": None, "code": None}}
        finally:
            stats.in_flight -= 1
            stats.by_status[str(status)] += 1
        self.line_counter += 1
        self.batch_lines_answered += 1
        return {
            "id": f"batch_req_{self.line_counter}",
            "custom_id": request["custom_id"],
            "response": {"status_code": status, "request_id": f"req_{self.line_counter}", "body": body},
            "error": None,
        }

    def _finish(self, batch: _Batch, status: str, time_key: str, when: int) -> None:
        batch.status = status
        batch.times[time_key] = when
        batch.pending.close()
        for ok, written in batch.written.items():
            written.close()
            path = batch.paths[ok]
            if status == "failed" or not batch.answered[ok]:  # an empty file gets no id
                os.remove(path)
                continue
            file = self._new_file(os.path.basename(path), "batch_output", path)
            if ok:
                batch.output_file_id = file.id
            else:
                batch.error_file_id = file.id


# --------------------------------------------------------------------------- client-side helpers

stats = fake_openai_server.stats
reset = fake_openai_server.reset


@contextlib.contextmanager
def serve(config: dict | None = None, *, startup_timeout: float = 30.0) -> Iterator[str]:
    """Run the batch server in a subprocess; yield its base URL ``http://127.0.0.1:PORT/v1``."""
    with fake_openai_server.serve(config, startup_timeout=startup_timeout, script=os.path.abspath(__file__),
                                  validate=validate_batch_config) as base_url:
        yield base_url


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: ``python tests/fake_batch_server.py [--port N] [--config-json JSON]``."""
    fake_openai_server.main(argv, server_class=FakeBatchAPI,
                            description="Fake OpenAI Batch API (files, batches) and chat completions server.")


if __name__ == "__main__":
    main()
