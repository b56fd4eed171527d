"""The rating stage with the openai backend, against a real local HTTP server that injects faults."""

import json
import math
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from alpagasus_ray.config import load_config
from alpagasus_ray.stages.rate import run_rate
from alpagasus_ray.store.rated import RatedStore

from fake_openai_server import serve, stats
from processes import assert_key_nowhere, kill_job_when

LN = math.log


def _write_rows(path, n, extra=()):
    rows = [{"instruction": f"ROW-{i:03d} Say hello.", "input": "", "output": "Hello."} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in [*rows, *extra]) + "\n")
    return path


def _by_marker(table):
    return {row["instruction"][:7]: row for row in table.to_pylist()}


def test_faults_parse_failures_and_bad_rows_each_end_with_the_right_status(tmp_path, ray_local):
    rules = [
        {"match": "ROW-001", "faults": ["429"]},
        {"match": "ROW-002", "faults": ["500", "500"]},
        {"match": "ROW-003", "faults": ["hang", "hang"]},
        {"match": "ROW-004", "faults": ["garbage"]},
        {"match": "ROW-005", "reply": ["I cannot decide.", "3\nPartly right."]},
        {"match": "ROW-006", "reply": ["Nope.", "Still no score."]},
        {"match": "ROW-007", "faults": ["empty"]},
        {"match": "ROW-008", "reply": "4.5\nFine.", "logprobs": [
            [["4", LN(0.6)], ["5", LN(0.3)], ["3", LN(0.1)]], [[".", LN(0.5)], ["\n", LN(0.5)]],
            [["5", 0.0]], [["\n", 0.0]], [["Fine", 0.0]], [[".", 0.0]]]},
        {"match": "BROKEN"},
    ]
    data = _write_rows(tmp_path / "rows.jsonl", 9, extra=[{"instruction": "BROKEN row without output"}])
    with serve({"rules": rules, "retry_after": 0.2, "hang_seconds": 5}) as url:
        config = load_config(None, [
            f"run_dir={tmp_path / 'run'}", f"data.path={data}", "rate.backend=openai", f"rate.base_url={url}",
            "rate.model=fake", "rate.max_retries=1", "rate.request_timeout=1", "rate.concurrency=8", "rate.batch_size=4",
        ])
        summary = run_rate(config)
        seen = stats(url)["by_rule"]
    rated = pq.read_table(tmp_path / "run" / "rated")
    rows = _by_marker(rated)
    assert rated.num_rows == 10 == summary["rows_in"] == summary["rows_out"]
    assert summary["by_status"] == {"ok": 6, "parse_failed": 1, "request_failed": 2, "invalid_input": 1, "too_long": 0}
    expect = {  # marker: (status, score, attempts)
        "ROW-000": ("ok", 4.5, 1), "ROW-001": ("ok", 4.5, 1), "ROW-002": ("request_failed", None, 1),
        "ROW-003": ("request_failed", None, 1), "ROW-004": ("ok", 4.5, 2), "ROW-005": ("ok", 3.0, 2),
        "ROW-006": ("parse_failed", None, 2), "ROW-007": ("ok", 4.5, 2), "ROW-008": ("ok", 4.5, 1),
        "BROKEN ": ("invalid_input", None, 0),
    }
    assert {m: (r["status"], r["score"], r["attempts"]) for m, r in rows.items()} == expect
    assert "InternalServerError 500" in rows["ROW-002"]["error"]
    assert "Timeout" in rows["ROW-003"]["error"]
    assert rows["ROW-006"]["error"] == "no score stated" and rows["ROW-006"]["review"] == "Still no score."
    assert rows["ROW-005"]["review"] == "Partly right."
    assert rows["ROW-008"]["score_expected"] == pytest.approx(4.375)
    assert rows["BROKEN "]["error"] == "missing field 'output'"
    assert all(r["error"] is None for r in rows.values() if r["status"] == "ok")
    assert {r["grader"] for r in rows.values()} == {"openai:fake"}
    # What the server saw: each fault retried by the client, unreadable replies asked once more, bad rows never sent.
    assert seen == {"ROW-001": 2, "ROW-002": 2, "ROW-003": 2, "ROW-004": 2, "ROW-005": 2, "ROW-006": 2,
                    "ROW-007": 2, "ROW-008": 1}


