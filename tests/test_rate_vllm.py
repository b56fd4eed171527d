"""The rating stage on real vLLM (CPU build) with a tiny model built in the test: Ray Data LLM
engines, and vLLM's own OpenAI-compatible server behind the openai backend."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from alpagasus_ray.config import load_config
from alpagasus_ray.llm.engines.base import BATCHES_PER_BLOCK
from alpagasus_ray.rules.prompts import SCORE_CHOICES
from alpagasus_ray.stages.rate import run_rate

pytestmark = pytest.mark.slow


def _data(tmp_path, n, too_long=False, most_chars=None):
    rows = json.load(open("alpagasus_ray/sample/alpaca_sample.json"))
    if most_chars is not None:  # rows whose rating prompt fits a small context
        rows = [r for r in rows if len(r["instruction"]) + len(r["input"]) + len(r["output"]) <= most_chars]
    rows = rows[:n]
    if too_long:
        rows.append({"id": "too-long", "instruction": "Summarize.", "input": "", "output": "word " * 3000})
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    return path


def _vllm_config(tmp_path, model, data, *extra):
    return load_config(None, [
        f"run_dir={tmp_path / 'run'}", f"data.path={data}", "rate.backend=vllm", f"rate.model={model}",
        "rate.use_gpu=false", "rate.max_model_len=2048", "rate.batch_size=8", *extra,
    ])


def test_vllm_engine_scores_constrained_with_expected_score(tmp_path, tiny_model, ray_local):
    data = _data(tmp_path, 12, too_long=True)
    summary = run_rate(_vllm_config(tmp_path, tiny_model, data))
    rated = {r["id"]: r for r in pq.read_table(tmp_path / "run" / "rated").to_pylist()}
    assert summary["rows_in"] == summary["rows_out"] == len(rated) == 13
    # The row longer than the engine's context is counted with its tokenizer and never sent.
    assert summary["by_status"] == {"ok": 12, "parse_failed": 0, "request_failed": 0, "invalid_input": 0, "too_long": 1}
    assert summary["context"] == {"tokens": 2048, "key": "rate.max_model_len",
                                  "counted_by": "the grader's tokenizer and chat template"}
    failed = rated.pop("too-long")
    assert failed["status"] == "too_long" and failed["score"] is None and failed["tokens_in"] == 0
    assert "more than the grader's context of 2,048 (rate.max_model_len" in failed["error"]
    for row in rated.values():
        assert f"{row['score']:g}" in SCORE_CHOICES  # structured outputs: only valid scores
        assert 0.0 <= row["score_expected"] <= 5.0
        assert row["grader"] == f"vllm:{tiny_model}" and row["attempts"] == 1
        assert row["tokens_in"] > 100 and 1 <= row["tokens_out"] <= 4
    # the logprob-weighted score is finer than the 0.5 steps of the discrete one
    assert any(row["score_expected"] * 2 != round(row["score_expected"] * 2) for row in rated.values())


def test_unparseable_replies_are_asked_once_more_then_kept(tmp_path, tiny_model, ray_local):
    """Unconstrained, the random tiny model writes no score: every row is asked twice and kept."""
    data = _data(tmp_path, 4)
    summary = run_rate(_vllm_config(tmp_path, tiny_model, data, "rate.constrained=false", "rate.max_tokens=8"))
    rated = pq.read_table(tmp_path / "run" / "rated").to_pylist()
    assert summary["by_status"]["parse_failed"] == 4 and len(rated) == 4
    assert all(r["attempts"] == 2 and r["score"] is None and r["error"] for r in rated)
    # A rerun sends nothing: parse_failed after two asks is final.
    assert run_rate(_vllm_config(tmp_path, tiny_model, data, "rate.constrained=false"))["rows_sent_this_run"] == 0


def test_openai_backend_against_vllm_openai_server(tmp_path, vllm_server, tiny_model, ray_local):
    data = _data(tmp_path, 6, most_chars=400)  # the server's context is 1,024 tokens of the tiny tokenizer
    base = [f"run_dir={tmp_path / 'run'}", f"data.path={data}", "rate.backend=openai", f"rate.base_url={vllm_server}",
            f"rate.model={tiny_model}", "rate.max_tokens=8", "rate.concurrency=4"]
    choices = json.dumps({"structured_outputs": {"choice": list(SCORE_CHOICES)}})
    summary = run_rate(load_config(None, [*base, f"rate.extra_body={choices}"]))
    rated = pq.read_table(tmp_path / "run" / "rated").to_pylist()
    assert summary["rows_out"] == 6 and summary["by_status"]["ok"] == 6
    for row in rated:
        assert f"{row['score']:g}" in SCORE_CHOICES and 0.0 <= row["score_expected"] <= 5.0
        assert row["tokens_in"] > 100 and row["tokens_out"] > 0
    assert summary["tokens_in"] == sum(r["tokens_in"] for r in rated)

    # Unconstrained, the random model writes no score: each row is asked twice, then kept.
    summary = run_rate(load_config(None, [*base, f"run_dir={tmp_path / 'free'}"]))
    rated = pq.read_table(tmp_path / "free" / "rated").to_pylist()
    assert summary["by_status"]["parse_failed"] == 6 and all(r["attempts"] == 2 for r in rated)


ENGINE_ACTOR = "ray::MapWorker(MapBatches(vLLMEngineStageUDF))"  # an engine actor's process title


def _engine_actors() -> dict[int, str]:
    """The processes of the vLLM engine actors now, by pid, with their titles (`.__init__` while
    the engine starts, `.submit` while it runs a batch)."""
    import psutil

    found = {}
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        title = " ".join(proc.info["cmdline"] or []).strip()
        if title.startswith(ENGINE_ACTOR) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found[proc.info["pid"]] = title
    return found


def test_an_engine_killed_mid_rating_is_replaced_and_only_its_blocks_asked_again(tmp_path, tiny_model, reap_ray_orphans):
    """Two vLLM engines rate 720 rows in blocks of 4 batches of 4; once a sixth are answered, one
    engine's process is killed -9 while it runs a block. Ray restarts the actor and runs the
    blocks it held there (Ray Data's actor pools), and the stage goes on: every row ok and saved
    once, none asked again by the driver; by the engines' own log, the rows answered twice are
    only some of those the killed engine had answered (its unfinished blocks)."""
    import psutil

    n, batch = 720, 4
    rows = json.loads(_data(tmp_path, n, most_chars=1200).read_text())
    rows = [{**rows[i % len(rows)], "id": f"row-{i}"} for i in range(n)]  # long enough to kill it midway
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "alpagasus_ray.cli", "rate", "--verbose", "--config", "/dev/null",
               f"run_dir={run_dir}", f"data.path={data}", "rate.backend=vllm", f"rate.model={tiny_model}",
               "rate.use_gpu=false", "rate.max_model_len=2048", f"rate.batch_size={batch}", "rate.num_engines=2"]
    # Two engines of one CPU each beside the light stages need more logical CPUs than the two
    # cores here; every worker line printed as it is (Ray folds lines that look alike).
    env = {**os.environ, "RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 4}), "RAY_DEDUP_LOGS": "0"}
    log = tmp_path / "rate.log"
    seen, killed, orphans, at_kill, answered_at_kill = set(), None, [], set(), 0
    with open(log, "w") as out:
        driver = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while driver.poll() is None and time.time() < deadline:
            actors = _engine_actors()
            seen.update(actors)
            busy = [pid for pid, title in actors.items() if title.endswith(".submit")]
            if killed is None and busy and len(actors) == 2:
                answered_at_kill = len(_answered(log.read_text()))
                if answered_at_kill >= n // batch // 6:  # a sixth done: each engine has answered some
                    killed, at_kill = busy[0], set(actors)
                    orphans = psutil.Process(killed).children(recursive=True)  # its vLLM engine core
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        if driver.poll() is None:
            driver.kill()
        driver.wait()
    output = log.read_text()
    assert driver.returncode == 0, output[-3000:]
    assert killed is not None, "no engine was seen running a batch"
    assert seen - at_kill and not psutil.pid_exists(killed), "the killed engine was not replaced"
    assert orphans and not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in orphans)

    rated = pq.read_table(run_dir / "rated")  # every part as written: a row saved twice would show
    assert rated.num_rows == len(set(rated["id"].to_pylist())) == n
    assert set(rated["status"].to_pylist()) == {"ok"} and set(rated["attempts"].to_pylist()) == {1}
    summary = json.loads((run_dir / "rated_summary.json").read_text())
    assert summary["rows_sent_this_run"] == n and summary["by_status"]["ok"] == n

    answered = _answered(output)
    worker = re.search(rf"Worker ID: (\w+) .*Worker PID: {killed}\b", output).group(1)
    by_killed = sum(size for who, size in answered if who == worker)
    again = sum(size for _, size in answered) - n
    print(f"killed after {answered_at_kill} batches; answered twice {again} rows, the killed engine had answered {by_killed}")
    assert 0 <= again <= by_killed and again < batch * BATCHES_PER_BLOCK * 8  # the 8 blocks it ran at once, at most


def _answered(log: str) -> list[tuple[str, int]]:
    """(worker id, rows) of each batch an engine answered, from Ray Data LLM's own log line."""
    return [(who, int(size)) for size, who in
            re.findall(r"Elapsed time for batch \w+ with size (\d+):.*?worker_id=(\w+)", log)]
