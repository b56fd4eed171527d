"""Session fixtures: the tiny local model, a vLLM OpenAI-compatible server on it, a local Ray.

Everything runs on a CPU without network: the model is built locally (`alpagasus_ray.tiny_model`).
Environment defaults are set at import, before Ray starts, because Ray's workers inherit them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

# Tests import their helpers (testdata, rated_fixtures, the fake server) from this directory.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Every Ray the tests start is their own: never a cluster found through RAY_ADDRESS or a running
# `ray start` (the tests that want a cluster make one and pass its address).
os.environ["RAY_ADDRESS"] = "local"
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # no `uv run` runtime-env hook
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage-stats reporting (no network)
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # no progress lines every 10 s
# A stalled Ray Data pipeline (e.g. CPU stages holding both cores) fails after 5 min, not 30.
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "300")

SERVER_READY_TIMEOUT_S = 180


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under ALPAGASUS_REQUIRE_DATA=1 (CI, which has the data beside the clone) a skipped test is a
    failure: CI never passes by skipping what it was meant to run."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("ALPAGASUS_REQUIRE_DATA") == "1" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under ALPAGASUS_REQUIRE_DATA=1, where no test may skip: {reason}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, n: int = 60) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of the tiny Llama (HF directory), built once per session."""
    from alpagasus_ray.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def vllm_server(tiny_model):
    """Base URL (`http://127.0.0.1:PORT/v1`) of vLLM's OpenAI-compatible server on the tiny model.

    The served model name is the model path, `tiny_model`. The server runs in its own process
    group, logs to a temp file, and is terminated with its group at the end of the session.
    """
    port = _free_port()
    log_path = tempfile.NamedTemporaryFile(prefix="vllm-server-", suffix=".log", delete=False).name
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", tiny_model, "--dtype", "float32", "--max-model-len", "1024",
        "--enforce-eager", "--host", "127.0.0.1", "--port", str(port),
    ]
    # GiB of KV cache for vLLM on CPU. Only this server gets it: the product's engines must carry
    # their own setting to their workers, so the tests do not set it for them.
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode}; log {log_path}:\n{_tail(log_path)}")
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not ready in {SERVER_READY_TIMEOUT_S}s; log {log_path}:\n{_tail(log_path)}")
            time.sleep(0.5)
        yield base_url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def s3():
    """(environment for a process that uses s3://, a pyarrow S3FileSystem) on a fresh moto server."""
    import pyarrow.fs as pafs

    from moto import server as moto_server  # moto[server]: a dev dependency (pip install -e '.[dev]')

    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    fs = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                           endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True)
    fs.create_dir("bucket")
    yield env, fs
    # moto keeps its buckets in the process, not in the server: empty them for the next test.
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"), timeout=30)
    server.stop()


@pytest.fixture
def reap_ray_orphans():
    """For tests that kill a driver with -9: its Ray processes outlive it (reparented to init);
    stop the ones started during the test."""
    import psutil

    before = {p.pid for p in psutil.process_iter()}
    yield
    for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.info["pid"] not in before and proc.info["ppid"] == 1 and "ray" in cmd:
            proc.kill()


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs and no dashboard, started once per session and shut down at the end."""
    import ray

    ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield ctx
    ray.shutdown()
