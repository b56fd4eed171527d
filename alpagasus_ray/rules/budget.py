"""A spending cap that holds: the money spent plus the worst case of what is in flight never
passes it.

`worst_case_tokens` bounds what a request can cost before it is sent: a token is at least one
byte of text under the byte-level BPE vocabularies of the paid APIs, so a prompt needs at most its
UTF-8 bytes plus a few tokens a message for the chat format, and the reply at most `max_tokens`.
`Spending` is the arithmetic (no Ray, no clock): a request is booked at its worst case before it
goes and settled at the usage the API reported once it is back. `SharedSpending` is the Ray actor
that holds one `Spending` for every worker of a stage.
"""

from __future__ import annotations

# Tokens of the chat format around each message (role markers), and around the whole prompt,
# above what OpenAI's own counting adds (3 a message and 3 for the reply's start).
FORMAT_TOKENS_PER_MESSAGE = 8
FORMAT_TOKENS = 8


def worst_case_tokens(texts: list[str], max_tokens: int) -> tuple[int, int]:
    """(prompt tokens, completion tokens) that a request of `texts` (its messages' contents, or
    its one prompt) and a reply cap of `max_tokens` can at most be billed for.

    >>> worst_case_tokens(["abcd", "é"], 10)   # 4 + 2 bytes, 8 a message, 8 for the prompt
    (30, 10)
    """
    prompt = sum(len(t.encode("utf-8")) + FORMAT_TOKENS_PER_MESSAGE for t in texts) + FORMAT_TOKENS
    return prompt, max_tokens


def usd(tokens_in: int, tokens_out: int, price_in: float, price_out: float, factor: float = 1.0) -> float:
    """The price of the tokens, at prices in USD per million tokens, times `factor` (a batch
    discount).

    >>> usd(10**6, 10**6, 2.0, 8.0, factor=0.5)
    5.0
    """
    return (tokens_in * price_in + tokens_out * price_out) / 1e6 * factor


class Spending:
    """What a stage has spent and has in flight under a cap of `cap` USD.

    >>> s = Spending(cap=1.0, spent=0.25)
    >>> s.book(0.5), s.book(0.5)          # the second could pass the cap with the first
    (True, False)
    >>> s.book(0.01)                      # once refused, nothing more is sent
    False
    >>> s.settle(0.5, 0.125)              # back: its worst case replaced by what it cost
    >>> s.spent, s.in_flight, s.refused
    (0.375, 0.0, 2)
    """

    def __init__(self, cap: float, spent: float = 0.0):
        self.cap = cap
        self.spent = spent
        self.in_flight = 0.0
        self.refused = 0  # requests not sent
        self.stopped = False

    def book(self, worst: float, requests: int = 1) -> bool:
        """Whether `requests` (one, or a request file's) whose cost is at most `worst` may go:
        booked if so. The first refusal stops the sending for good, so that what is left to do is
        a clean rest, not a scatter of the smaller requests that still fit."""
        if self.stopped or self.spent + self.in_flight + worst > self.cap:
            self.stopped = True
            self.refused += requests
            return False
        self.in_flight += worst
        return True

    def hold(self, worst: float) -> None:
        """Count as in flight a request sent before this count began (a batch an earlier run sent)."""
        self.in_flight += worst

    def refuse(self, requests: int) -> None:
        """Stop the sending: `requests` more were not sent (cut from a request file)."""
        self.stopped = True
        self.refused += requests

    def room(self) -> float:
        """USD that requests may still be booked for."""
        return 0.0 if self.stopped else max(0.0, self.cap - self.spent - self.in_flight)

    def settle(self, worst: float, cost: float) -> None:
        """A booked request is back: `cost` is what its usage comes to (its worst case when the
        usage is unknown)."""
        self.in_flight = max(0.0, self.in_flight - worst)
        self.spent += cost

    def state(self) -> dict:
        return {"cap_usd": self.cap, "spent_usd": round(self.spent, 6), "in_flight_usd": round(self.in_flight, 6),
                "stopped": self.stopped, "refused": self.refused}


class SharedSpending:
    """Ray actor body: one `Spending` for every worker of a stage (`ray.remote(SharedSpending)`)."""

    def __init__(self, cap: float, spent: float = 0.0):
        self.spending = Spending(cap, spent)

    def book(self, worst: float, requests: int = 1) -> bool:
        return self.spending.book(worst, requests)

    def hold(self, worst: float) -> None:
        self.spending.hold(worst)

    def refuse(self, requests: int) -> None:
        self.spending.refuse(requests)

    def room(self) -> float:
        return self.spending.room()

    def settle(self, worst: float, cost: float) -> None:
        self.spending.settle(worst, cost)

    def state(self) -> dict:
        return self.spending.state()
