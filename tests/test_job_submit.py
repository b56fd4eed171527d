"""`ray job submit`, the way users launch the tool: a head node started with `ray start --head`, the
demo submitted to it with `ray job submit --working-dir .`, as a new user would do it on Ray 2.60.

The cluster's processes are started without any vLLM setting in their environment, so the engines
must carry what they need (their KV cache size) to their workers themselves.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import psutil
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
def head_node():
    """A Ray head node on free ports, as `ray start --head` makes it; its processes are ended by PID."""
    gcs, dashboard, client, agent, metrics = _free_ports(5)
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_") and k != "RAY_ADDRESS"}
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    before = {p.pid for p in psutil.process_iter()}
    started = subprocess.run(
        [os.path.join(BIN, "ray"), "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--metrics-export-port={metrics}", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        capture_output=True, text=True, timeout=120, env=env)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"http://127.0.0.1:{dashboard}", env
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
def test_the_demo_runs_as_a_submitted_job_on_a_running_cluster(head_node, tmp_path):
    address, env = head_node
    run = tmp_path / "demo"
    env = {**env, "RAY_AUTH_MODE": "token"}  # Ray 2.60's head uses token auth; its client defaults to none
    submitted = subprocess.run(
        [os.path.join(BIN, "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
         "alpagasus", "demo", "--run-dir", str(run), "data.limit=24", "train.max_steps=2", "generate.limit=1",
         "generate.max_tokens=8"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-4000:]
    assert "succeeded" in output and "report.md" in output, output[-4000:]
    assert (run / "report.md").is_file() and (run / "report.json").is_file()
    assert (run / "model" / "config.json").is_file()
