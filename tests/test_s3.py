"""s3:// as the input and as the run directory, against a local S3-compatible server (moto in
server mode, the `s3` fixture of conftest.py) reached through pyarrow's S3 filesystem: a rating
killed with -9 and resumed, then the selection, with the rows read and written by the workers. The
whole demo with its run directory on s3:// runs as a submitted job in test_job_submit.py."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fake_openai_server import serve, stats


@pytest.mark.slow
def test_rate_then_filter_with_s3_input_and_run_dir_and_a_resume_after_kill(tmp_path, s3, reap_ray_orphans):
    import psutil
    import pyarrow.dataset as pds

    env, fs = s3
    n = 64
    rows = [{"instruction": f"ROW-{i:03d} Say hello.", "input": "", "output": "Hello."} for i in range(n)]
    rows.append({"instruction": "BROKEN row without output"})
    with fs.open_output_stream("bucket/in/rows.jsonl") as f:
        f.write(("\n".join(json.dumps(r) for r in rows) + "\n").encode())
    run_dir = "s3://bucket/runs/s3-run"
    env = {**os.environ, **env, "OPENAI_API_KEY": "sk-unused"}
    with serve({"latency": 0.25, "rules": [{"match": f"ROW-{i:03d}"} for i in range(n)]}) as url:
        rate = [sys.executable, "-m", "alpagasus_ray.cli", "rate", "--config", "configs/rate_openai_compatible.yaml",
                f"rate.base_url={url}", "data.path=s3://bucket/in/rows.jsonl", f"run_dir={run_dir}",
                "rate.concurrency=4", "rate.batch_size=4"]
        log = tmp_path / "first.log"
        with open(log, "w") as out:
            driver = subprocess.Popen(rate, env=env, stdout=out, stderr=subprocess.STDOUT)
            while len([p for p in fs.get_file_info(_selector("bucket/runs/s3-run/rated"))
                       if p.path.endswith(".parquet")]) < 4:
                assert driver.poll() is None, log.read_text()[-3000:]
                time.sleep(0.1)
            doomed = [psutil.Process(driver.pid)]
            doomed += doomed[0].children(recursive=True)  # the whole job: what is in flight is lost
            for proc in doomed:
                proc.send_signal(signal.SIGKILL)
            driver.wait()
        again = subprocess.run(rate, env=env, capture_output=True, text=True, timeout=600)
        seen = stats(url)
    assert again.returncode == 0, again.stderr[-3000:]
    rated = pds.dataset("bucket/runs/s3-run/rated", filesystem=fs, format="parquet").to_table()
    assert rated.num_rows == n + 1 and len(set(rated["id"].to_pylist())) == n + 1
    statuses = rated["status"].to_pylist()
    assert statuses.count("ok") == n and statuses.count("invalid_input") == 1
    assert seen["requests"] - n <= 4 + 4 + 3  # in flight, and the batches partly done
    with fs.open_input_stream("bucket/runs/s3-run/rated_summary.json") as f:
        summary = json.loads(f.read())
    assert summary["rows_in"] == summary["rows_out"] == n + 1

    selected = subprocess.run([sys.executable, "-m", "alpagasus_ray.cli", "filter", "--config",
                               "configs/filter_alpagasus_9k.yaml", f"run_dir={run_dir}"],
                              env=env, capture_output=True, text=True, timeout=600)
    assert selected.returncode == 0, selected.stderr[-3000:]
    with fs.open_input_stream("bucket/runs/s3-run/selected.json") as f:
        kept = json.loads(f.read())
    assert len(kept) == n and {r["instruction"][:7] for r in kept} == {f"ROW-{i:03d}" for i in range(n)}
    names = {os.path.basename(p.path) for p in fs.get_file_info(_selector("bucket/runs/s3-run"))}
    assert {"selection.json", "selected.jsonl", "score_histogram.png"} <= names
    # Nothing of the run on the local disk: only this test's own log.
    assert [p.name for p in tmp_path.iterdir()] == ["first.log"]


def _selector(path):
    import pyarrow.fs as pafs

    return pafs.FileSelector(path, recursive=True, allow_not_found=True)


def test_a_run_directory_on_an_object_store_needs_a_model_directory_before_anything_runs(tmp_path, s3):
    """Engines load a model from a directory: with run_dir on s3:// and no train.model_dir the run
    stops before any stage, naming the key (the whole demo on s3:// runs in test_job_submit.py)."""
    env, fs = s3
    env = {**os.environ, **env, "ALPAGASUS_CACHE": str(tmp_path / "cache")}
    refused = subprocess.run([sys.executable, "-m", "alpagasus_ray.cli", "demo", "--run-dir", "s3://bucket/runs/demo"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "run_dir=s3://bucket/runs/demo is on an object store" in refused.stderr.strip().splitlines()[-1]
    assert "set train.model_dir" in refused.stderr.strip().splitlines()[-1]
    assert not _files(fs, "bucket/runs/demo", ".json")  # nothing ran


def _files(fs, prefix: str, suffix: str) -> list[str]:
    return [f.path for f in fs.get_file_info(_selector(prefix)) if f.path.endswith(suffix)]
