"""Progress a person can watch: one bar per LLM stage, fed by the workers.

The workers of the LLM layer tell a small `Progress` actor of each finished batch (rows, rows that
failed, tokens); the driver polls it. In a terminal a tqdm bar shows rows done of the total, rows/s,
the ETA, failures and, for an API with prices, the cost so far. When the output is not a terminal
(`ray job submit`, CI) a plain log line comes every `PLAIN_EVERY_S` seconds instead.
"""

from __future__ import annotations

import contextlib
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
POLL_S = 0.5


class Progress:
    """A Ray actor holding counts of finished rows (a handful of integers)."""

    def __init__(self):
        self.counts = Counter()

    def add(self, counts: dict) -> None:
        self.counts.update(counts)

    def get(self) -> dict:
        return dict(self.counts)


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
    """Given to `llm_map` as `progress`: counts a batch on the worker, sends only the numbers."""

    def __init__(self, actor):
        self.actor = actor
        self.final: dict = {}  # the counts at the end, set by `watch`

    def __getstate__(self):
        return {"actor": self.actor, "final": {}}

    def add(self, results: pa.Table):
        self.actor.add.remote(batch_counts(results))


@contextlib.contextmanager
def watch(stage: str, total: int, cost: Callable[[int, int], float | None] | None = None, done: int = 0):
    """Show the progress of `total` rows of `stage` (`done` of them finished before) while the
    block runs; yields the reporter to hand to the layer, whose `final` holds the counts
    afterwards. `cost(tokens_in, tokens_out)` prices the tokens so far, when it can."""
    import ray

    actor = start_progress()
    stop = threading.Event()
    show = _Bar(stage, total, cost, done) if sys.stderr.isatty() else _Lines(stage, total, cost, done)

    def poll():
        while not stop.wait(POLL_S):
            try:
                show.update(ray.get(actor.get.remote(), timeout=10))
            except Exception:  # a poll that fails (e.g. at shutdown) only skips a refresh
                continue

    thread = threading.Thread(target=poll, name=f"{stage}-progress", daemon=True)
    thread.start()
    reporter = _Reporter(actor)
    try:
        yield reporter
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):
            reporter.final = ray.get(actor.get.remote(), timeout=10)
            show.update(reporter.final)
        show.close()
        ray.kill(actor)


def _failed(counts: dict) -> int:
    return counts.get(C.PARSE_FAILED, 0) + counts.get(C.REQUEST_FAILED, 0)


def _cost_text(cost, counts: dict) -> str:
    usd = cost(counts.get(C.TOKENS_IN, 0), counts.get(C.TOKENS_OUT, 0)) if cost else None
    return "" if usd is None else f"${usd:,.2f}"


class _Bar:
    def __init__(self, stage, total, cost, done):
        from tqdm import tqdm

        self.cost = cost
        self.bar = tqdm(total=total, initial=done, desc=stage, unit="row", dynamic_ncols=True, file=sys.stderr)
        self.done = done

    def update(self, counts: dict) -> None:
        rows = self.done + counts.get("rows", 0)
        self.bar.update(rows - self.bar.n)
        extra = {"failed": _failed(counts)}
        if price := _cost_text(self.cost, counts):
            extra["cost"] = price
        self.bar.set_postfix(extra, refresh=False)

    def close(self) -> None:
        self.bar.close()


class _Lines:
    def __init__(self, stage, total, cost, done):
        self.stage, self.total, self.cost, self.done = stage, total, cost, done
        self.start = self.last = time.time()
        self.rows = 0

    def update(self, counts: dict) -> None:
        self.rows = counts.get("rows", 0)
        self.counts = counts
        if time.time() - self.last >= PLAIN_EVERY_S:
            self.last = time.time()
            self._line()

    def _line(self) -> None:
        counts = getattr(self, "counts", {})
        elapsed = max(time.time() - self.start, 1e-9)
        rate = self.rows / elapsed
        left = self.total - self.done - self.rows
        eta = f", ETA {left / rate:,.0f} s" if rate > 0 and left > 0 else ""
        price = _cost_text(self.cost, counts)
        log.info("%s: %s of %s rows (%.1f rows/s%s), %d failed%s", self.stage, f"{self.done + self.rows:,}",
                 f"{self.total:,}", rate, eta, _failed(counts), f", {price}" if price else "")

    def close(self) -> None:
        self._line()
