"""P1: throughput of the openai rating backend against a server with a fixed latency.

    python scripts/bench_rate.py [--latency 0.2] [--concurrency 64] [--workers 1] [--rows 52002]

Rates the rows of ../shared/data/alpaca_52k_reconstructed.json through `alpagasus rate` (Ray Data,
the real openai client) against a local OpenAI-compatible server that answers every request after
`latency` seconds. The ideal is concurrency / latency requests per second; the script prints the
achieved fraction of it, and the same fraction for the AlpaGasus reference pattern
(asyncio.gather over batches of 5 requests, one batch after another) measured in the same run on
a slice of the rows, plus the driver's peak memory.

    python scripts/bench_rate.py --conversations 3 [--rows 2700]

rates conversations instead: every 3 consecutive rows become one conversation (a system turn,
then 3 user / assistant exchanges), rated turn by turn (`rate.unit=turn`: one request per
assistant turn, each with the turns before it); `--rows` counts conversations.

    python scripts/bench_rate.py --client-only [--latency 1.0] [--seconds 40]

measures instead the ceiling of one event loop with no Ray: `concurrency` coroutines sending
request after request through the openai client for `seconds`, once reading each reply into the
client's typed ChatCompletion and once as the pipeline's API actors ask (`ApiWorker.send`: the
raw body into ChatBody).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from fake_openai_server import reset, serve, stats  # noqa: E402

from alpagasus_ray.config import load_config  # noqa: E402
from alpagasus_ray.llm.engines.api import ApiWorker  # noqa: E402
from alpagasus_ray.llm.task import Request  # noqa: E402
from alpagasus_ray.rules.prompts import rating_messages  # noqa: E402
from alpagasus_ray.stages.rate import run_rate  # noqa: E402

DATA = os.path.join(HERE, "..", "..", "shared", "data", "alpaca_52k_reconstructed.json")


def server_rate(url: str) -> tuple[float, int]:
    """Requests per second the server saw between its first and last arrival, and the count."""
    s = stats(url)
    return s["requests"] / max(s["last_ts"] - s["first_ts"], 1e-9), s["requests"]


def reference_pattern(url: str, rows: list[dict], group: int = 5) -> None:
    """The AlpaGasus rating loop: gather `group` requests, wait for all, then the next group."""
    import openai

    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=3)
        for start in range(0, len(rows), group):
            await asyncio.gather(*(
                client.chat.completions.create(
                    model="fake", max_tokens=256, temperature=0,
                    messages=rating_messages(r["instruction"], r["input"], r["output"]),
                )
                for r in rows[start:start + group]
            ))

    asyncio.run(run())


def client_loop(url: str, rows: list[dict], concurrency: int, seconds: float, raw: bool) -> None:
    """`concurrency` coroutines on one event loop, each sending request after request for `seconds`:
    through the client's typed replies, or (`raw`) through the API actors' `ApiWorker.send`."""
    endpoint = load_config(None, ["rate.backend=openai", f"rate.base_url={url}", "rate.model=fake"]).rate
    top_logprobs = endpoint.top_logprobs

    async def run() -> None:
        worker = ApiWorker(endpoint, slots=concurrency)  # made on the loop that uses its semaphore
        client = worker.client
        end = time.monotonic() + seconds

        async def sender(first: int) -> None:
            for i in range(first, 10**9, concurrency):
                if time.monotonic() >= end:
                    return
                r = rows[i % len(rows)]
                messages = rating_messages(r["instruction"], r["input"], r["output"])
                if raw:
                    await worker.send(Request(messages=messages, max_tokens=endpoint.max_tokens, top_logprobs=top_logprobs))
                else:
                    await client.chat.completions.create(
                        model="fake", messages=messages, max_tokens=endpoint.max_tokens, temperature=endpoint.temperature,
                        logprobs=True, top_logprobs=top_logprobs,
                    )

        await asyncio.gather(*(sender(k) for k in range(concurrency)))
        await client.close()

    asyncio.run(run())


def client_only(args, ideal: float) -> None:
    rows = json.load(open(DATA))[:5_000]
    with serve({"latency": args.latency}) as url:
        for raw in (False, True):
            reset(url)
            client_loop(url, rows, args.concurrency, args.seconds, raw)
            rate, _ = server_rate(url)
            how = "ApiWorker.send (raw body into ChatBody)" if raw else "typed ChatCompletion"
            print(f"client only, {how}: {rate:.1f} req/s, {rate / ideal:.3f} of C/L")


def conversations_file(directory: str, conversations: int, turns: int) -> str:
    """A JSONL file of `conversations` conversations, each a system turn and `turns` exchanges made
    of consecutive rows (their instruction and input as the user turn, their output as the reply)."""
    rows = json.load(open(DATA))
    path = os.path.join(directory, "conversations.jsonl")
    with open(path, "w") as f:
        for c in range(conversations):
            messages = [{"role": "system", "content": "You are a helpful assistant."}]
            for r in rows[(c * turns) % (len(rows) - turns):][:turns]:
                question = r["instruction"] + (f"\n\n{r['input']}" if r["input"].strip() else "")
                messages += [{"role": "user", "content": question},
                             {"role": "assistant", "content": r["output"] or "(no answer)"}]
            f.write(json.dumps({"id": f"conv-{c}", "messages": messages}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.2, help="server latency L in seconds")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight C")
    parser.add_argument("--workers", type=int, default=1, help="rate.num_workers")
    parser.add_argument("--rows", type=int, default=52_002, help="rows to rate (all 52,002 by default)")
    parser.add_argument("--no-logprobs", action="store_true", help="do not ask for top logprobs")
    parser.add_argument("--reference-rows", type=int, default=500, help="rows for the reference pattern")
    parser.add_argument("--client-only", action="store_true", help="the openai client on one event loop, no Ray")
    parser.add_argument("--seconds", type=float, default=40, help="how long each --client-only loop runs")
    parser.add_argument("--conversations", type=int, default=0, metavar="TURNS",
                        help="rate conversations of this many assistant turns, made of consecutive rows")
    args = parser.parse_args()
    ideal = args.concurrency / args.latency
    if args.client_only:
        return client_only(args, ideal)

    with serve({"latency": args.latency}) as url, tempfile.TemporaryDirectory() as run_dir:
        data = conversations_file(run_dir, args.rows, args.conversations) if args.conversations else DATA
        config = load_config(None, [
            f"run_dir={run_dir}/run", f"data.path={data}", f"data.limit={args.rows}", "rate.backend=openai",
            f"rate.base_url={url}", "rate.model=fake", f"rate.concurrency={args.concurrency}",
            f"rate.num_workers={args.workers}", f"rate.logprobs={not args.no_logprobs}",
        ])
        started = time.perf_counter()
        summary = run_rate(config)
        wall = time.perf_counter() - started
        ours, requests = server_rate(url)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        reset(url)
        rows = json.load(open(DATA))[: args.reference_rows]
        reference_pattern(url, rows)
        theirs, _ = server_rate(url)

    result = {
        "latency_s": args.latency, "concurrency": args.concurrency, "workers": args.workers,
        "rows": summary["rows_in"], "ok": summary["by_status"]["ok"], "requests": requests,
        "assistant_turns_per_row": args.conversations or None,
        "ideal_req_per_s": round(ideal, 1),
        "alpagasus_ray_req_per_s": round(ours, 1),
        "alpagasus_ray_ratio": round(ours / ideal, 3),
        "reference_gather5_req_per_s": round(theirs, 1),
        "reference_gather5_ratio": round(theirs / ideal, 3),
        "speedup_over_reference": round(ours / theirs, 1),
        "wall_s_including_ray_start": round(wall, 1),
        "driver_peak_rss_mb": round(peak_mb),
    }
    print(json.dumps(result, indent=2))
    print(f"P1: {result['alpagasus_ray_ratio']:.3f} of C/L (reference gather-5: {result['reference_gather5_ratio']:.3f}), "
          f"driver peak {result['driver_peak_rss_mb']} MB")


if __name__ == "__main__":
    main()