def test_rerun_sends_only_what_is_missing_and_retry_failed_resends_failures(tmp_path, ray_local):
    data = _write_rows(tmp_path / "rows.jsonl", 12)
    rules = [{"match": f"ROW-{i:03d}"} for i in range(12)]
    rules[3] = {"match": "ROW-003", "faults": ["500", "500"]}
    with serve({"rules": rules}) as url:
        overrides = [f"run_dir={tmp_path / 'run'}", f"data.path={data}", f"rate.base_url={url}", "rate.model=fake",
                     "rate.max_retries=1", "rate.batch_size=4"]
        first = run_rate(load_config(None, overrides))
        again = run_rate(load_config(None, overrides))
        after_rerun = stats(url)["by_rule"]
        retried = run_rate(load_config(None, [*overrides, "rate.retry_failed=true"]))
        after_retry = stats(url)["by_rule"]
    assert first["by_status"]["request_failed"] == 1 and again["by_status"] == first["by_status"]
    assert again["rows_sent_this_run"] == 0
    assert all(count == 1 for marker, count in after_rerun.items() if marker != "ROW-003")
    assert retried["rows_sent_this_run"] == 1 and retried["by_status"]["ok"] == 12
    assert after_retry["ROW-003"] == 3 and sum(after_retry.values()) == 11 + 3
    rated = pq.read_table(tmp_path / "run" / "rated")  # the failed row's first rating was replaced
    assert rated.num_rows == 12 and len(set(rated["id"].to_pylist())) == 12


