"""Progress a person can watch: one bar per LLM stage, and one for training, fed by the workers.

The workers of the LLM layer tell a small `Progress` actor of each finished batch (rows, rows that
failed, tokens); the driver polls it. In a terminal a tqdm bar shows rows done of the total, rows/s,
the ETA, failures and, for an API with prices, the cost so far. When the output is not a terminal
(`ray job submit`, CI) a plain log line comes every `PLAIN_EVERY_S` seconds instead. Training's
first worker reports each step the same way (`watch_steps`): step, loss, tokens/s and the ETA.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading
import time
from collections import Counter
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from alpagasus_ray import columns as C

log = logging.getLogger("alpagasus_ray.progress")

PLAIN_EVERY_S = 30.0
QUIET_EVERY_S = 120.0
POLL_S = 0.5


class Progress:
    """A Ray actor holding counts of finished rows (a handful of integers)."""

    def __init__(self):
        self.counts = Counter()
        self.last: dict = {}

    def add(self, counts: dict) -> None:
        self.counts.update(counts)

    def at(self, position: int, last: dict) -> None:
        """Training: `position` steps are done, the last one with these metrics."""
        self.counts["rows"] = position
        self.last = last

    def get(self) -> dict:
        return {**self.counts, "last": self.last}


def batch_counts(results: pa.Table) -> dict:
    """What a finished batch adds: rows, rows per status, tokens."""
    counts = Counter({"rows": results.num_rows})
    if C.STATUS in results.column_names:
        counts.update(results[C.STATUS].to_pylist())
    for name in (C.TOKENS_IN, C.TOKENS_OUT):
        if name in results.column_names:
            counts[name] = pc.sum(results[name]).as_py() or 0
    return dict(counts)


def start_progress():
    """A new `Progress` actor (no CPU: it only adds numbers)."""
    import ray

    return ray.remote(Progress).options(num_cpus=0).remote()


class _Reporter:
    """Given to the LLM layer as `progress`: counts a batch on the worker, sends only the numbers."""

    def __init__(self, actor):
        self.actor = actor
        self.final: dict = {}  # the counts at the end, set by `watch`

    def __getstate__(self):
        return {"actor": self.actor, "final": {}}

    def add(self, results: pa.Table):
        self.actor.add.remote(batch_counts(results))

    def add_counts(self, counts: dict):
        """Counts found some other way (e.g. a batch's own counts of the rows it has answered)."""
        self.actor.add.remote(counts)

    def again(self) -> "_Reporter":
        """The reporter of rows asked again: each was counted when it was first asked (or by an
        earlier run), so they add to `ROWS_AGAIN`, not to the rows the progress line shows."""
        return _AgainReporter(self.actor)


# The count of rows asked again (a retry of request failures, a re-ask), apart from "rows".
ROWS_AGAIN = "rows_again"


class _AgainReporter(_Reporter):
    def add(self, results: pa.Table):
        self.add_counts(batch_counts(results))

    def add_counts(self, counts: dict):
        counts = dict(counts)
        if "rows" in counts:
            counts[ROWS_AGAIN] = counts.pop("rows")
        self.actor.add.remote(counts)


@contextlib.contextmanager
def watch(stage: str, total: int, cost: Callable[[int, int], float | None] | None = None, done: int = 0,
          unit: str = "row"):
    """Show the progress of `total` rows of `stage` (`done` of them finished before) while the
    block runs; yields the reporter to hand to the layer, whose `final` holds the counts
    afterwards. `cost(tokens_in, tokens_out)` prices the tokens so far, when it can. `unit` names
    what is counted (a row, a turn)."""
    watcher = _Watcher(stage, total, done, unit, functools.partial(_row_details, cost))
    reporter = _Reporter(watcher.actor)
    try:
        yield reporter
    finally:
        reporter.final = {k: v for k, v in watcher.close().items() if k != "last"}


class StepReporter:
    """Given to training's first worker: `step(metrics)` after each optimizer step."""

    def __init__(self, actor):
        self.actor = actor

    def step(self, metrics: dict) -> None:
        self.actor.at.remote(metrics["step"], metrics)


@contextlib.contextmanager
def watch_steps(stage: str, total: int, done: int = 0):
    """Show training's steps (`done` of `total` taken before) with the last step's loss and
    tokens/s; yields the `StepReporter` to hand to the first worker."""
    watcher = _Watcher(stage, total, done, "step", _step_details)
    try:
        yield StepReporter(watcher.actor)
    finally:
        watcher.close()


class _Watcher:
    """A `Progress` actor and a thread on the driver that polls it into a bar or log lines."""

    def __init__(self, stage: str, total: int, done: int, unit: str, details: Callable[[dict], dict]):
        self.actor = start_progress()
        self.show = (_Bar if sys.stderr.isatty() else _Lines)(stage, total, done, unit, details)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, name=f"{stage}-progress", daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        import ray

        while not self.stop.wait(POLL_S):
            try:
                self.show.update(ray.get(self.actor.get.remote(), timeout=10))
            except Exception:  # a poll that fails (e.g. at shutdown) only skips a refresh
                continue

    def close(self) -> dict:
        """Stop polling, show the last counts and return them."""
        import ray

        self.stop.set()
        self.thread.join()
        final = {}
        with contextlib.suppress(Exception):
            final = ray.get(self.actor.get.remote(), timeout=10)
            self.show.update(final)
        self.show.close()
        ray.kill(self.actor)
        return final


def _failed(counts: dict) -> int:
    return counts.get(C.PARSE_FAILED, 0) + counts.get(C.REQUEST_FAILED, 0)


def _row_details(cost, counts: dict) -> dict:
    """Failures so far and, when the tokens have a price, the cost so far."""
    details = {"failed": _failed(counts)}
    usd = cost(counts.get(C.TOKENS_IN, 0), counts.get(C.TOKENS_OUT, 0)) if cost else None
    if usd is not None:
        details["cost"] = f"${usd:,.2f}"
    return details


def _step_details(counts: dict) -> dict:
    last = counts.get("last") or {}
    if "loss" not in last:
        return {}
    return {"loss": f"{last['loss']:.4f}", "tokens/s": f"{last.get('tokens_per_s', 0):,.0f}"}


class _Bar:
    def __init__(self, stage, total, done, unit, details):
        from tqdm import tqdm

        self.details = details
        self.done = done
        self.bar = tqdm(total=total, initial=done, desc=stage, unit=unit, dynamic_ncols=True, file=sys.stderr)

    def update(self, counts: dict) -> None:
        self.bar.update(self.done + counts.get("rows", 0) - self.bar.n)
        self.bar.set_postfix(self.details(counts), refresh=False)

    def close(self) -> None:
        self.bar.close()


class _Lines:
    def __init__(self, stage, total, done, unit, details):
        self.stage, self.total, self.done, self.unit, self.details = stage, total, done, unit, details
        self.start = self.last = time.time()
        self.counts: dict = {}
        self.shown = 0  # rows in the last line shown: nothing to say until some finish

    def update(self, counts: dict) -> None:
        self.counts = counts
        waited = time.time() - self.last
        # Every PLAIN_EVERY_S while rows finish; while none do (an engine starting), every few.
        if waited >= PLAIN_EVERY_S and (self._changed() or waited >= QUIET_EVERY_S):
            self._line()

    def _changed(self) -> bool:
        return self.counts.get("rows", 0) != self.shown

    def _line(self) -> None:
        self.last, self.shown = time.time(), self.counts.get("rows", 0)
        finished = self.counts.get("rows", 0)
        elapsed = max(time.time() - self.start, 1e-9)
        rate = finished / elapsed
        left = self.total - self.done - finished
        eta = f", ETA {left / rate:,.0f} s" if rate > 0 and left > 0 else ""
        details = "".join(f", {k} {v}" for k, v in self.details(self.counts).items())
        log.info("%s: %s of %s %ss (%.1f/s%s)%s", self.stage, f"{self.done + finished:,}", f"{self.total:,}",
                 self.unit, rate, eta, details)

    def close(self) -> None:
        if self._changed():
            self._line()
