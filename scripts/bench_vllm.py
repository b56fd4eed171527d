"""P2: rows/s of the vllm rating backend (Ray Data LLM) against a bare `vllm.LLM.chat`, on CPU.

    python scripts/bench_vllm.py [--rows 8192] [--small 64] [--hidden 128 --layers 2]

Both rate the same rating prompts (the first `--rows` Alpaca rows) with the same model and
sampling (greedy, scores constrained to 0..5, top-5 logprobs), engine start excluded on both
sides:
- bare vLLM, in a process of its own (so that its engine is gone before the backend's starts),
  is timed on all the rows after a warm-up;
- the backend (the whole `rate` stage) is timed as the difference between a run on `--rows` rows
  and one on `--small` rows, each starting its engine: the processing of the extra rows alone.

What scatters is the engine's start, which both runs pay and the difference cancels only on
average: a few seconds against the processing of `--rows` rows, so use many rows (8,192 rows are
about 80 s of processing here; 2,048 rows scattered from 0.80 to 1.08). The parts the stage writes
cannot time it batch by batch: the engine works on several batches at once and its output blocks
reach the writers in bursts.

The script reads only what the `rate` stage has always had (`run_rate` and its summary), so the
same file runs against older code with `PYTHONPATH=<old checkout>`. Prints the ratio backend / bare.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "alpaca_52k_reconstructed.json")


def backend_seconds(model: str, rows: int, max_model_len: int, batch_size: int) -> tuple[float, int]:
    """Wall time of `run_rate` with the vllm backend on the first `rows` rows (engine start
    included), and the rows rated ok."""
    from alpagasus_ray.config import load_config

    try:  # the layout before the LLM layer's rework, first: an editable install may add the new one
        from alpagasus_ray.rate import run_rate
    except ImportError:
        from alpagasus_ray.stages.rate import run_rate

    with tempfile.TemporaryDirectory() as run_dir:
        config = load_config(None, [
            f"run_dir={run_dir}", f"data.path={DATA}", f"data.limit={rows}", "rate.backend=vllm",
            f"rate.model={model}", "rate.use_gpu=false", f"rate.max_model_len={max_model_len}",
            f"rate.batch_size={batch_size}",
        ])
        started = time.perf_counter()
        summary = run_rate(config)
        return time.perf_counter() - started, summary["by_status"]["ok"]


def bare_rows_per_s(model: str, rows: int, max_model_len: int) -> float:
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    try:  # the layout before the LLM layer's rework, first
        from alpagasus_ray.prompts import SCORE_CHOICES, rating_messages
    except ImportError:
        from alpagasus_ray.rules.prompts import SCORE_CHOICES, rating_messages

    with open(DATA) as f:
        data = json.load(f)[:rows]
    try:  # the prompts the backend sends: fenced by default since `rate.fence` came
        conversations = [rating_messages(r["instruction"], r["input"], r["output"], fence=True) for r in data]
    except TypeError:
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
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--small", type=int, default=64, help="rows of the run that measures engine start")
    parser.add_argument("--hidden", type=int, default=128, help="model width (128: the 0.4M-parameter test model)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--bare-only", action="store_true", help=argparse.SUPPRESS)  # the bare side's own process
    args = parser.parse_args()

    from alpagasus_ray.tiny_model import build_tiny_model

    model = build_tiny_model(os.path.join(tempfile.gettempdir(), f"bench-llama-{args.hidden}x{args.layers}"),
                             hidden_size=args.hidden, num_layers=args.layers)
    if args.bare_only:
        print(json.dumps({"bare": bare_rows_per_s(model, args.rows, args.max_model_len)}))
        return
    done = subprocess.run([sys.executable, __file__, "--bare-only", *sys.argv[1:]], capture_output=True, text=True,
                          check=True)
    bare = next(json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"bare"'))["bare"]

    import ray

    from alpagasus_ray.ray_runtime import ensure_ray

    ensure_ray()
    small, _ = backend_seconds(model, args.small, args.max_model_len, args.batch_size)
    large, ok = backend_seconds(model, args.rows, args.max_model_len, args.batch_size)
    ours = (args.rows - args.small) / (large - small)
    ray.shutdown()
    result = {"rows": args.rows, "ok": ok, "model": f"llama hidden={args.hidden} layers={args.layers}",
              "backend_rows_per_s": round(ours, 1), "bare_vllm_rows_per_s": round(bare, 1),
              "ratio": round(ours / bare, 3), "backend_wall_s": [round(small, 1), round(large, 1)],
              "end_to_end_ratio": round(args.rows / large / bare, 3)}
    print(json.dumps(result, indent=2))
    print(f"P2: vllm backend {ours:.1f} rows/s vs bare vLLM {bare:.1f} rows/s = {ours / bare:.3f}")


if __name__ == "__main__":
    main()
