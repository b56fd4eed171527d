"""P5: throughput of `alpagasus judge` on the four test sets against a server with a fixed latency.

    python scripts/bench_judge.py [--latency 1.0] [--concurrency 64]

Judges all 730 prompts of Koala, Vicuna, WizardLM and Self-Instruct in both orders (1,460
requests with the paper's App. C prompt) through `alpagasus judge` (Ray Data, the real openai
client) against a local OpenAI-compatible server that answers every request after `latency`
seconds. The answers are the test sets' own prompts reversed, so every request is distinct and
prompt-sized. The ideal is concurrency / latency requests per second; the script prints the
achieved fraction, and in the same run the fraction reached by a bare asyncio loop over the same
client with the same concurrency (no Ray, nothing saved) and by the gather-5 pattern of the
AlpaGasus reference scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from fake_openai_server import reset, serve, stats  # noqa: E402

from alpagasus_ray.config import load_config  # noqa: E402
from alpagasus_ray.stages.judge import run_judge  # noqa: E402
from alpagasus_ray.rules.judging import judge_messages  # noqa: E402
from alpagasus_ray.ray_runtime import ensure_ray  # noqa: E402
from alpagasus_ray.config import TEST_SETS  # noqa: E402
from alpagasus_ray.testsets import load_test_set  # noqa: E402


def server_rate(url: str) -> tuple[float, int]:
    """Requests per second the server saw between its first and last arrival, and the count."""
    s = stats(url)
    return s["requests"] / max(s["last_ts"] - s["first_ts"], 1e-9), s["requests"]


def write_answers(run_dir: str) -> list[tuple[str, str, str]]:
    """Answers of two models to every prompt; returns the (question, first, second) of each judgment."""
    pairs = []
    for name in ("cand", "base"):
        os.makedirs(os.path.join(run_dir, "answers", name), exist_ok=True)
    for ts in TEST_SETS:
        rows = load_test_set(ts)
        for name, make in (("cand", lambda r: r["instruction"][::-1]), ("base", lambda r: r["instruction"].upper())):
            with open(os.path.join(run_dir, "answers", name, f"{ts}.jsonl"), "w") as f:
                for r in rows:
                    f.write(json.dumps({**r, "prompt": r["instruction"], "answer": make(r), "model": name,
                                        "finish_reason": "stop", "status": "ok"}) + "\n")
        for r in rows:
            pairs += [(r["instruction"], r["instruction"][::-1], r["instruction"].upper()),
                      (r["instruction"], r["instruction"].upper(), r["instruction"][::-1])]
    return pairs


def bare_loop(url: str, judgments: list, concurrency: int) -> None:
    """The best a plain script does: one asyncio loop, a semaphore of `concurrency`."""
    import openai

    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=3)
        slots = asyncio.Semaphore(concurrency)

        async def one(q, a, b):
            async with slots:
                await client.chat.completions.create(model="fake", max_tokens=512, messages=judge_messages(q, a, b))

        await asyncio.gather(*(one(*j) for j in judgments))

    asyncio.run(run())


def gather5(url: str, judgments: list) -> None:
    """The AlpaGasus reference loop: gather 5 requests, wait for all, then the next 5."""
    import openai

    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=3)
        for start in range(0, len(judgments), 5):
            await asyncio.gather(*(client.chat.completions.create(model="fake", max_tokens=512, messages=judge_messages(*j))
                                   for j in judgments[start:start + 5]))

    asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=1.0, help="server latency L in seconds")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight C")
    parser.add_argument("--workers", type=int, default=1, help="judge.num_workers")
    parser.add_argument("--reference-judgments", type=int, default=200, help="judgments for the gather-5 pattern")
    args = parser.parse_args()
    ideal = args.concurrency / args.latency
    ensure_ray()  # Ray's start is not part of the stage's throughput

    with serve({"latency": args.latency, "reply": "8 6\nAssistant 1 is more detailed."}) as url, \
            tempfile.TemporaryDirectory() as run_dir:
        judgments = write_answers(run_dir)
        config = load_config(None, [
            f"run_dir={run_dir}", "judge.backend=openai", f"judge.base_url={url}", "judge.model=fake",
            "judge.candidate=cand", "judge.baseline=base", f"judge.concurrency={args.concurrency}",
            f"judge.num_workers={args.workers}",
        ])
        started = time.perf_counter()
        record = run_judge(config)
        wall = time.perf_counter() - started
        ours, requests = server_rate(url)

        reset(url)
        bare_loop(url, judgments, args.concurrency)
        bare, _ = server_rate(url)
        reset(url)
        gather5(url, judgments[: args.reference_judgments])
        theirs, _ = server_rate(url)

    result = {
        "latency_s": args.latency, "concurrency": args.concurrency, "workers": args.workers,
        "judgments": len(judgments), "requests": requests, "by_status": record["judgments_by_status"],
        "ideal_req_per_s": round(ideal, 1),
        "alpagasus_ray_ratio": round(ours / ideal, 3),
        "alpagasus_ray_end_to_end_ratio": round(requests / wall / ideal, 3),
        "bare_asyncio_loop_ratio": round(bare / ideal, 3),
        "reference_gather5_ratio": round(theirs / ideal, 3),
        "wall_s": round(wall, 1),
    }
    print(json.dumps(result, indent=2))
    print(f"P5: {result['alpagasus_ray_ratio']:.3f} of C/L while sending "
          f"({result['alpagasus_ray_end_to_end_ratio']:.3f} end to end, stage start included); "
          f"bare asyncio loop {result['bare_asyncio_loop_ratio']:.3f}; reference gather-5 {result['reference_gather5_ratio']:.3f}")


if __name__ == "__main__":
    main()