def test_rate_limits_hold_across_workers(tmp_path, ray_local):
    data = _write_rows(tmp_path / "rows.jsonl", 16)
    with serve({"latency": 0.01}) as url:
        config = load_config(None, [
            f"run_dir={tmp_path / 'run'}", f"data.path={data}", f"rate.base_url={url}", "rate.model=fake",
            "rate.num_workers=2", "rate.concurrency=8", "rate.batch_size=2", "rate.requests_per_minute=600",
        ])
        summary = run_rate(config)
        arrivals = sorted(stats(url)["arrivals"])
    assert summary["by_status"]["ok"] == 16
    # 600/min is one request every 0.1 s for both workers together: no two arrivals closer than
    # the pace allows, beyond scheduling jitter on the server side.
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert arrivals[-1] - arrivals[0] >= 15 * 0.1 * 0.9
    assert sorted(gaps)[len(gaps) // 2] >= 0.08


def test_a_tokens_per_minute_limit_holds_across_workers(tmp_path, ray_local):
    """rate.tokens_per_minute: each request books its prompt's estimate plus max_tokens, so the
    requests of both workers together are spaced by what they book over the rate."""
    from alpagasus_ray.rules.prompts import estimate_tokens, rating_messages

    data = _write_rows(tmp_path / "rows.jsonl", 12)
    booked = sum(estimate_tokens(m["content"]) for m in rating_messages("ROW-000 Say hello.", "", "Hello.")) + 50
    per_minute = booked * 120  # two requests a second
    with serve({"latency": 0.01}) as url:
        config = load_config(None, [
            f"run_dir={tmp_path / 'run'}", f"data.path={data}", f"rate.base_url={url}", "rate.model=fake",
            "rate.num_workers=2", "rate.concurrency=8", "rate.batch_size=2", "rate.max_tokens=50",
            f"rate.tokens_per_minute={per_minute}",
        ])
        summary = run_rate(config)
        arrivals = sorted(stats(url)["arrivals"])
    assert summary["by_status"]["ok"] == 12
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert arrivals[-1] - arrivals[0] >= 11 * 0.5 * 0.9
    assert sorted(gaps)[len(gaps) // 2] >= 0.4


def test_an_autoscaling_pool_of_workers_keeps_the_concurrency(tmp_path, ray_local):
    """rate.num_workers=[1, 2]: Ray Data's autoscaling actor pool; the requests in flight never
    exceed rate.concurrency, whatever size the pool has."""
    from ray._private.state import actors  # from the GCS: the session's Ray runs without a dashboard

    def raters():
        return {i for i, a in actors().items() if "ApiMapper" in a.get("ActorClassName", "")}

    before = raters()
    data = _write_rows(tmp_path / "rows.jsonl", 96)
    with serve({"latency": 0.2}) as url:
        config = load_config(None, [
            f"run_dir={tmp_path / 'run'}", f"data.path={data}", f"rate.base_url={url}", "rate.model=fake",
            "rate.num_workers=[1, 2]", "rate.concurrency=4", "rate.batch_size=4",
        ])
        summary = run_rate(config)
        seen = stats(url)
    assert summary["by_status"]["ok"] == 96 and seen["requests"] == 96
    assert seen["max_in_flight"] <= 4
    assert len(raters() - before) == 2  # it grew to its largest size


def test_a_429_without_retry_after_is_retried_and_an_exhausted_quota_is_not(tmp_path, ray_local):
    """Real 429s often carry no Retry-After: the client backs off by itself and the row ends ok. A
    429 saying the quota is used up is not retried (waiting does not help): the row ends
    request_failed after one request, with the reason, for `retry_failed` to send once paid."""
    data = _write_rows(tmp_path / "rows.jsonl", 8)
    rules = [{"match": "ROW-002", "faults": ["429_no_retry_after"] * 2},
             {"match": "ROW-005", "faults": ["insufficient_quota"] * 10}]
    with serve({"latency": 0.01, "rules": rules}) as url:
        config = load_config(None, [
            f"run_dir={tmp_path / 'run'}", f"data.path={data}", f"rate.base_url={url}", "rate.model=fake",
            "rate.concurrency=4", "rate.batch_size=4", "rate.max_retries=5",
        ])
        summary = run_rate(config)
        seen = stats(url)
    assert summary["by_status"] == {"ok": 7, "parse_failed": 0, "request_failed": 1, "invalid_input": 0, "too_long": 0}
    assert seen["by_rule"]["ROW-002"] == 3 and seen["by_rule"]["ROW-005"] == 1  # two backoffs; no retry
    rows = _by_marker(RatedStore(str(tmp_path / "run")).read())
    failed = rows["ROW-005"]
    assert failed["status"] == "request_failed" and "429" in failed["error"] and "quota" in failed["error"]
    assert (rows["ROW-002"]["status"], rows["ROW-002"]["attempts"]) == ("ok", 1)


def test_a_429_retry_after_pauses_every_worker(tmp_path, ray_local):
    data = _write_rows(tmp_path / "rows.jsonl", 60)
    with serve({"latency": 0.05, "retry_after": 1.5, "rules": [{"match": "ROW-010", "faults": ["429"]}]}) as url:
        config = load_config(None, [
            f"run_dir={tmp_path / 'run'}", f"data.path={data}", f"rate.base_url={url}", "rate.model=fake",
            "rate.num_workers=2", "rate.concurrency=4", "rate.batch_size=4", "rate.requests_per_minute=60000",
        ])
        summary = run_rate(config)
        seen = stats(url)
    assert summary["by_status"]["ok"] == 60
    (t429, kind), = seen["fault_times"]
    assert kind == "429"
    # Without the pause, ~80 requests/s would arrive; requests already sent or past the limiter when
    # the 429 came back may still land early in the window, none after.
    during = [t for t in seen["arrivals"] if t429 + 0.4 < t < t429 + 1.4]
    assert during == []
    assert any(t > t429 + 1.4 for t in seen["arrivals"])


@pytest.mark.slow
@pytest.mark.parametrize("victims", ["driver", "whole job"])
def test_kill_minus_nine_then_rerun_finishes_without_resending_and_never_writes_the_key(tmp_path, reap_ray_orphans,
                                                                                          victims):
    """Kill -9 the driver (its Ray workers finish what they hold), or the driver and every Ray
    process it started at once (what is in flight is lost), then run the same command again."""
    key = "sk-test-" + "K3Y" * 8
    n = 96
    data = _write_rows(tmp_path / "rows.jsonl", n)
    run_dir = tmp_path / "run"
    with serve({"latency": 0.25, "rules": [{"match": f"ROW-{i:03d}"} for i in range(n)]}) as url:
        command = [sys.executable, "-m", "alpagasus_ray.cli", "rate", "--config", "configs/rate_openai_compatible.yaml",
                   f"rate.base_url={url}", f"data.path={data}", f"run_dir={run_dir}", "rate.concurrency=4",
                   "rate.num_workers=1", "rate.batch_size=4"]
        env = {**os.environ, "OPENAI_API_KEY": key}
        log1 = tmp_path / "first.log"
        store = RatedStore(str(run_dir))
        kill_job_when(command, env, log1, lambda: len(store.parts()) >= 3, children=victims == "whole job")
        finished_before_kill = set(store.read()["id"].to_pylist())
        markers_before = {r["instruction"][:7] for r in store.read().to_pylist()}
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        seen = stats(url)
    assert second.returncode == 0, second.stderr[-3000:]
    rated = pq.read_table(run_dir / "rated")
    assert rated.num_rows == n and len(set(rated["id"].to_pylist())) == n
    assert set(rated["status"].to_pylist()) == {"ok"}
    assert finished_before_kill <= set(rated["id"].to_pylist())
    # Rows saved before the kill were never sent again. Sent twice: at most the requests in flight
    # (rate.concurrency=4) and the answered rows of the batches partly done (batches of 4, rows
    # sent in order, so one batch besides the one whose last rows are in flight).
    assert all(seen["by_rule"][m] == 1 for m in markers_before)
    print("sent again after the kill:", seen["requests"] - n)
    assert seen["requests"] - n <= 4 + 4 + 3
    # The key was used, and is nowhere in what the job wrote or printed.
    assert seen["authorization"] == [f"Bearer {key}"]
    assert_key_nowhere(key, run_dir, log1.read_text(), second.stdout, second.stderr)
    assert key not in (run_dir / "rate_config.json").read_text()

