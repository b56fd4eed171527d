"""The rating stage through batch backends: a real local fake of OpenAI's Batch API (files and
batches endpoints, batches that move through their states on a timer), and vLLM's own batch runner."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from alpagasus_ray.llm.engines.files import BatchStore
from alpagasus_ray.config import load_config
from alpagasus_ray.rules.prompts import SCORE_CHOICES
from alpagasus_ray.stages.rate import run_rate
from alpagasus_ray.store.rated import RatedStore

from processes import assert_key_nowhere, kill_with_a_batch_unrecorded
from fake_batch_server import serve, stats


def _write_rows(path, n, extra=()):
    rows = [{"instruction": f"ROW-{i:03d} Say hello.", "input": "", "output": "Hello."} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in [*rows, *extra]) + "\n")
    return path


def _overrides(tmp_path, url, data, *extra):
    return [f"run_dir={tmp_path / 'run'}", f"data.path={data}", "rate.backend=openai_batch", f"rate.base_url={url}",
            "rate.model=fake", "rate.max_retries=2", "rate.batch_poll_seconds=0.1", "rate.batch_poll_max_seconds=0.3",
            "rate.price_input_per_million=2", "rate.price_output_per_million=8", *extra]


def _statuses(run_dir):
    rated = pq.read_table(os.path.join(run_dir, "rated")).to_pylist()
    return {r["instruction"][:7]: (r["status"], r["score"], r["attempts"]) for r in rated}, rated


def test_each_way_a_batch_ends_gives_exact_statuses_then_retry_failed_resends_only_failures(tmp_path, ray_local):
    """Four request files of 3 rows: one completes with a row failing (error file) and one reply
    without a score (asked again in a follow-up batch); one expires with 1 of 3 rows done; one
    fails validation; one completes after a 429 when it is created. Then `retry_failed`."""
    data = _write_rows(tmp_path / "rows.jsonl", 12, extra=[{"instruction": "BROKEN row without output"}])
    rules = [{"match": "ROW-001", "faults": ["500"]},
             {"match": "ROW-002", "reply": ["I cannot decide.", "3\nPartly right."]},
             {"match": "BROKEN"}]
    plans = [{"outcome": "completed"}, {"outcome": "expired", "done": 1}, {"outcome": "failed"}]
    with serve({"rules": rules, "batch_seconds": 0.3, "batches": plans, "create_faults": ["ok"] * 3 + ["429"],
                "retry_after": 0.2}) as url:
        summary = run_rate(load_config(None, _overrides(tmp_path, url, data, "rate.batch_max_requests=3")))
        first = stats(url)
        rows, rated = _statuses(tmp_path / "run")
        again = run_rate(load_config(None, _overrides(tmp_path, url, data, "rate.batch_max_requests=3",
                                                        "rate.retry_failed=true")))
        second = stats(url)
    assert summary["rows_in"] == summary["rows_out"] == len(rated) == 13
    expect = {  # marker: (status, score, attempts)
        "ROW-000": ("ok", 4.5, 1), "ROW-001": ("request_failed", None, 1), "ROW-002": ("ok", 3.0, 2),
        "ROW-003": ("ok", 4.5, 1), "ROW-004": ("request_failed", None, 1), "ROW-005": ("request_failed", None, 1),
        "ROW-006": ("request_failed", None, 1), "ROW-007": ("request_failed", None, 1),
        "ROW-008": ("request_failed", None, 1), "ROW-009": ("ok", 4.5, 1), "ROW-010": ("ok", 4.5, 1),
        "ROW-011": ("ok", 4.5, 1), "BROKEN ": ("invalid_input", None, 0),
    }
    assert rows == expect
    errors = {r["instruction"][:7]: r["error"] for r in rated}
    assert errors["ROW-001"].startswith("batch line 500") and "fake fault" in errors["ROW-001"]
    assert all("the batch expired before this row was answered" in errors[m] for m in ("ROW-004", "ROW-005"))
    assert all("the batch failed: invalid_request" in errors[m] for m in ("ROW-006", "ROW-007", "ROW-008"))
    assert summary["by_status"] == {"ok": 6, "parse_failed": 0, "request_failed": 6, "invalid_input": 1, "too_long": 0}
    # 4 request files and one re-ask file; the 429'd create was retried by the client, not resent.
    assert first["files_uploaded"] == 5 and first["batches_created"] == 5 and first["batch_create_attempts"] == 6
    assert first["batch_lines"] == 12 + 1
    assert summary["batches"]["request_files"] == 5
    assert summary["cost_usd"] == pytest.approx(
        (summary["tokens_in"] * 2 + summary["tokens_out"] * 8) / 1e6 * 0.5, abs=1e-6)
    assert summary["tokens_in"] > 0

    # retry_failed: the 6 failed rows go out again in one new batch; nothing else is sent.
    assert again["by_status"] == {"ok": 12, "parse_failed": 0, "request_failed": 0, "invalid_input": 1, "too_long": 0}
    assert second["batches_created"] - first["batches_created"] == 2  # 3 + 3 rows in files of 3
    assert second["batch_lines"] - first["batch_lines"] == 6
    rerated = pq.read_table(tmp_path / "run" / "rated")
    assert rerated.num_rows == 13 and len(set(rerated["id"].to_pylist())) == 13


def test_detach_cancel_and_dry_run(tmp_path, ray_local):
    """--detach returns with the batches running; --cancel stops them and keeps what they answered;
    a dry run counts request files and prices them at the batch price."""
    data = _write_rows(tmp_path / "rows.jsonl", 8)
    with serve({"batch_seconds": 30}) as url:
        dry = run_rate(load_config(None, _overrides(tmp_path, url, data, "rate.batch_max_requests=3")), dry_run=True)
        assert dry["request_files"] == 3 and dry["to_send"] == 8
        assert dry["cost_usd_at_most"] == pytest.approx(dry["cost_usd_at_most_synchronous"] / 2, abs=1e-6)
        assert stats(url)["files_uploaded"] == 0

        config = load_config(None, _overrides(tmp_path, url, data, "rate.batch_max_requests=3"))
        detached = run_rate(config, detach=True)
        assert [b["status"] for b in detached["running_batches"]] == ["validating"] * 3
        assert stats(url)["batches_created"] == 3
        cancelled = run_rate(config, cancel=True)
        seen = stats(url)
    assert cancelled["cancelled"] == 3 and seen["cancels"] == 3
    assert set(seen["batches"].values()) == {"cancelled"}
    assert cancelled["by_status"]["request_failed"] == 8  # cancelled while validating: nothing answered
    rows, rated = _statuses(tmp_path / "run")
    assert len(rated) == 8 and all("cancelled before this row was answered" in r["error"] for r in rated)


def test_reask_sync_asks_an_unreadable_reply_again_through_the_synchronous_api(tmp_path, ray_local):
    data = _write_rows(tmp_path / "rows.jsonl", 3)
    rules = [{"match": "ROW-001", "reply": ["I cannot decide.", "3\nPartly right."]}]
    with serve({"rules": rules, "batch_seconds": 0.2}) as url:
        summary = run_rate(load_config(None, _overrides(tmp_path, url, data, "rate.reask=sync")))
        seen = stats(url)
    rows, _ = _statuses(tmp_path / "run")
    assert rows == {"ROW-000": ("ok", 4.5, 1), "ROW-001": ("ok", 3.0, 2), "ROW-002": ("ok", 4.5, 1)}
    assert summary["rows_out"] == 3
    # One batch of 3 lines; the re-ask went to the chat endpoint, once.
    assert seen["batches_created"] == 1 and seen["batch_lines"] == 3
    assert seen["requests"] - seen["batch_lines_answered"] == 1


def _server_tokens(row: int) -> int:
    """The input tokens the fake counts for a row's rating request (its messages' text / 4)."""
    from alpagasus_ray.rules.prompts import rating_messages

    from fake_openai_server import _message_text

    return max(1, len(_message_text(rating_messages(f"ROW-{row:03d} Say hello.", "", "Hello.", fence=True))) // 4)


@pytest.mark.parametrize("limit_at", ["client", "server fails the batch", "server answers 429"])
def test_a_queue_of_enqueued_tokens_smaller_than_the_job_ends_every_row_ok(tmp_path, ray_local, limit_at):
    """8 request files of 10 rows against an account whose queue holds about 2.5 of them. With
    `batch_enqueued_token_limit` the files go as the queue has room; without it, a batch that fails
    for the limit (OpenAI) or a 429 at create (a proxy) only makes its file wait and go again."""
    data = _write_rows(tmp_path / "rows.jsonl", 80)
    limit = 25 * _server_tokens(0)
    client = [f"rate.batch_enqueued_token_limit={limit}"] if limit_at == "client" else []
    server = {"batch_seconds": 0.3, "enqueued_token_limit": limit, "retry_after": 0.1,
              "enqueued_limit_mode": "429" if limit_at == "server answers 429" else "fail"}
    with serve(server) as url:
        summary = run_rate(load_config(None, _overrides(tmp_path, url, data, "rate.batch_max_requests=10", *client)))
        seen = stats(url)
    records = BatchStore(str(tmp_path / "run" / "batches")).records()
    assert summary["rows_out"] == 80 and summary["by_status"]["ok"] == 80
    assert len(records) == 8 and all(r.status == "completed" and r.collected for r in records)
    assert seen["max_enqueued_tokens"] <= limit and seen["batch_lines_answered"] == 80  # each row answered once
    if limit_at == "client":
        assert seen["queue_refusals"] == 0 and seen["batches_created"] == 8
    else:
        assert seen["queue_refusals"] > 0
    if limit_at == "server fails the batch":  # each failed batch is on its file's record, and not adopted again
        failed = [b for r in records for b in r.requeued]
        assert len(failed) == seen["queue_refusals"] == seen["batches_created"] - 8
        assert all(seen["batches"][b] == "failed" for b in failed)


@pytest.mark.slow
def test_kill_minus_nine_while_waiting_then_rerun_collects_the_same_batches(tmp_path, reap_ray_orphans):
    """The driver is killed -9 after it sent every request file and before the batches end; a
    batch it had created without recording it (as a kill between the two would leave) is found
    and adopted. The rerun submits nothing; the key is in no file it wrote."""
    key = "sk-test-" + "B4TCH" * 6
    data = _write_rows(tmp_path / "rows.jsonl", 9)
    run_dir = tmp_path / "run"
    env = {**os.environ, "OPENAI_API_KEY": key}
    with serve({"batch_seconds": 6}) as url:
        command = [sys.executable, "-m", "alpagasus_ray.cli", "rate", "--config", "configs/rate_openai_batch.yaml",
                   *_overrides(tmp_path, url, data, "rate.batch_max_requests=4")]
        log1 = tmp_path / "first.log"
        kill_with_a_batch_unrecorded(command, env, run_dir, log1, batches=3)
        assert stats(url)["batches_created"] == 3
        assert not RatedStore(str(run_dir)).parts()  # killed before any batch ended
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        seen = stats(url)
    assert second.returncode == 0, second.stderr[-3000:]
    assert seen["files_uploaded"] == 3 and seen["batches_created"] == 3 and seen["batch_lines"] == 9
    rated = pq.read_table(run_dir / "rated")
    assert rated.num_rows == 9 and set(rated["status"].to_pylist()) == {"ok"}
    assert seen["authorization"] == [f"Bearer {key}"]
    assert_key_nowhere(key, run_dir, log1.read_text(), second.stdout, second.stderr)


@pytest.mark.slow
def test_vllm_run_batch_executes_the_request_files_and_the_collector_reads_them(tmp_path, tiny_model, ray_local):
    """rate.backend=vllm_batch: vLLM's own batch runner (`python -m vllm.entrypoints.openai.run_batch`)
    runs the request files as written for the Batch API; a row too long for the model is set aside
    before a request file is written."""
    rows = json.load(open("alpagasus_ray/sample/alpaca_sample.json"))[:6]
    rows.append({"id": "too-long", "instruction": "Summarize.", "input": "", "output": "word " * 3000})
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    config = load_config(None, [
        f"run_dir={tmp_path / 'run'}", f"data.path={data}", "rate.backend=vllm_batch", f"rate.model={tiny_model}",
        "rate.use_gpu=false", "rate.max_model_len=2048", "rate.max_tokens=4",
        "rate.extra_body={structured_outputs: {choice: [" + ", ".join(f'"{s}"' for s in SCORE_CHOICES) + "]}}",
    ])
    summary = run_rate(config)
    rated = {r["id"]: r for r in pq.read_table(tmp_path / "run" / "rated").to_pylist()}
    assert summary["rows_in"] == summary["rows_out"] == len(rated) == 7
    assert summary["by_status"] == {"ok": 6, "parse_failed": 0, "request_failed": 0, "invalid_input": 0, "too_long": 1}
    assert rated.pop("too-long")["status"] == "too_long"
    for row in rated.values():
        assert f"{row['score']:g}" in SCORE_CHOICES and row["attempts"] == 1 and row["tokens_in"] > 100
    assert summary["batches"]["by_status"] == {"completed": 1} and summary["cost_usd"] is None


def test_a_line_is_read_only_as_far_as_it_is_unambiguous(tmp_path):
    """`line_result` on single lines, no server: a reply with its logprobs, a body that is not a
    completion, an error line."""
    from alpagasus_ray.llm.engines import engine_for
    from alpagasus_ray.llm.engines.files import line_result
    from alpagasus_ray.stages.rating import RatingTask

    cfg = load_config(None, ["rate.backend=openai_batch", "rate.model=fake"]).rate
    task = RatingTask(cfg, engine_for(cfg, str(tmp_path)))
    row = {"id": "r1", "instruction": "Say hello.", "input": "", "output": "Hello."}
    top = [{"token": "4", "logprob": -0.1, "bytes": [52]}, {"token": "5", "logprob": -2.4, "bytes": [53]}]
    body = {"id": "c1", "object": "chat.completion", "model": "fake", "created": 0,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "4\nMostly right."},
                         "logprobs": {"content": [{"token": "4", "logprob": -0.1, "bytes": [52], "top_logprobs": top}]}}],
            "usage": {"prompt_tokens": 120, "completion_tokens": 5, "total_tokens": 125}}

    def line(body, status=200, error=None):
        return {"custom_id": "r1", "response": {"status_code": status, "body": body}, "error": error}

    ok = line_result(task, row, line(body), 1)
    assert (ok["status"], ok["score"], ok["tokens_in"], ok["tokens_out"]) == ("ok", 4.0, 120, 5)
    assert 4.0 < ok["score_expected"] < 4.2  # from the two alternatives' probabilities
    no_message = {**body, "choices": [{"index": 0, "finish_reason": "stop"}]}
    for unreadable in ('{"id": "c1", "choi', no_message, {**body, "choices": "4"}):
        failed = line_result(task, row, line(unreadable), 1)
        assert failed["status"] == "request_failed" and failed["error"].startswith("unreadable response body"), failed
        assert failed["score"] is None
    no_choices = line_result(task, row, line({**body, "choices": []}), 2)
    assert (no_choices["status"], no_choices["error"], no_choices["attempts"]) == (
        "request_failed", "a response with no choices", 2)
    error = {"error": {"type": "invalid_request_error", "message": "too long"}}
    failed = line_result(task, row, line(error, status=400), 1)
    assert failed["status"] == "request_failed" and failed["error"] == "batch line 400: invalid_request_error too long"


def test_request_files_are_cut_by_bytes_as_well_as_by_requests(tmp_path):
    """batch_max_bytes: no request file is larger, every row is in exactly one file beside its request
    line, and a row whose request alone is larger is refused, naming it."""
    import pyarrow as pa

    from alpagasus_ray.llm.engines import engine_for
    from alpagasus_ray.llm.engines.files import add_requests, write_requests
    from alpagasus_ray.stages.rating import RatingTask

    cfg = load_config(None, ["rate.backend=openai_batch", "rate.model=fake", "rate.batch_max_bytes=6000",
                             "rate.batch_max_requests=1000"]).rate
    store = BatchStore(str(tmp_path / "batches"))
    task = RatingTask(cfg, engine_for(cfg, store.uri))
    rows = pa.Table.from_pylist([{"id": f"r{i:02d}", "instruction": "Say hello. " * (1 + i % 7), "input": "",
                                  "output": "Hello.", "source": f"x:{i}"} for i in range(40)])
    records = write_requests(store, [add_requests(rows.slice(0, 25), task, cfg, 1), add_requests(rows.slice(25), task, cfg, 1)],
                             cfg, "first", 1)
    assert len(records) > 1 and sum(r.rows for r in records) == 40
    seen = []
    for record in records:
        requests = (tmp_path / "batches" / f"{record.name}.requests.jsonl").read_bytes()
        assert len(requests) == record.bytes <= 6000
        lines = [json.loads(line) for line in requests.splitlines()]
        assert [line["custom_id"] for line in lines] == store.rows(record, ["id"])["id"].to_pylist()
        seen += [line["custom_id"] for line in lines]
    assert seen == rows["id"].to_pylist()
    huge = add_requests(pa.Table.from_pylist([{"id": "big", "instruction": "x" * 7000, "input": "", "output": "y",
                                               "source": "x:0"}]), task, cfg, 1)
    with pytest.raises(ValueError, match=r"row big: its request alone \([\d,]+ bytes\) is larger than batch_max_bytes \(6,000\)"):
        write_requests(store, [huge], cfg, "first", 1)
