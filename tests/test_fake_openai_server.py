"""Checks the fake OpenAI server against the real ``openai`` client (no Ray, a few seconds)."""

from __future__ import annotations

import math
import threading
import time

import openai
import pytest

from fake_openai_server import DEFAULT_REPLY, reset, serve, stats, tokenize, validate_config

EXACT_LOGPROBS = [[["4", -0.1], ["5", -2.4]], [[".", -0.01]]]

# One server for the tests that only need rules; each test owns its `match`
# string, so their per-rule counters do not interfere.
CONFIG = {
    "retry_after": 0.2,
    "rules": [
        {"match": "[rate-limit]", "faults": ["429", "429"]},
        {"match": "[rate-limit-once]", "faults": ["429"]},
        {"match": "[server-error]", "faults": ["500"]},
        {"match": "[garbage]", "faults": ["garbage"]},
        {"match": "[hang]", "faults": ["hang"]},
        {"match": "[empty]", "faults": ["empty"], "reply": ["not json", "5"]},
        {"match": "[exact]", "reply": "4.", "logprobs": EXACT_LOGPROBS},
    ],
}


@pytest.fixture(scope="module")
def base_url():
    with serve(CONFIG) as url:
        yield url


def ask(client: openai.OpenAI, text: str, **kwargs):
    return client.chat.completions.create(
        model="grader", messages=[{"role": "user", "content": text}], **kwargs
    )


def client_for(base_url: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="test", **{"max_retries": 0, **kwargs})


def test_tokenize():
    assert tokenize("4.5\nGood") == ("4", ".", "5", "\n", "Good")
    assert tokenize("Score: 10,  ok") == ("Score", ":", " ", "10", ",", "  ", "ok")


def test_validate_config_rejects_typos():
    with pytest.raises(ValueError, match="unknown"):
        validate_config({"latencey": 1})
    with pytest.raises(ValueError, match="fault"):
        validate_config({"rules": [{"match": "x", "faults": ["404"]}]})


def test_normal_reply(base_url):
    completion = ask(client_for(base_url), "Rate this answer, please.")
    choice = completion.choices[0]
    assert choice.message.content == DEFAULT_REPLY
    assert choice.finish_reason == "stop"
    assert choice.logprobs is None
    assert completion.model == "grader"
    assert completion.usage.prompt_tokens == len("Rate this answer, please.") // 4
    assert completion.usage.completion_tokens == len(tokenize(DEFAULT_REPLY))
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert [m.id for m in client_for(base_url).models.list()] == ["fake-model"]


def test_max_tokens_truncates(base_url):
    choice = ask(client_for(base_url), "short please", max_tokens=3).choices[0]
    assert choice.message.content == "4.5"
    assert choice.finish_reason == "length"


def test_logprobs_shape(base_url):
    completion = ask(client_for(base_url), "score it", logprobs=True, top_logprobs=3)
    content = completion.choices[0].logprobs.content
    assert [entry.token for entry in content] == list(tokenize(DEFAULT_REPLY))
    first = content[0]
    assert first.token == "4" and first.bytes == [ord("4")]
    assert math.isclose(math.exp(first.logprob), 0.7)
    assert [top.token for top in first.top_logprobs] == ["4", "3", "5"]
    assert [round(math.exp(top.logprob), 6) for top in first.top_logprobs] == [0.7, 0.15, 0.15]
    # Non-digit tokens get k distinct alternatives, the chosen one first.
    word = content[4]
    assert word.token == "The"
    assert len(word.top_logprobs) == 3 and word.top_logprobs[0].token == "The"
    assert len({top.token for top in word.top_logprobs}) == 3
    assert sum(math.exp(top.logprob) for top in word.top_logprobs) <= 1.0


def test_logprobs_override(base_url):
    completion = ask(client_for(base_url), "[exact]", logprobs=True, top_logprobs=5)
    content = completion.choices[0].logprobs.content
    assert completion.choices[0].message.content == "4."
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [("4", -0.1), ("5", -2.4)]
    assert (content[1].token, content[1].logprob) == (".", -0.01)


def test_rate_limit_without_retries(base_url):
    with pytest.raises(openai.RateLimitError) as excinfo:
        ask(client_for(base_url), "[rate-limit-once]")
    error = excinfo.value
    assert error.status_code == 429
    assert error.response.headers["retry-after"] == "0.2"
    assert error.response.headers["retry-after-ms"] == "200"
    assert error.code == "rate_limit_exceeded"


def test_rate_limit_retries_honour_retry_after(base_url):
    start = time.monotonic()
    completion = ask(client_for(base_url, max_retries=2), "[rate-limit]")
    elapsed = time.monotonic() - start
    assert completion.choices[0].message.content == DEFAULT_REPLY
    # Two waits of 0.2 s; without Retry-After the client's own backoff
    # (0.5 s, then 1 s, less up to 25 % jitter) would take at least 1.125 s.
    assert 0.4 <= elapsed < 1.1


def test_server_error(base_url):
    with pytest.raises(openai.InternalServerError) as excinfo:
        ask(client_for(base_url), "[server-error]")
    assert excinfo.value.status_code == 500


def test_garbage_body_raises(base_url):
    # The client does not wrap a broken JSON body in an openai error: it
    # surfaces json.JSONDecodeError (a ValueError) and never retries it.
    with pytest.raises(ValueError):
        ask(client_for(base_url, max_retries=2), "[garbage]")


def test_hang_times_out(base_url):
    start = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        ask(client_for(base_url, timeout=0.5), "[hang]")
    assert time.monotonic() - start < 2.0


def test_empty_fault_then_reply_sequence(base_url):
    client = client_for(base_url)
    assert ask(client, "[empty]").choices[0].message.content == ""
    # The fault did not use up a scripted reply; the last one repeats.
    assert [ask(client, "[empty]").choices[0].message.content for _ in range(3)] == ["not json", "5", "5"]


def test_stats_and_concurrency():
    n_threads = 8
    with serve({"latency": 0.3}) as url:
        assert stats(url)["requests"] == 0  # the readiness probe is not counted
        client = client_for(url)
        barrier = threading.Barrier(n_threads)

        def worker():
            barrier.wait()
            ask(client, "hello")

        threads = [threading.Thread(target=worker) for _ in range(n_threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        s = stats(url)
        assert s["requests"] == n_threads
        assert s["by_status"] == {"200": n_threads}
        assert s["max_in_flight"] == n_threads
        assert s["in_flight"] == 0
        assert s["per_minute_max"] == n_threads
        assert s["first_ts"] <= s["last_ts"]

        reset(url)
        assert stats(url)["requests"] == 0


def test_fail_every_and_reset():
    with serve({"fail_every": 3, "fail_kind": "429", "retry_after": 0.05,
                "rules": [{"match": "once", "faults": ["500"]}]}) as url:
        client = client_for(url)
        outcomes = []
        for _ in range(6):
            try:
                ask(client, "hi")
                outcomes.append("ok")
            except openai.RateLimitError:
                outcomes.append("429")
        assert outcomes == ["ok", "ok", "429", "ok", "ok", "429"]
        with pytest.raises(openai.InternalServerError):
            ask(client, "once")

        reset(url)  # also rewinds the rule's fault script
        with pytest.raises(openai.InternalServerError):
            ask(client, "once")
        s = stats(url)
        assert s["requests"] == 1
        assert s["by_rule"] == {"once": 1}
        assert s["by_fault"] == {"500": 1}
