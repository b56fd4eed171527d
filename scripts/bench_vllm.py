"""P2: rows/s of the vllm rating backend (Ray Data LLM) against a bare `vllm.LLM.chat`, on CPU.

    python scripts/bench_vllm.py [--rows 1024] [--hidden 128 --layers 2]

Both rate the same rating prompts (the first `--rows` Alpaca rows) with the same model and
sampling (greedy, scores constrained to 0..5, top-5 logprobs), engine start excluded on both
sides. Bare vLLM is timed after a warm-up. The backend (the whole `rate` stage) is timed once its
engine is warm, from the rated parts its workers write (one per batch of `--batch-size` rows):
the rows of every part after the first, over the time from the first part to the last. That is
the stage's steady rows/s, whatever its engine start, its driver's scans before the first row and
its summary after the last. The older figure, the difference between a run on `--rows` rows and
one on `--small` rows (each starting its engine), is printed beside it with `--small N`; it
scatters with the engine's start time.

Bare vLLM runs first, alone on the machine. Prints the ratio backend / bare. The script reads
only what the `rate` stage has always written (`<run_dir>/rated/*.parquet`), so the same file runs
against older code with `PYTHONPATH=<old checkout>`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import NamedTuple

import pyarrow.parquet as pq

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "alpaca_52k_reconstructed.json")


class Backend(NamedTuple):
    wall: float  # seconds of the whole stage, engine start included
    ok: int  # rows rated ok
    steady: float  # rows/s from the first part written to the last


def run_rate(config) -> dict:
    try:
        from alpagasus_ray.stages.rate import run_rate
    except ImportError:  # the layout before the LLM layer's rework
        from alpagasus_ray.rate import run_rate
    return run_rate(config)


def steady_rows_per_s(rated_dir: str) -> float:
    """Rows per second between the first rated part written and the last (set-aside parts left out)."""
    parts = []
    for name in os.listdir(rated_dir):
        if not name.endswith(".parquet") or name.startswith((".", "_")):
            continue
        path = os.path.join(rated_dir, name)
        statuses = set(pq.read_table(path, columns=["status"]).column("status").to_pylist())
        if statuses != {"invalid_input"}:
            parts.append((os.stat(path).st_mtime_ns, pq.ParquetFile(path).metadata.num_rows))
    parts.sort()
    if len(parts) < 3:
        raise SystemExit(f"only {len(parts)} rated parts: use more --rows or a smaller --batch-size")
    rows_after_first = sum(rows for _, rows in parts[1:])
    return rows_after_first / ((parts[-1][0] - parts[0][0]) / 1e9)


def backend_run(model: str, rows: int, max_model_len: int, batch_size: int) -> Backend:
    """`run_rate` with the vllm backend on the first `rows` rows."""
    from alpagasus_ray.config import load_config

    with tempfile.TemporaryDirectory() as run_dir:
        config = load_config(None, [
            f"run_dir={run_dir}", f"data.path={DATA}", f"data.limit={rows}", "rate.backend=vllm",
            f"rate.model={model}", "rate.use_gpu=false", f"rate.max_model_len={max_model_len}",
            f"rate.batch_size={batch_size}",
        ])
        started = time.perf_counter()
        summary = run_rate(config)
        wall = time.perf_counter() - started
        return Backend(wall, summary["by_status"]["ok"], steady_rows_per_s(os.path.join(run_dir, "rated")))


def bare_rows_per_s(model: str, rows: int, max_model_len: int) -> float:
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    try:
        from alpagasus_ray.rules.prompts import SCORE_CHOICES, rating_messages
    except ImportError:  # the layout before the LLM layer's rework
        from alpagasus_ray.prompts import SCORE_CHOICES, rating_messages

    with open(DATA) as f:
        data = json.load(f)[:rows]
    conversations = [rating_messages(r["instruction"], r["input"], r["output"]) for r in data]
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=5,
                            structured_outputs=StructuredOutputsParams(choice=list(SCORE_CHOICES)))
    llm = LLM(model=model, dtype="float32", max_model_len=max_model_len, enforce_eager=True,
              enable_prefix_caching=True, logprobs_mode="processed_logprobs")
    llm.chat(conversations[:8], params, use_tqdm=False)  # warm-up
    started = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    assert len(outputs) == rows
    return rows / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--small", type=int, default=0,
                        help="also time a run on this many rows, for the older small/large difference")
    parser.add_argument("--hidden", type=int, default=128, help="model width (128: the 0.4M-parameter test model)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    from alpagasus_ray.ray_runtime import ensure_ray
    from alpagasus_ray.tiny_model import build_tiny_model

    model = build_tiny_model(os.path.join(tempfile.gettempdir(), f"bench-llama-{args.hidden}x{args.layers}"),
                             hidden_size=args.hidden, num_layers=args.layers)
    bare = bare_rows_per_s(model, args.rows, args.max_model_len)
    import ray

    ensure_ray()
    large = backend_run(model, args.rows, args.max_model_len, args.batch_size)
    result = {"rows": args.rows, "ok": large.ok, "model": f"llama hidden={args.hidden} layers={args.layers}",
              "bare_vllm_rows_per_s": round(bare, 1), "backend_steady_rows_per_s": round(large.steady, 1),
              "ratio": round(large.steady / bare, 3), "backend_wall_s": round(large.wall, 1)}
    if args.small:
        # Each run starts its own engine; the difference between a small and a large run is the
        # processing of the extra rows alone, if the two engines started in the same time.
        small = backend_run(model, args.small, args.max_model_len, args.batch_size)
        difference = (args.rows - args.small) / (large.wall - small.wall)
        result.update(backend_difference_rows_per_s=round(difference, 1), difference_ratio=round(difference / bare, 3))
    ray.shutdown()
    print(json.dumps(result, indent=2))
    print(f"P2: vllm backend {large.steady:.1f} rows/s once warm vs bare vLLM {bare:.1f} rows/s = {large.steady / bare:.3f}")


if __name__ == "__main__":
    main()
