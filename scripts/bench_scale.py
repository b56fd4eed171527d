"""P4: does the driver stay flat as the input grows? Driver peak RSS and wall time at N and 10N rows.

    python scripts/bench_scale.py dry-run [--sizes 52002 520020 2600100]
    python scripts/bench_scale.py rate [--sizes 52002 520020] [--latency 0.01] [--concurrency 64]
    python scripts/bench_scale.py filter --run-dirs RUN_52K RUN_520K   (again, on the rate runs' directories)
    python scripts/bench_scale.py batch [--sizes 52002 520020]   (rate.backend=openai_batch, instant batches)
    python scripts/bench_scale.py rate --conversations 2   (conversations of 2 assistant turns, rated by turn)

Builds copies of the Alpaca 52k set (a suffix per copy, so every row is new) as JSONL files under
a temporary directory, and runs `alpagasus rate` (with --dry-run, or against a local fake
OpenAI-compatible server at low latency whose scores spread as the paper's do, about a fifth at
4.5 or above; then `alpagasus filter`) as a subprocess on each, sampling
the driver's resident memory every 50 ms: its RSS, and its RSS less the pages of Ray's shared
object store (/dev/shm) it has mapped, which the RSS counts though they are the store's memory.
Each size runs in a fresh process with its own local Ray.
Prints each figure and the ratios against the smallest size, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, os.path.join(ROOT, "tests"))

from testdata import scale_data  # noqa: E402


def make_input(rows: int, out_dir: str, turns: int = 0) -> str:
    """`rows` rows of Alpaca copies (copy k has ' [copy k]' after each instruction), as JSONL; with
    `turns`, `rows` conversations instead, each a system turn and `turns` exchanges made of
    consecutive rows (an empty output answered "(no answer)")."""
    path = os.path.join(out_dir, f"alpaca_{rows}.jsonl" if not turns else f"chat{turns}_{rows}.jsonl")
    if os.path.exists(path):
        return path
    with open(scale_data("alpaca_52k_reconstructed.json")) as f:
        base = json.load(f)
    with open(path, "w") as out:
        for n in range(rows):
            if not turns:
                row = base[n % len(base)]
                out.write(json.dumps({**row, "instruction": f"{row['instruction']} [copy {n // len(base)}]"}) + "\n")
                continue
            messages = [{"role": "system", "content": "You are a helpful assistant."}]
            for t in range(turns):
                k = n * turns + t
                row = base[k % len(base)]
                question = f"{row['instruction']} [copy {k // len(base)}]" + (f"\n\n{row['input']}" if row["input"] else "")
                messages += [{"role": "user", "content": question},
                             {"role": "assistant", "content": row["output"] or "(no answer)"}]
            out.write(json.dumps({"messages": messages}) + "\n")
    return path


def shared_memory_bytes(pid: int) -> int:
    """Bytes of shared memory (on Linux `RssShmem`: the pages of Ray's object store in /dev/shm)
    resident in the process, which its RSS counts though they are the object store's."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssShmem:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Measured(NamedTuple):
    rss: float  # peak RSS, MB
    own: float  # peak of the RSS less the object store's shared pages, MB
    wall: float  # seconds
    tail: str  # the end of the output


def run_measured(command: list[str], env: dict | None = None) -> Measured:
    """The peak memory, wall time and output tail of one command."""
    started = time.time()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        watched, peak, own = psutil.Process(proc.pid), 0, 0
        while proc.poll() is None:
            try:
                rss = watched.memory_info().rss
                peak = max(peak, rss)
                own = max(own, rss - shared_memory_bytes(proc.pid))
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        wall = time.time() - started
        log.seek(0)
        tail = log.read().decode(errors="replace")[-3000:]
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{tail}")
    return Measured(peak / 2**20, own / 2**20, wall, tail)


def alpagasus(*args: str) -> list[str]:
    return [sys.executable, "-m", "alpagasus_ray.cli", *args]


def dry_run(sizes: list[int], work: str) -> None:
    results = []
    for rows in sizes:
        data = make_input(rows, work)
        rss, _, wall, _ = run_measured(alpagasus("rate", "--dry-run", "--config", "configs/rate_openai_compatible.yaml",
                                                 "rate.base_url=http://127.0.0.1:9/v1", f"data.path={data}",
                                                 f"run_dir={work}/dry-{rows}"))
        results.append((rows, rss, wall))
        print(f"dry-run {rows:>9,} rows: driver peak RSS {rss:7.0f} MB, wall {wall:6.1f} s", flush=True)
    base = results[0]
    for rows, rss, wall in results[1:]:
        print(f"dry-run {rows:,} over {base[0]:,}: RSS x{rss / base[1]:.2f}, wall x{wall / base[2]:.2f}")


# One reply in five scores 4.5 (the paper kept 9,229 of 52,002 rows at >= 4.5: 18%).
REPLIES = [f"{score}\nThe response is {word}." for score, word in
           (("4.5", "accurate"), ("4", "mostly accurate"), ("3.5", "partly accurate"), ("3", "vague"), ("4", "fine"))]


def rate_and_filter(sizes: list[int], work: str, latency: float, concurrency: int, turns: int = 0) -> None:
    from fake_openai_server import serve

    results = []
    with serve({"latency": latency, "replies": REPLIES}) as url:
        for rows in sizes:
            data = make_input(rows, work, turns)
            run_dir = f"{work}/run-{rows}-{time.time():.0f}"
            rate = run_measured(alpagasus("rate", "--config", "configs/rate_openai_compatible.yaml",
                                          f"rate.base_url={url}", f"data.path={data}", f"run_dir={run_dir}",
                                          f"rate.concurrency={concurrency}", "rate.num_workers=2",
                                          "rate.max_retries=2"))
            filt = filter_measured(run_dir)
            results.append((rows, rate, filt))
            print(f"{rows:>9,} rows: rate RSS {rate.rss:6.0f} MB ({rate.own:.0f} MB without the object store's pages) "
                  f"wall {rate.wall:7.1f} s ({rows / rate.wall:.0f} rows/s); "
                  f"filter RSS {filt.rss:6.0f} MB wall {filt.wall:6.1f} s", flush=True)
    _, rate0, filt0 = results[0]
    for rows, rate, filt in results[1:]:
        print(f"{rows:,} over {results[0][0]:,}: rate RSS x{rate.rss / rate0.rss:.2f} (without the object store's "
              f"pages x{rate.own / rate0.own:.2f}), wall x{rate.wall / rate0.wall:.2f}; "
              f"filter RSS x{filt.rss / filt0.rss:.2f}, wall x{filt.wall / filt0.wall:.2f}")


def batch_rate(sizes: list[int], work: str) -> None:
    """The openai_batch backend against the fake Batch API with instant batches: the dry run's
    request files and cost beside the synchronous estimate, then a whole rating (write the request
    files, upload, create, poll, collect) with the collector's own rows/s."""
    from fake_batch_server import serve

    prices = ["rate.price_input_per_million=0.15", "rate.price_output_per_million=0.6"]
    results = []
    with serve({"batch_seconds": 0, "replies": REPLIES}) as url:
        for rows in sizes:
            data = make_input(rows, work)
            run_dir = f"{work}/batch-{rows}-{time.time():.0f}"
            common = ["--config", "configs/rate_openai_batch.yaml", f"rate.base_url={url}", f"data.path={data}",
                      f"run_dir={run_dir}", "rate.batch_poll_seconds=1", "rate.batch_poll_max_seconds=5", *prices]
            dry = run_measured(alpagasus("rate", "--dry-run", *common)).tail
            dry = json.loads(dry[dry.rindex("{\n"):])
            print(f"dry-run {rows:>9,} rows: {dry['request_files']} request files, "
                  f"cost at most ${dry['cost_usd_at_most']:,.2f} (synchronous ${dry['cost_usd_at_most_synchronous']:,.2f})",
                  flush=True)
            rss, own, wall, _ = run_measured(alpagasus("rate", *common))
            with open(f"{run_dir}/rated_summary.json") as f:
                summary = json.load(f)
            collected = summary["batches"]["collected_rows_per_second"]
            results.append((rows, rss, wall, own))
            print(f"{rows:>9,} rows: rate RSS {rss:6.0f} MB ({own:.0f} MB without the object store's pages) "
                  f"wall {wall:7.1f} s ({rows / wall:.0f} rows/s), "
                  f"collector {collected:,.0f} rows/s, {summary['batches']['request_files']} batches, "
                  f"by status {summary['by_status']}", flush=True)
    base = results[0]
    for rows, rss, wall, own in results[1:]:
        print(f"batch {rows:,} over {base[0]:,}: RSS x{rss / base[1]:.2f} (without the object store's pages "
              f"x{own / base[3]:.2f}), wall x{wall / base[2]:.2f}")


def filter_measured(run_dir: str) -> Measured:
    return run_measured(alpagasus("filter", "--config", "configs/filter_alpagasus_9k.yaml", f"run_dir={run_dir}",
                                  "filter.plots=false"))


def filter_only(run_dirs: list[str]) -> None:
    results = [(run_dir, filter_measured(run_dir)) for run_dir in run_dirs]
    for run_dir, (rss, _, wall, tail) in results:
        print(f"filter {run_dir}: RSS {rss:6.0f} MB wall {wall:6.1f} s; {tail.strip().splitlines()[-2]}")
    base = results[0][1]
    for run_dir, (rss, _, wall, _) in results[1:]:
        print(f"filter {run_dir} over the first: RSS x{rss / base.rss:.2f}, wall x{wall / base.wall:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["dry-run", "rate", "filter", "batch"])
    parser.add_argument("--run-dirs", nargs="+", help="filter: rate runs to filter, the smallest first")
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--latency", type=float, default=0.01)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--conversations", type=int, default=0, metavar="TURNS",
                        help="rate: conversations of this many assistant turns instead of Alpaca rows")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "alpagasus-bench-scale"))
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    if args.what == "dry-run":
        dry_run(args.sizes or [52_002, 520_020, 2_600_100], args.work)
    elif args.what == "filter":
        filter_only(args.run_dirs)
    elif args.what == "batch":
        batch_rate(args.sizes or [52_002, 520_020], args.work)
    else:
        rate_and_filter(args.sizes or [52_002, 520_020], args.work, args.latency, args.concurrency, args.conversations)


if __name__ == "__main__":
    main()
