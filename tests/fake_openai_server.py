"""A small but real OpenAI-compatible HTTP server for tests and benchmarks.

It answers ``POST /v1/chat/completions`` and ``GET /v1/models`` the way the
OpenAI API does, with a configurable latency, scripted replies, fault injection
(429 / 500 / hang / garbage / empty) and fake logprobs, and it keeps request
statistics at ``GET /stats`` (cleared by ``POST /reset``), the usage of every completion
answered among them.  It runs in its own
process so that a client under test does not share the GIL with it.

From a test::

    from fake_openai_server import serve, stats

    config = {"latency": 0.05, "rules": [{"match": "rate me", "faults": ["429"]}]}
    with serve(config) as base_url:          # "http://127.0.0.1:PORT/v1"
        client = openai.OpenAI(base_url=base_url, api_key="test")
        ...
        print(stats(base_url)["by_status"])

By hand (prints the base URL, Ctrl-C stops it)::

    python tests/fake_openai_server.py --port 8000 --config-json '{"latency": 0.2}'
    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    curl -s localhost:8000/stats

Config keys (a JSON-able dict, every key optional):

``latency``       seconds every chat request waits before it is answered (0)
``reply``         assistant message content (``DEFAULT_REPLY``)
``replies``       a list of contents instead: each request gets one picked by a stable hash
                  (crc32) of its messages' text, for a spread of scores over many rows
``replies_by_response``  with ``replies``: pick by a hash of the response being rated alone (the
                  text after the last ``Response: `` of the paper's Fig. 4 prompt, or after
                  ``[Assistant: the response to rate]`` of the conversation prompt, to the end of
                  the first message), so an answer rated as an Alpaca row or as a conversation's
                  turn gets the same reply
``marker``        a regular expression with one group: a request that matches no rule is answered
                  with the group of its *last* match as the score (e.g. ``SCORE=(\\d\\.?\\d?)``
                  scores a conversation's turn by the marker in it: the turn to rate comes last)
``echo``          a prefix: a request that matches no rule is answered ``<echo> after <n> messages:
                  <the last message's content>`` (a model whose answer shows what it was shown)
``model``         model id listed by ``/v1/models`` and echoed when a request has none
``retry_after``   seconds sent in ``Retry-After`` / ``retry-after-ms`` with a 429 (1)
``hang_seconds``  how long a ``"hang"`` fault sleeps before answering (30)
``fail_every``    every k-th chat request overall gets the fault ``fail_kind`` ("500")
``rules``         list of ``{"match", "reply", "faults", "logprobs"}``:
  a request uses the first rule whose ``match`` is a substring of its messages'
  text.  The n-th request (0-based) matching a rule gets ``faults[n]`` while
  n < len(faults), else a normal answer.  ``reply`` is a text, or a list of
  texts used in order by the rule's normal answers (the last one repeats;
  faults do not use one up).  ``logprobs`` overrides the fake logprobs: one
  list per reply token of ``[token, logprob]`` pairs, the first one chosen.

Fault kinds: ``"429"`` (with Retry-After), ``"429_no_retry_after"``,
``"insufficient_quota"`` (a 429 whose body says the quota is used up), ``"500"``,
``"hang"``, ``"garbage"`` (HTTP 200, JSON content type, truncated body) and
``"empty"`` (HTTP 200, content ``""``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.request
import zlib
from typing import Any, Callable, Iterator

from aiohttp import web

DEFAULT_REPLY = "4.5\nThe response is accurate and relevant."
FAULT_KINDS = ("429", "429_no_retry_after", "insufficient_quota", "500", "hang", "garbage", "empty")
DEFAULTS: dict[str, Any] = {
    "latency": 0.0,
    "reply": DEFAULT_REPLY,
    "replies": None,
    "replies_by_response": False,
    "marker": None,
    "echo": None,
    "model": "fake-model",
    "retry_after": 1.0,
    "hang_seconds": 30.0,
    "fail_every": None,
    "fail_kind": "500",
    "rules": [],
}
RULE_KEYS = {"match", "reply", "faults", "logprobs"}

CHOSEN_LOGPROB = math.log(0.7)
# Filler alternatives; 21 of them so that the 19 alternatives top_logprobs=20
# needs remain even after dropping the chosen token.
_FILLER_TOKENS = (
    " the", " a", ",", ".", "\n", " and", " is", " of", " to", " it",
    " in", " that", " not", " this", " be", " for", " with", " as", " on", " but", " or",
)
_TOKEN_RE = re.compile(r"\d+|\s+|[^\W\d_]+|.", re.DOTALL)

_no_proxy_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --------------------------------------------------------------------------- config


def validate_config(config: dict | None) -> dict:
    """Return ``config`` merged over ``DEFAULTS``; raise ValueError on unknown keys or fault kinds."""
    config = dict(config or {})
    unknown = set(config) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown fake server config keys: {sorted(unknown)}")
    merged = {**DEFAULTS, **config}
    if merged["fail_every"] is not None and int(merged["fail_every"]) < 1:
        raise ValueError("fail_every must be a positive integer")
    if merged["fail_kind"] not in FAULT_KINDS:
        raise ValueError(f"fail_kind must be one of {FAULT_KINDS}")
    rules = []
    for rule in merged["rules"]:
        if "match" not in rule or set(rule) - RULE_KEYS:
            raise ValueError(f"a rule needs 'match' and only keys {sorted(RULE_KEYS)}: {rule!r}")
        bad = [f for f in rule.get("faults", []) if f not in FAULT_KINDS]
        if bad:
            raise ValueError(f"unknown fault kinds {bad}; known: {FAULT_KINDS}")
        reply = rule.get("reply", merged["reply"])
        replies = [reply] if isinstance(reply, str) else list(reply)
        if not replies:
            raise ValueError(f"rule reply list is empty: {rule!r}")
        rules.append({**rule, "reply": replies, "faults": list(rule.get("faults", []))})
    merged["rules"] = rules
    return merged


# --------------------------------------------------------------------------- tokens and logprobs


@functools.lru_cache(maxsize=1024)
def tokenize(text: str) -> tuple[str, ...]:
    """Split text into runs of digits, whitespace and letters, and single other characters."""
    return tuple(_TOKEN_RE.findall(text))


def _entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


@functools.lru_cache(maxsize=4096)
def _default_logprob_entry(token: str, k: int) -> dict:
    # Cached because replies repeat; callers only serialise the result, never mutate it.
    chosen = _entry(token, CHOSEN_LOGPROB)
    alternatives: list[tuple[str, float]] = []
    if token.isascii() and token.isdigit():
        # Near-miss scores get the 0.3 remaining mass, so an expected-score
        # computation over top_logprobs is centred on the chosen digit.
        value = int(token)
        neighbours = [str(v) for v in (value - 1, value + 1) if v >= 0 and (len(token) > 1 or v <= 9)]
        alternatives += [(n, math.log(0.3 / len(neighbours))) for n in neighbours]
        if len(token) == 1:
            far = sorted((d for d in range(10) if abs(d - value) > 1), key=lambda d: abs(d - value))
            # Tiny, so the listed mass exceeds 1 by at most 2e-4.
            alternatives += [(str(d), math.log(1e-4 * 0.5**i)) for i, d in enumerate(far)]
    fillers = [t for t in _FILLER_TOKENS if t != token and t not in {a for a, _ in alternatives}]
    mass = 0.3 if not alternatives else 1e-5
    alternatives += [(t, math.log(mass * 0.5 ** (i + 1))) for i, t in enumerate(fillers)]
    top = [chosen] + [_entry(t, lp) for t, lp in alternatives[: max(k - 1, 0)]]
    return {**chosen, "top_logprobs": top if k > 0 else []}


def logprobs_content(tokens: tuple[str, ...], k: int, override: list | None = None) -> list[dict]:
    """Per-token OpenAI ``logprobs.content`` for ``tokens`` with ``k`` top_logprobs each."""
    content = []
    for i, token in enumerate(tokens):
        if override is not None and i < len(override):
            pairs = [_entry(str(t), float(lp)) for t, lp in override[i]]
            content.append({**pairs[0], "top_logprobs": pairs[:k]})
        else:
            content.append(_default_logprob_entry(token, k))
    return content


# --------------------------------------------------------------------------- server


class _Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.by_status: collections.Counter[str] = collections.Counter()
        self.by_rule: collections.Counter[str] = collections.Counter()
        self.by_fault: collections.Counter[str] = collections.Counter()
        self.fault_times: list[list] = []  # [arrival time, fault kind] of each fault served
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        # Arrivals of the last 60 s only, so memory stays bounded in soak runs.
        self._window: collections.deque[float] = collections.deque()
        self.per_minute_max = 0
        # The latest arrival times (bounded), for tests of request pacing.
        self.arrivals: collections.deque[float] = collections.deque(maxlen=10_000)
        # Distinct Authorization headers seen, so a test can prove which key a client sent.
        self.authorization: set[str] = set()
        # The usage of every completion answered, as a bill would add it up.
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}

    def arrive(self, authorization: str | None = None) -> int:
        now = time.time()
        self.arrivals.append(now)
        if authorization:
            self.authorization.add(authorization)
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.first_ts = self.first_ts or now
        self.last_ts = now
        window = self._window
        window.append(time.monotonic())
        while window[0] < window[-1] - 60.0:
            window.popleft()
        self.per_minute_max = max(self.per_minute_max, len(window))
        return self.requests

    def to_json(self) -> dict:
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "by_status": dict(self.by_status),
            "by_rule": dict(self.by_rule),
            "by_fault": dict(self.by_fault),
            "fault_times": self.fault_times,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "per_minute_max": self.per_minute_max,
            "arrivals": list(self.arrivals),
            "authorization": sorted(self.authorization),
            "usage": dict(self.usage),
        }


def _error(
    status: int, message: str, type_: str, code: str | None = None, headers: dict | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def retry_after_headers(retry_after: float) -> dict:
    """The headers of a 429 that asks the client to wait ``retry_after`` seconds."""
    retry_after = float(retry_after)
    return {
        # A fractional Retry-After is nonstandard but the openai client
        # parses it as a float; it prefers retry-after-ms (which the real
        # API also sends), so both are given.
        "Retry-After": f"{retry_after:g}",
        "retry-after-ms": str(round(retry_after * 1000)),
    }


def _message_text(messages: list) -> str:
    parts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):  # multi-part content: [{"type": "text", "text": ...}]
            parts.extend(p.get("text", "") for p in content if isinstance(p, dict))
    return "\n".join(parts)


_RESPONSE_MARKS = ("Response: ", "[Assistant: the response to rate]\n")


_FENCED = re.compile(r"\s*<(data-[0-9a-f]+)>\n(.*?)\n</\1>", re.S)


def _rated_response(messages: list) -> str:
    """The response a rating request rates: after the last response mark of its first message."""
    first = _message_text(messages[:1])
    at = max(((first.rfind(mark), mark) for mark in _RESPONSE_MARKS), key=lambda found: found[0])
    response = first[at[0] + len(at[1]):] if at[0] >= 0 else first
    fenced = _FENCED.match(response)  # a fenced field: its text alone, the same under any fence
    return fenced.group(2) if fenced else response


class FakeOpenAI:
    """The aiohttp application state: config, per-rule counters and stats."""

    def __init__(self, config: dict | None = None) -> None:
        self.config = validate_config(config)
        self.reset()

    def reset(self) -> None:
        self.stats = _Stats()
        self.rule_hits = [0] * len(self.config["rules"])
        self.rule_answers = [0] * len(self.config["rules"])

    def app(self) -> web.Application:
        """Build the aiohttp ``web.Application``."""
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/stats", self.get_stats)
        app.router.add_post("/reset", self.post_reset)
        return app

    async def models(self, request: web.Request) -> web.Response:
        model = {"id": self.config["model"], "object": "model", "created": 0, "owned_by": "fake"}
        return web.json_response({"object": "list", "data": [model]})

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.to_json())

    async def post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def chat_completions(self, request: web.Request) -> web.Response:
        # Only chat requests count in /stats, so serve()'s readiness probe on
        # /v1/models and stats polling do not show up there.
        stats = self.stats
        number = stats.arrive(request.headers.get("Authorization"))
        status = 499  # stays so if the client disconnects and the handler is cancelled
        try:
            response = await self._chat(request, number)
            status = response.status
            return response
        except asyncio.CancelledError:
            raise
        except Exception:
            status = 500
            raise
        finally:
            stats.in_flight -= 1
            stats.by_status[str(status)] += 1

    async def _chat(self, request: web.Request, number: int) -> web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "Request body must be JSON with 'messages'.", "invalid_request_error")
        return await self.answer(body, number)

    async def answer(self, body: Any, number: int, wait: bool = True) -> web.Response:
        """Answer one parsed chat completions request body (the ``number``-th request overall).

        Applies the replies, rules, faults and logprobs of the config, and counts
        rule and fault hits in the stats (not the request itself).  With
        ``wait=False`` it skips the ``latency`` and ``"hang"`` sleeps, so it
        never suspends: the batch server answers its request lines with it.
        """
        config = self.config
        try:
            messages = body["messages"]
        except (KeyError, TypeError):
            return _error(400, "Request body must be JSON with 'messages'.", "invalid_request_error")
        if body.get("stream"):
            return _error(400, "The fake server does not support stream=true.", "invalid_request_error")
        want_logprobs = bool(body.get("logprobs"))
        k = body.get("top_logprobs") or 0
        if k and not want_logprobs:
            return _error(400, "logprobs must be set to true if top_logprobs is used.", "invalid_request_error")
        if not isinstance(k, int) or not 0 <= k <= 20:
            return _error(400, "top_logprobs must be an integer between 0 and 20.", "invalid_request_error")

        text = _message_text(messages)
        fault = None
        rule_index = next((i for i, r in enumerate(config["rules"]) if r["match"] in text), None)
        rule = config["rules"][rule_index] if rule_index is not None else None
        if rule is not None:
            self.stats.by_rule[rule["match"]] += 1
            hit = self.rule_hits[rule_index]
            self.rule_hits[rule_index] = hit + 1
            if hit < len(rule["faults"]):
                fault = rule["faults"][hit]
        if fault is None and config["fail_every"] and number % int(config["fail_every"]) == 0:
            fault = config["fail_kind"]
        if fault is not None:
            self.stats.by_fault[fault] += 1
            self.stats.fault_times.append([time.time(), fault])

        if wait and config["latency"]:
            await asyncio.sleep(config["latency"])

        if fault == "429":
            return _error(429, f"Rate limit reached for {config['model']} (fake fault).", "requests",
                          "rate_limit_exceeded", retry_after_headers(config["retry_after"]))
        if fault == "429_no_retry_after":  # as many real 429s are: the client backs off by itself
            return _error(429, f"Rate limit reached for {config['model']} (fake fault).", "requests",
                          "rate_limit_exceeded")
        if fault == "insufficient_quota":  # a 429 too, but waiting does not help
            return _error(429, "You exceeded your current quota, please check your plan and billing details.",
                          "insufficient_quota", "insufficient_quota")
        if fault == "500":
            return _error(500, "The server had an error while processing your request (fake fault).",
                          "server_error")
        if fault == "garbage":
            return web.Response(body=b'{"choices": [', content_type="application/json")
        if fault == "hang" and wait:
            await asyncio.sleep(float(config["hang_seconds"]))

        if fault == "empty":
            reply = ""
        elif rule is None and config["echo"] is not None:
            reply = f"{config['echo']} after {len(messages)} messages: {messages[-1]['content']}"
        elif rule is None and config["marker"] and (found := re.findall(config["marker"], text)):
            reply = f"{found[-1]}\nScored by its marker."
        elif rule is None and config["replies"]:
            key = _rated_response(messages) if config["replies_by_response"] else text
            reply = config["replies"][zlib.crc32(key.encode()) % len(config["replies"])]
        elif rule is None:
            reply = config["reply"]
        else:
            replies = rule["reply"]
            answer = self.rule_answers[rule_index]
            reply = replies[min(answer, len(replies) - 1)]
            if fault != "hang":  # a hung answer is likely unread, so it keeps the sequence intact
                self.rule_answers[rule_index] = answer + 1

        tokens = tokenize(reply)
        finish_reason = "stop"
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_tokens and len(tokens) > max_tokens:
            tokens, finish_reason = tokens[:max_tokens], "length"
            reply = "".join(tokens)
        logprobs = None
        if want_logprobs:
            override = rule.get("logprobs") if rule is not None and fault != "empty" else None
            logprobs = {"content": logprobs_content(tokens, k, override), "refusal": None}

        prompt_tokens = max(1, len(text) // 4)
        self.stats.usage["prompt_tokens"] += prompt_tokens
        self.stats.usage["completion_tokens"] += len(tokens)
        completion = {
            "id": f"chatcmpl-fake-{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or config["model"],
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": reply, "refusal": None},
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens),
                "total_tokens": prompt_tokens + len(tokens),
            },
        }
        return web.Response(text=json.dumps(completion), content_type="application/json")


def run_server(config: dict | None, sock: socket.socket, server_class: type | None = None) -> None:
    """Serve ``server_class(config)`` (default ``FakeOpenAI``) on an already listening socket
    until SIGINT/SIGTERM (blocking)."""
    try:  # uvloop roughly doubles the request rate one core sustains
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    web.run_app(
        (server_class or FakeOpenAI)(config).app(),
        sock=sock,
        loop=loop,
        access_log=None,
        print=None,
        # Hung requests must not hold up termination: a fake has nothing to drain.
        shutdown_timeout=0.2,
        # Lets a "hang" end when the client gives up, so in_flight stays truthful.
        handler_cancellation=True,
        backlog=1024,
    )


# --------------------------------------------------------------------------- client-side helpers


def _root_url(base_url: str) -> str:
    base_url = base_url.rstrip("/")
    return base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url


def stats(base_url: str) -> dict:
    """Fetch ``/stats`` of the server at ``base_url`` (with or without the ``/v1`` suffix)."""
    with _no_proxy_opener.open(_root_url(base_url) + "/stats", timeout=10) as response:
        return json.loads(response.read())


def reset(base_url: str) -> None:
    """Clear the server's stats and per-rule counters (``POST /reset``)."""
    request = urllib.request.Request(_root_url(base_url) + "/reset", data=b"", method="POST")
    with _no_proxy_opener.open(request, timeout=10) as response:
        response.read()


