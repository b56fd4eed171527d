"""The rating stage through Anthropic's Message Batches API (`anthropic_batch`), against a real
local fake of it (create with the requests inline, retrieve, list, cancel, results as JSONL,
batches that end on a timer, per-request errors): the same guarantees as `openai_batch`."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from alpagasus_ray.config import load_config
from alpagasus_ray.stages.rate import run_rate
from alpagasus_ray.store.rated import RatedStore

from processes import assert_key_nowhere, kill_with_a_batch_unrecorded
from fake_anthropic_batch_server import serve, stats


def _write_rows(path, n):
    rows = [{"instruction": f"ROW-{i:03d} Say hello.", "input": "", "output": "Hello."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _overrides(tmp_path, url, data, *extra):
    return [f"run_dir={tmp_path / 'run'}", f"data.path={data}", "rate.backend=anthropic_batch", f"rate.base_url={url}",
            "rate.model=claude-fake", "rate.max_retries=2", "rate.batch_poll_seconds=0.1",
            "rate.batch_poll_max_seconds=0.3", "rate.price_input_per_million=3", "rate.price_output_per_million=15",
            *extra]


def _statuses(run_dir):
    rated = pq.read_table(os.path.join(run_dir, "rated")).to_pylist()
    return {r["instruction"][:7]: (r["status"], r["score"], r["attempts"]) for r in rated}, rated


def test_completed_errored_expired_and_unreadable_rows_then_retry_failed_resends_only_failures(tmp_path, ray_local):
    """Two batches of 3: the first completes with a row errored and a reply without a score
    (asked again in a follow-up batch), the second expires with 1 of 3 answered. Then retry_failed."""
    data = _write_rows(tmp_path / "rows.jsonl", 6)
    rules = [{"match": "ROW-001", "faults": ["500"]}, {"match": "ROW-002", "reply": ["I cannot decide.", "3\nPartly."]}]
    plans = [{"outcome": "completed"}, {"outcome": "expired", "done": 1}]
    with serve({"rules": rules, "batch_seconds": 0.3, "batches": plans, "create_faults": ["429"],
                "retry_after": 0.1}) as url:
        summary = run_rate(load_config(None, _overrides(tmp_path, url, data, "rate.batch_max_requests=3")))
        first = stats(url)
        rows, rated = _statuses(tmp_path / "run")
        again = run_rate(load_config(None, _overrides(tmp_path, url, data, "rate.batch_max_requests=3",
                                                        "rate.retry_failed=true")))
        second = stats(url)
    assert rows == {"ROW-000": ("ok", 4.5, 1), "ROW-001": ("request_failed", None, 1), "ROW-002": ("ok", 3.0, 2),
                    "ROW-003": ("ok", 4.5, 1), "ROW-004": ("request_failed", None, 1),
                    "ROW-005": ("request_failed", None, 1)}
    errors = {r["instruction"][:7]: r["error"] for r in rated}
    assert errors["ROW-001"].startswith("batch line 500") and "api_error" in errors["ROW-001"]
    assert all("the batch expired before this row was answered" in errors[m] for m in ("ROW-004", "ROW-005"))
    # Two batches and the re-ask's; the 429 at the first create was retried by the client.
    assert first["batches_created"] == 3 and first["batch_requests"] == 6 + 1
    assert summary["cost_usd"] == pytest.approx((summary["tokens_in"] * 3 + summary["tokens_out"] * 15) / 1e6 * 0.5,
                                                abs=1e-6)
    # retry_failed: the 3 failed rows go out again, once; nothing else is sent.
    assert again["by_status"]["ok"] == 6 and again["rows_out"] == 6
    assert second["batch_requests"] - first["batch_requests"] == 3
    # Each row answered once, and again only when it was asked again: ROW-002 re-asked, ROW-001 retried.
    answered = {r["instruction"][:7]: second["answered"].get(r["id"], 0) for r in rated}
    assert answered == {"ROW-000": 1, "ROW-001": 2, "ROW-002": 2, "ROW-003": 1, "ROW-004": 1, "ROW-005": 1}


def test_detach_then_cancel_and_dry_run(tmp_path, ray_local):
    """A row too long for `rate.context_tokens` is set aside before a request file is written."""
    data = _write_rows(tmp_path / "rows.jsonl", 8)
    with open(data, "a") as f:
        f.write(json.dumps({"id": "too-long", "instruction": "Summarize.", "input": "", "output": "word " * 3000}) + "\n")
    with serve({"batch_seconds": 30}) as url:
        config = load_config(None, _overrides(tmp_path, url, data, "rate.batch_max_requests=3", "rate.context_tokens=2000"))
        dry = run_rate(config, dry_run=True)
        assert dry["too_long"] == 1 and dry["context"]["key"] == "rate.context_tokens"
        assert dry["request_files"] == 3 and dry["cost_usd_at_most"] == pytest.approx(
            dry["cost_usd_at_most_synchronous"] / 2, abs=1e-6)
        assert stats(url)["batches_created"] == 0
        detached = run_rate(config, detach=True)
        assert [b["status"] for b in detached["running_batches"]] == ["in_progress"] * 3
        cancelled = run_rate(config, cancel=True)
        seen = stats(url)
    assert cancelled["cancelled"] == 3 and seen["cancels"] == 3 and set(seen["batches"].values()) == {"ended"}
    assert cancelled["by_status"]["request_failed"] == 8 and cancelled["by_status"]["too_long"] == 1
    assert seen["batch_requests"] == 8
    _, rated = _statuses(tmp_path / "run")
    too_long = [r for r in rated if r["id"] == "too-long"]
    assert len(rated) == 9 and too_long[0]["status"] == "too_long" and "rate.context_tokens" in too_long[0]["error"]
    assert all("cancelled before this row was answered" in r["error"] for r in rated if r["id"] != "too-long")


@pytest.mark.slow
def test_kill_minus_nine_while_waiting_then_rerun_sends_nothing_twice(tmp_path, reap_ray_orphans):
    """The driver is killed -9 after it created every batch and before they end; a batch it had
    created without recording it is found and adopted. The rerun creates nothing and every row is
    answered once; the key is in no file it wrote."""
    key = "sk-ant-test-" + "CL4UDE" * 5
    data = _write_rows(tmp_path / "rows.jsonl", 9)
    run_dir = tmp_path / "run"
    env = {**os.environ, "ANTHROPIC_API_KEY": key}
    with serve({"batch_seconds": 6}) as url:
        command = [sys.executable, "-m", "alpagasus_ray.cli", "rate", "--config", "configs/rate_anthropic_batch.yaml",
                   *_overrides(tmp_path, url, data, "rate.batch_max_requests=4")]
        log1 = tmp_path / "first.log"
        kill_with_a_batch_unrecorded(command, env, run_dir, log1, batches=3)
        assert stats(url)["batches_created"] == 3
        assert not RatedStore(str(run_dir)).parts()
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        seen = stats(url)
    assert second.returncode == 0, second.stderr[-3000:]
    assert seen["batches_created"] == 3 and seen["batch_requests"] == 9
    assert sorted(seen["answered"].values()) == [1] * 9
    rated = pq.read_table(run_dir / "rated")
    assert rated.num_rows == 9 and set(rated["status"].to_pylist()) == {"ok"}
    assert_key_nowhere(key, run_dir, log1.read_text(), second.stdout, second.stderr)
