"""Requests-per-minute and tokens-per-minute limits that hold across all Ray workers together.

`Pacer` is the arithmetic (a virtual-scheduling leaky bucket, no clock of its own, no Ray);
`SharedLimiter` is a Ray actor holding one Pacer per limit, asked by every worker before each
request. A 429's Retry-After pauses every worker, not only the one that saw it.
"""

from __future__ import annotations

import asyncio
import time


class Pacer:
    """Spreads reservations so that at most `per_minute` units go out per minute, with a burst
    allowance of `burst_seconds` worth of units.

    >>> p = Pacer(per_minute=60, burst_seconds=0)   # one unit a second
    >>> [p.reserve(1, now=0.0) for _ in range(3)]   # delays before each may go
    [0.0, 1.0, 2.0]
    >>> p.reserve(1, now=10.0)                      # idle time is not saved up beyond the burst
    0.0
    >>> b = Pacer(per_minute=600, burst_seconds=1)  # 10 a second, 1 second of burst
    >>> [b.reserve(5, now=0.0) for _ in range(4)]
    [0.0, 0.0, 0.0, 0.5]
    """

    def __init__(self, per_minute: float, burst_seconds: float = 0.0):
        self.rate = per_minute / 60.0
        self.tolerance = burst_seconds
        self.next_free = float("-inf")  # when the bucket is empty again, in the caller's clock

    def reserve(self, units: float, now: float) -> float:
        """Book `units` and return how many seconds the caller waits before sending.

        With no burst allowance, sends are spaced by units/rate, so any half-open 60-second window
        holds at most `per_minute` units. A single reservation larger than that still passes, alone.
        """
        send = max(now, self.next_free - self.tolerance)
        self.next_free = max(self.next_free, send) + units / self.rate
        return send - now


class LimiterCore:
    """All limits of one account: request pace, token pace and a pause set by Retry-After."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None):
        self.requests = Pacer(requests_per_minute) if requests_per_minute else None
        self.tokens = Pacer(tokens_per_minute) if tokens_per_minute else None
        self.paused_until = 0.0

    def reserve(self, tokens: int, now: float) -> float:
        """Seconds to wait before a request of about `tokens` tokens may be sent."""
        wait = max(0.0, self.paused_until - now)
        if self.requests:
            wait = max(wait, self.requests.reserve(1, now + wait))
        if self.tokens:
            wait = max(wait, self.tokens.reserve(tokens, now + wait))
        return wait

    def pause(self, seconds: float, now: float) -> None:
        """Hold every request back for `seconds` (the server said Retry-After)."""
        self.paused_until = max(self.paused_until, now + seconds)


class SharedLimiter:
    """Ray actor body: one `LimiterCore` for every worker of a rating job.

    Made with `ray.remote(SharedLimiter).options(max_concurrency=...)`; workers call
    `await limiter.acquire.remote(tokens)` before a request.
    """

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None):
        self.core = LimiterCore(requests_per_minute, tokens_per_minute)

    async def acquire(self, tokens: int) -> float:
        """Wait until a request of `tokens` tokens may go; returns the seconds waited."""
        wait = self.core.reserve(tokens, time.monotonic())
        if wait > 0:
            await asyncio.sleep(wait)
        return wait

    def pause(self, seconds: float) -> None:
        self.core.pause(seconds, time.monotonic())
