"""Killing a running command the hard way, for the tests of resume after `kill -9`."""

from __future__ import annotations

import signal
import subprocess
import time
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
