"""Killing a running command the hard way, for the tests of resume after `kill -9`."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Callable


def kill_job_when(command: list[str], env: dict, log, ready: Callable[[], bool], children: bool = True) -> None:
    """Start `command` (its output to the file `log`), wait until `ready()`, then kill -9 it and
    every process it started (the driver and its Ray processes at once: what is in flight is lost),
    or, with `children=False`, the driver alone. Fails, with the log's end, if the command ends
    before it is ready."""
    import psutil

    with open(log, "w") as out:
        driver = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        while not ready():
            assert driver.poll() is None, open(log).read()[-2000:]
            time.sleep(0.1)
        doomed = [psutil.Process(driver.pid)]
        if children:
            doomed += doomed[0].children(recursive=True)
        for proc in doomed:
            proc.send_signal(signal.SIGKILL)
        driver.wait()


def kill_with_a_batch_unrecorded(command: list[str], env: dict, run_dir: Path, log, batches: int) -> None:
    """Kill -9 the driver of a Batch API rating once it has created `batches` batches, then strip
    the batch id from one record, as a kill between a batch's create and its record's save leaves it."""
    from alpagasus_ray.llm.engines.files import BatchStore

    store = BatchStore(str(run_dir / "batches"))
    kill_job_when(command, env, log, lambda: len([r for r in store.records() if r.batch_id]) >= batches,
                  children=False)
    forgotten = store.records()[1]
    forgotten.batch_id, forgotten.status = None, "written"
    store.save(forgotten)


def assert_key_nowhere(key: str, run_dir: Path, *texts: str) -> None:
    """The API key is in no file under `run_dir` and in none of `texts` (logs, output)."""
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert written and not any(key.encode() in p.read_bytes() for p in written)
    assert not any(key in text for text in texts)
