"""Checks the fake OpenAI Batch API against the real ``openai`` client (no Ray, a few seconds)."""

from __future__ import annotations

import json
import time
import urllib.request

import openai
import pytest

from fake_batch_server import reset, serve, stats, validate_batch_config
from fake_openai_server import DEFAULT_REPLY, tokenize

ENDPOINT = "/v1/chat/completions"


def request_line(custom_id: str, text: str, **overrides) -> dict:
    body = {"model": "grader", "messages": [{"role": "user", "content": text}]}
    return {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body, **overrides}


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def client_for(url: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="test", **{"max_retries": 0, **kwargs})


def submit(client: openai.OpenAI, rows: list[dict] | bytes, **kwargs):
    data = rows if isinstance(rows, bytes) else jsonl(rows)
    file = client.files.create(file=("in.jsonl", data), purpose="batch")
    return client.batches.create(input_file_id=file.id, endpoint=ENDPOINT, completion_window="24h", **kwargs)


def read_rows(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def poll(client: openai.OpenAI, batch_id: str, timeout: float = 10.0):
    """Retrieve until the batch is finished; return it and the statuses seen in order (deduplicated)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if not seen or seen[-1] != batch.status:
            seen.append(batch.status)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch, seen
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.02)


def test_validate_batch_config():
    config = validate_batch_config({"batch_seconds": 0, "batches": [{"outcome": "expired", "done": 2}, {}]})
    assert config["batches"] == [{"outcome": "expired", "done": 2}, {"outcome": "completed"}]
    assert validate_batch_config(config) == config  # idempotent: serve() validates, then the child again
    with pytest.raises(ValueError, match="unknown"):
        validate_batch_config({"batch_secs": 1})
    with pytest.raises(ValueError, match="create_faults"):
        validate_batch_config({"create_faults": ["hang"]})
    with pytest.raises(ValueError, match="plan"):
        validate_batch_config({"batches": [{"outcome": "lost"}]})
    with pytest.raises(ValueError, match="done"):
        validate_batch_config({"batches": [{"outcome": "completed", "done": 1}]})


def test_upload_poll_and_complete():
    rows = [request_line(f"row-{i}", f"question {i}") for i in range(4)]
    with serve({"batch_seconds": 1.0}) as url:  # in_progress for 0.7 s: polls see it
        client = client_for(url)
        data = jsonl(rows)
        file = client.files.create(file=("in.jsonl", data), purpose="batch")
        assert (file.id, file.object, file.bytes, file.filename, file.purpose, file.status) == (
            "file-1", "file", len(data), "in.jsonl", "batch", "processed")
        assert client.files.retrieve(file.id) == file
        assert client.files.content(file.id).content == data

        created = client.batches.create(input_file_id=file.id, endpoint=ENDPOINT, completion_window="24h",
                                        metadata={"job": "t"})
        assert (created.id, created.status, created.input_file_id, created.metadata) == (
            "batch_1", "validating", file.id, {"job": "t"})
        assert created.request_counts.model_dump() == {"total": 4, "completed": 0, "failed": 0}
        assert created.in_progress_at is None and created.output_file_id is None

        batch, seen = poll(client, created.id)
        assert seen[0] == "validating" and "in_progress" in seen and seen[-1] == "completed"
        assert set(seen) <= {"validating", "in_progress", "finalizing", "completed"}
        assert batch.request_counts.model_dump() == {"total": 4, "completed": 4, "failed": 0}
        assert batch.error_file_id is None and batch.errors is None
        assert None not in (batch.in_progress_at, batch.finalizing_at, batch.completed_at)
        assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at

        output = read_rows(client, batch.output_file_id)
        assert [row["custom_id"] for row in output] == [row["custom_id"] for row in rows]
        for n, row in enumerate(output, 1):
            assert row["id"] == f"batch_req_{n}" and row["error"] is None
            assert row["response"]["status_code"] == 200 and row["response"]["request_id"] == f"req_{n}"
            completion = openai.types.chat.ChatCompletion.model_validate(row["response"]["body"])
            assert completion.choices[0].message.content == DEFAULT_REPLY
            assert completion.usage.completion_tokens == len(tokenize(DEFAULT_REPLY))
            assert completion.usage.prompt_tokens == len(f"question {n - 1}") // 4
        out_file = client.files.retrieve(batch.output_file_id)
        assert (out_file.purpose, out_file.filename) == ("batch_output", "batch_1_output.jsonl")

        # The files are written once: a later look gives the same batch and file.
        assert client.batches.retrieve(batch.id) == batch
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve("file-99")
        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve("batch_99")
        with pytest.raises(openai.BadRequestError):
            client.files.create(file=("x.jsonl", data), purpose="fine-tune")

        s = stats(url)
        assert (s["files_uploaded"], s["batch_create_attempts"], s["batches_created"]) == (1, 1, 1)
        assert (s["batch_lines"], s["batch_lines_answered"], s["cancels"]) == (4, 4, 0)
        assert s["batches"] == {"batch_1": "completed"}
        assert s["requests"] == 4 and s["by_status"] == {"200": 4}  # lines count as chat requests


def test_line_faults_split_output_and_error_files():
    config = {
        "batch_seconds": 0,
        "rules": [
            {"match": "[boom]", "faults": ["500", "500"]},
            {"match": "[junk]", "faults": ["garbage"]},
            {"match": "[slow]", "faults": ["hang"], "reply": "3"},
        ],
    }
    texts = ["fine", "[boom] a", "[junk]", "[boom] b", "[slow]", "[boom] c"]
    rows = [request_line(f"r{i}", text) for i, text in enumerate(texts)]
    with serve(config) as url:
        client = client_for(url)
        batch, _ = poll(client, submit(client, rows).id)
        assert batch.status == "completed"
        assert batch.request_counts.model_dump() == {"total": 6, "completed": 4, "failed": 2}

        errors = read_rows(client, batch.error_file_id)
        assert [row["custom_id"] for row in errors] == ["r1", "r3"]
        for row in errors:
            assert row["response"]["status_code"] == 500
            assert row["response"]["body"]["error"]["type"] == "server_error"

        output = {row["custom_id"]: row["response"] for row in read_rows(client, batch.output_file_id)}
        assert list(output) == ["r0", "r2", "r4", "r5"]  # the third [boom] is past the rule's faults
        assert output["r2"] == {"status_code": 200, "request_id": "req_3", "body": '{"choices": ['}
        assert output["r4"]["body"]["choices"][0]["message"]["content"] == "3"  # a hang is answered at once
        assert output["r5"]["body"]["choices"][0]["message"]["content"] == DEFAULT_REPLY

        s = stats(url)
        assert s["by_status"] == {"200": 4, "500": 2}
        assert s["by_rule"] == {"[boom]": 3, "[junk]": 1, "[slow]": 1}
        assert s["by_fault"] == {"500": 2, "garbage": 1, "hang": 1}


def test_failed_and_expired_plans_and_invalid_files():
    config = {"batch_seconds": 0, "batches": [{"outcome": "failed"}, {"outcome": "expired", "done": 3}],
              "rules": [{"match": "[boom]", "faults": ["500"]}]}
    with serve(config) as url:
        client = client_for(url)
        # Plan 0: fails validation.
        batch, seen = poll(client, submit(client, [request_line("a", "x"), request_line("b", "y")]).id)
        assert seen == ["failed"]
        assert batch.errors.object == "list"
        assert [(e.code, e.line, e.param) for e in batch.errors.data] == [("invalid_request", 1, None)]
        assert batch.errors.data[0].message.endswith("(fake fault).")
        assert batch.output_file_id is None and batch.error_file_id is None
        assert batch.request_counts.model_dump() == {"total": 0, "completed": 0, "failed": 0}
        assert batch.failed_at is not None and batch.in_progress_at is None

        # Plan 1: expires with 3 of 5 lines answered (one of them a 500).
        rows = [request_line(f"r{i}", "[boom]" if i == 1 else f"q{i}") for i in range(5)]
        batch, seen = poll(client, submit(client, rows).id)
        assert seen == ["expired"]
        assert batch.expired_at is not None and batch.completed_at is None
        assert batch.request_counts.model_dump() == {"total": 5, "completed": 2, "failed": 1}
        output = [row["custom_id"] for row in read_rows(client, batch.output_file_id)]
        errors = [row["custom_id"] for row in read_rows(client, batch.error_file_id)]
        assert (output, errors) == (["r0", "r2"], ["r1"])  # r3 and r4 are in neither file
        assert stats(url)["batch_lines_answered"] == 3

        # No plan left, but the file is bad at line 3 (no body; the blank line 2 is skipped).
        bad = jsonl([request_line("a", "x")]) + b'\n{"custom_id": "b", "method": "POST", "url": "/v1/chat/completions"}\n'
        file = client.files.create(file=("bad.jsonl", bad), purpose="batch")
        assert file.status == "processed"
        batch = client.batches.create(input_file_id=file.id, endpoint=ENDPOINT, completion_window="24h")
        batch, _ = poll(client, batch.id)
        assert batch.status == "failed"
        assert [(e.line, e.message) for e in batch.errors.data] == [(3, "Line 3 is missing body.")]

        # A line whose url is not the batch's endpoint, and a repeated custom_id.
        batch, _ = poll(client, submit(client, [request_line("a", "x"), request_line("b", "y", url="/v1/embeddings")]).id)
        assert (batch.status, batch.errors.data[0].line) == ("failed", 2)
        batch, _ = poll(client, submit(client, [request_line("a", "x"), request_line("a", "y")]).id)
        assert (batch.status, batch.errors.data[0].line) == ("failed", 2)
        assert stats(url)["requests"] == 3  # no line of a failed batch is answered


def test_create_faults():
    with serve({"create_faults": ["429", "500", "429"], "retry_after": 0.05}) as url:
        client = client_for(url)
        file = client.files.create(file=("in.jsonl", jsonl([request_line("a", "x")])), purpose="batch")
        create = dict(input_file_id=file.id, endpoint=ENDPOINT, completion_window="24h")
        with pytest.raises(openai.RateLimitError) as excinfo:
            client.batches.create(**create)
        assert excinfo.value.code == "token_limit_exceeded"
        assert excinfo.value.message.endswith("Enqueued token limit reached (fake fault).")
        assert excinfo.value.response.headers["retry-after"] == "0.05"
        assert excinfo.value.response.headers["retry-after-ms"] == "50"
        with pytest.raises(openai.InternalServerError):
            client.batches.create(**create)
        assert (stats(url)["batch_create_attempts"], stats(url)["batches_created"]) == (2, 0)

        # Attempt 2 is a 429 again: a client with retries waits and succeeds on attempt 3.
        batch = client_for(url, max_retries=2).batches.create(**create)
        assert (batch.id, batch.status) == ("batch_1", "validating")  # faulted attempts created nothing
        s = stats(url)
        assert (s["batch_create_attempts"], s["batches_created"], s["batch_lines"]) == (4, 1, 1)
        with pytest.raises(openai.NotFoundError):
            client.batches.create(**{**create, "input_file_id": "file-99"})
        assert stats(url)["batch_create_attempts"] == 5


def test_cancel_mid_way():
    rows = [request_line(f"r{i}", f"q{i}") for i in range(20)]
    # in_progress from 0.5 s to 4 s, a line every 0.175 s: margin for a slow machine.
    with serve({"batch_seconds": 5.0}) as url:
        client = client_for(url)
        batch_id = submit(client, rows).id
        deadline = time.monotonic() + 10
        while True:  # until some but not all lines are answered
            batch = client.batches.retrieve(batch_id)
            if batch.request_counts.completed >= 1:
                break
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert batch.status == "in_progress"
        seen_done = batch.request_counts.completed

        cancelling = client.batches.cancel(batch_id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        assert cancelling.cancelled_at is None
        done = cancelling.request_counts.completed
        assert seen_done <= done < 20
        assert client.batches.cancel(batch_id).status == "cancelling"  # a second cancel changes nothing

        batch = client.batches.retrieve(batch_id)
        assert batch.status == "cancelled" and batch.cancelled_at is not None
        assert batch.request_counts.model_dump() == {"total": 20, "completed": done, "failed": 0}
        output = [row["custom_id"] for row in read_rows(client, batch.output_file_id)]
        assert output == [f"r{i}" for i in range(done)] and batch.error_file_id is None
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(batch_id)
        time.sleep(0.1)
        assert client.batches.retrieve(batch_id) == batch  # stays cancelled: no more lines answered
        s = stats(url)
        assert (s["cancels"], s["batch_lines_answered"], s["batches"]) == (1, done, {batch_id: "cancelled"})


def test_list_paginates_newest_first_and_reset():
    with serve({"batch_seconds": 0}) as url:
        client = client_for(url)
        ids = [submit(client, [request_line("a", "x")]).id for _ in range(5)]
        first_page = client.batches.list(limit=2)
        assert [b.id for b in first_page.data] == ["batch_5", "batch_4"] and first_page.has_more
        listed = list(client.batches.list(limit=2))  # auto-pagination with after=
        assert [b.id for b in listed] == ids[::-1]
        assert {b.status for b in listed} == {"completed"}  # listing advances them like retrieve

        root = url[: -len("/v1")]
        with urllib.request.urlopen(root + "/v1/batches?limit=2&after=batch_2") as response:
            page = json.loads(response.read())
        assert [b["id"] for b in page["data"]] == ["batch_1"]
        assert (page["object"], page["first_id"], page["last_id"], page["has_more"]) == (
            "list", "batch_1", "batch_1", False)

        reset(url)
        s = stats(url)
        assert (s["files_uploaded"], s["batch_create_attempts"], s["batches_created"], s["batches"]) == (0, 0, 0, {})
        assert s["requests"] == 0
        assert client.batches.list().data == []
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve("file-1")
        # The chat endpoint still works on the batch server.
        completion = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert completion.choices[0].message.content == DEFAULT_REPLY
