"""The embedded demo: the whole method end to end on one CPU, with no GPU, key or network.

    alpagasus demo [--run-dir runs/demo]

Runs `alpagasus run` with `demo.yaml`: rates the Alpaca sample shipped in the package (300 rows)
with the vllm backend on CPU and a tiny Llama built locally on first use, selects the rows scoring
>= 4.5, fine-tunes the tiny model on them, has the fine-tuned and the untouched model answer the
first prompts of the four test sets, judges the pairs, and writes the report. That model is a
smoke-scale stand-in: its scores carry no meaning; the demo shows the machinery and every
artifact. A rerun skips the finished stages. Point the same pipeline at a real grader and base
model with `alpagasus run --config configs/paper_alpagasus_9k.yaml`.
"""

from __future__ import annotations

import os

from alpagasus_ray.config import load_config

DEMO_CONFIG = os.path.join(os.path.dirname(__file__), "demo.yaml")
# `alpagasus demo --chat`: the same on the conversation sample (150 conversations, 715 turns).
CHAT_DEMO_CONFIG = os.path.join(os.path.dirname(__file__), "demo_chat.yaml")


def run_demo(run_dir: str, overrides: list[str] = (), chat: bool = False) -> str:
    """Run the demo (`chat`: the conversation demo) into `run_dir`; returns the path of the report it wrote last."""
    from alpagasus_ray.pipeline import run_pipeline
    from alpagasus_ray.store.layout import RunDir

    config = load_config(CHAT_DEMO_CONFIG if chat else DEMO_CONFIG, [f"run_dir={run_dir}", *overrides])
    results = run_pipeline(config)
    for stage, record in results.items():
        state = "skipped (unchanged)" if record["skipped"] else f"done in {record['seconds']:.0f} s"
        print(f"{stage:>8}: {state}")
    print("The models here are a tiny locally built stand-in: the scores carry no meaning.")
    return RunDir(config.run_dir).report_md
