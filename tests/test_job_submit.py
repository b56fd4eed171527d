"""`ray job submit`, the way users launch the tool: a head node started with `ray start --head`, the
demo submitted to it with `ray job submit --working-dir .`, as a new user would do it on Ray 2.60,
with its run directory on an object store (a local S3 server, the `s3` fixture of conftest.py), as
on a cluster whose nodes share no disk.

The cluster's processes are started without any vLLM setting in their environment, so the engines
must carry what they need (their KV cache size) to their workers themselves.
"""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import psutil
import pyarrow.fs as pafs
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BIN = os.path.dirname(sys.executable)


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture
def head_node(s3):
    """A Ray head node on free ports, as `ray start --head` makes it, whose processes reach the S3
    server; its processes are ended by PID. Yields (dashboard address, environment, S3 filesystem)."""
    s3_env, fs = s3
    gcs, dashboard, client, agent, metrics = _free_ports(5)
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_") and k != "RAY_ADDRESS"}
    env.update(s3_env)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    before = {p.pid for p in psutil.process_iter()}
    started = subprocess.run(
        [os.path.join(BIN, "ray"), "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--metrics-export-port={metrics}", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        capture_output=True, text=True, timeout=120, env=env)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"http://127.0.0.1:{dashboard}", env, fs
    finally:
        mine = [p for p in psutil.process_iter(["pid", "cmdline"])
                if p.info["pid"] not in before and temp_dir in " ".join(p.info["cmdline"] or [])]
        for proc in mine:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(mine, timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_the_chat_demo_runs_as_a_submitted_job_with_its_run_directory_on_s3(head_node, tmp_path):
    """`alpagasus demo --chat`, the whole method on conversations, as a job on a running cluster:
    the sample rated turn by turn by the stand-in, the kept conversations trained with its chat
    template, then answered, judged and reported; every stage reads and writes the run directory on
    s3://, the trained model goes to train.model_dir, and a rerun skips every stage. (The Alpaca
    demo runs on a local Ray in test_pipeline.)"""
    address, env, fs = head_node
    run_dir = "s3://bucket/runs/demo"
    model_dir = tmp_path / "demo" / "model"
    demo = ["alpagasus", "demo", "--chat", "--run-dir", run_dir, f"train.model_dir={model_dir}", "data.limit=30",
            "train.max_steps=2", "generate.limit=1", "generate.max_tokens=8"]
    job_env = {**env, "RAY_AUTH_MODE": "token"}  # Ray 2.60's head uses token auth; its client defaults to none
    submitted = subprocess.run(
        [os.path.join(BIN, "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--", *demo],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=job_env)
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-4000:]
    assert "succeeded" in output and f"{run_dir}/report.md" in output, output[-4000:]
    found = [f.path for f in fs.get_file_info(pafs.FileSelector("bucket/runs/demo", recursive=True))]
    for artifact in ("rated_summary.json", "selection.json", "selected.jsonl", "train_log.jsonl", "answers/demo/koala.jsonl",
                     "answers/tiny-llama-base/generation.json", "judgments/demo_vs_tiny-llama-base/vicuna.jsonl",
                     "judge.json", "report.json", "report.md", "plots/demo_vs_tiny-llama-base_win_tie_lose.png",
                     "stages/report.json", "logs/alpagasus.log"):
        assert any(f.endswith(artifact) for f in found), artifact
    assert any("/rated/" in f for f in found) and any("/rated_turns/" in f for f in found)
    assert any("/answers/demo/parts/" in f for f in found)
    assert any("/checkpoints/" in f for f in found)
    assert (model_dir / "config.json").is_file() and not any("/model/" in f for f in found)
    def read(name):
        with fs.open_input_stream(f"bucket/runs/demo/{name}") as f:
            return f.read().decode()

    summary = json.loads(read("rated_summary.json"))
    assert summary["rows_in"] == summary["rows_out"] == 30
    turns = sum(1 + k % 3 for k in range(30))  # the sample chains 1, 2, 3, 1, ... exchanges per conversation
    assert summary["turns"]["rated"] == turns and summary["turns"]["by_status"]["ok"] == turns
    selection = json.loads(read("selection.json"))
    assert selection["rows_are"] == "conversations" and selection["selected"] > 0
    kept = [json.loads(line) for line in read("selected.jsonl").splitlines()]
    assert len(kept) == selection["selected"] and all(r["messages"][-1]["role"] in ("assistant", "user") for r in kept)
    log = [json.loads(line) for line in read("train_log.jsonl").splitlines()]
    assert len(log) == 2 and all(math.isfinite(m["loss"]) for m in log)
    report = json.loads(read("report.json"))["demo_vs_tiny-llama-base"]
    assert all(report[ts]["n"] == 1 for ts in ("koala", "vicuna", "wizardlm", "sinstruct"))
    with fs.open_input_stream("bucket/runs/demo/report.md") as f:
        assert "`answers/demo/koala.jsonl`" in f.read().decode()
    # From this machine's command line, the stages' records are read back from the object store.
    again = subprocess.run([os.path.join(BIN, "alpagasus"), *demo[1:]], cwd=ROOT, capture_output=True, text=True,
                           timeout=600, env={**os.environ, **{k: v for k, v in env.items() if k.startswith("AWS_")}})
    assert again.returncode == 0 and again.stdout.count("skipped (unchanged)") == 6, again.stdout + again.stderr[-2000:]
