"""The embedded demo: rating and selection end to end on one CPU, with no GPU, key or network.

    alpagasus demo [--run-dir runs/demo]

Rates the Alpaca sample shipped in the package (300 rows) with the vllm backend on CPU and a tiny
Llama built locally on first use, then selects the rows scoring >= 4.5 with their plots. That model is a smoke-scale stand-in: its scores carry no meaning;
the demo shows the machinery and every artifact. Point the same stage at a real grader with
`alpagasus rate --config configs/rate_openai.yaml` (API) or `configs/rate_vllm.yaml` (GPUs).
"""

from __future__ import annotations

import os

from alpagasus_ray.config import load_config

DEMO_CONFIG = os.path.join(os.path.dirname(__file__), "demo.yaml")


def run_demo(run_dir: str, overrides: list[str] = ()) -> str:
    """Run the demo into `run_dir`; returns the path of the selection record it wrote last."""
    from alpagasus_ray.filter import SELECTION_FILE, run_filter
    from alpagasus_ray.rate import run_rate

    # vLLM's CPU engine reserves this much KV cache (GiB); the tiny model needs little. Set before
    # Ray starts: its workers inherit the environment.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    config = load_config(DEMO_CONFIG, [f"run_dir={run_dir}", *overrides])
    summary = run_rate(config)
    print(f"rated {summary['rows_out']} rows: {summary['by_status']} "
          "(grader: a tiny locally built stand-in model; its scores carry no meaning)")
    record = run_filter(config)
    print(f"selected {record['selected']} rows (threshold {config.filter.threshold:g}); "
          f"plots in {os.path.join(config.run_dir, 'plots')}")
    return os.path.join(config.run_dir, SELECTION_FILE)