@contextlib.contextmanager
def serve(
    config: dict | None = None,
    *,
    startup_timeout: float = 30.0,
    script: str = __file__,
    validate: Callable[[dict | None], dict] = validate_config,
) -> Iterator[str]:
    """Run the server in a subprocess; yield its base URL ``http://127.0.0.1:PORT/v1``.

    The server is terminated when the block exits.  ``script`` is the file the
    child runs (another fake server module with a ``main()`` taking ``--fd`` and
    ``--config-json``) and ``validate`` its config check.
    """
    config_json = json.dumps(validate(config))  # bad configs fail here, not in the child
    # Binding here and handing the socket to the child avoids both a
    # pick-a-free-port race and parsing the child's output for its port.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        port = sock.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, script, "--fd", str(sock.fileno()), "--config-json", config_json],
            pass_fds=(sock.fileno(),),
        )
    finally:
        # Only the child may hold the socket, so connections fail fast if it dies.
        sock.close()
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_ready(proc, base_url, time.monotonic() + startup_timeout)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(proc: subprocess.Popen, base_url: str, deadline: float) -> None:
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"fake OpenAI server exited with code {proc.returncode} during startup")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"fake OpenAI server at {base_url} did not answer in time")
        try:
            # Connections wait in the listen backlog until the child accepts,
            # so this blocks until the server is up rather than failing early.
            with _no_proxy_opener.open(base_url + "/models", timeout=min(remaining, 2.0)) as response:
                response.read()
            return
        except OSError:
            time.sleep(0.05)


# --------------------------------------------------------------------------- CLI


def main(
    argv: list[str] | None = None,
    *,
    server_class: type | None = None,
    description: str = "Fake OpenAI-compatible chat completions server.",
) -> None:
    """Command line entry point: ``python tests/fake_openai_server.py [--port N] [--config-json JSON]``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--config-json", default="{}", help="behaviour config as a JSON object")
    parser.add_argument("--config", help="path to a JSON file with the behaviour config")
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)  # listening socket passed by serve()
    args = parser.parse_args(argv)

    config = json.loads(args.config_json)
    if args.config:
        with open(args.config) as f:
            config = {**json.load(f), **config}
    if args.fd is not None:
        sock = socket.socket(fileno=args.fd)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(1024)
        host, port = sock.getsockname()[:2]
        print(f"fake OpenAI server listening on http://{host}:{port}/v1", flush=True)
    run_server(config, sock, server_class)


if __name__ == "__main__":
    main()
