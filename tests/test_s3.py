"""s3:// as the input and as the run directory, against a local S3-compatible server (moto in
server mode) reached through pyarrow's S3 filesystem: a rating killed with -9 and resumed, then the
selection, with the rows read and written by the workers."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from fake_openai_server import serve, stats

from moto import server as moto_server  # moto[server]: a dev dependency (pip install -e '.[dev]')
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3():
    """(environment for a process that uses s3://, a pyarrow S3FileSystem) on a fresh moto server."""
    import pyarrow.fs as pafs

    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    fs = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                           endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True)
    fs.create_dir("bucket")
    yield env, fs
    server.stop()


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


def test_the_whole_demo_runs_with_its_run_directory_on_s3(tmp_path, s3):
    """`alpagasus demo` with run_dir=s3://...: every stage reads and writes the run directory on the
    object store; the trained model goes to train.model_dir (engines load from a directory), which
    the demo refuses to start without."""
    env, fs = s3
    env = {**os.environ, **env, "ALPAGASUS_CACHE": str(tmp_path / "cache")}
    run_dir = "s3://bucket/runs/demo"
    small = ["data.limit=24", "train.max_steps=2", "generate.limit=1", "generate.max_tokens=8"]
    demo = [sys.executable, "-m", "alpagasus_ray.cli", "demo", "--run-dir", run_dir, *small]
    refused = subprocess.run(demo, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "set train.model_dir" in refused.stderr.strip().splitlines()[-1]
    assert not _files(fs, "bucket/runs/demo", ".json")  # nothing ran
    model_dir = tmp_path / "demo" / "model"
    done = subprocess.run([*demo, f"train.model_dir={model_dir}"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == f"{run_dir}/report.md"
    found = _files(fs, "bucket/runs/demo", "")
    for artifact in ("rated_summary.json", "selection.json", "selected.jsonl", "train_log.jsonl", "answers/demo/koala.jsonl",
                     "answers/tiny-llama-base/generation.json", "judgments/demo_vs_tiny-llama-base/vicuna.jsonl",
                     "judge.json", "report.json", "report.md", "plots/demo_vs_tiny-llama-base_win_tie_lose.png",
                     "stages/report.json", "logs/alpagasus.log"):
        assert any(f.endswith(artifact) for f in found), artifact
    assert any("/answers/demo/parts/" in f for f in found) and any("/checkpoints/" in f for f in found)
    assert (model_dir / "config.json").is_file() and not any("/model/" in f for f in found)
    with fs.open_input_stream("bucket/runs/demo/report.json") as f:
        report = json.loads(f.read())["demo_vs_tiny-llama-base"]
    assert all(report[ts]["n"] == 1 for ts in ("koala", "vicuna", "wizardlm", "sinstruct"))
    with fs.open_input_stream("bucket/runs/demo/report.md") as f:
        assert "`answers/demo/koala.jsonl`" in f.read().decode()
    again = subprocess.run([*demo, f"train.model_dir={model_dir}"], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("skipped (unchanged)") == 6, again.stdout + again.stderr[-2000:]


def _files(fs, prefix: str, suffix: str) -> list[str]:
    return [f.path for f in fs.get_file_info(_selector(prefix)) if f.path.endswith(suffix)]
