"""Selection over all 52,002 Alpaca rows with synthetic ratings: time per mode against a baseline.

    python scripts/bench_filter.py [--keep runs/bench-filter]

The ratings follow the shape of the paper's Fig. 5 (9,229-ish rows at >= 4.5). Each mode runs the
whole `alpagasus filter` stage (read, select, categories, JSON/JSONL, selection.json, three PNGs).
The baseline, run in the same process, is the least a user could do by hand: pandas reads the
rated Parquet, keeps `score >= 4.5` and writes the JSON. Also compares the threshold selection
with the paper's released Claude-filtered subset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from rated_fixtures import alpaca_rows, synthetic_ratings, write_rated  # noqa: E402

from alpagasus_ray.config import load_config  # noqa: E402
from alpagasus_ray.stages.filter import run_filter  # noqa: E402

CLAUDE = os.path.join(HERE, "..", "..", "shared", "data", "alpagasus_release", "claude_t45.json")
MODES = {
    "threshold 4.5": ["filter.mode=threshold", f"filter.compare={CLAUDE}"],
    "top_k 9229": ["filter.mode=top_k", "filter.k=9229"],
    "random_k 9229": ["filter.mode=random_k", "filter.k=9229"],
    "subsample 3000": ["filter.mode=subsample", "filter.k=3000"],
    "balanced floor 0.18": ["filter.mode=balanced", "filter.category_floor=0.18"],
}


def baseline(run_dir: str) -> float:
    import pandas as pd

    started = time.perf_counter()
    frame = pd.read_parquet(os.path.join(run_dir, "rated"))
    kept = frame[(frame["status"] == "ok") & (frame["score"] >= 4.5)]
    kept[["instruction", "input", "output", "id", "score"]].to_json(os.path.join(run_dir, "baseline.json"), orient="records")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", help="write the run here and keep it (to look at the plots)")
    args = parser.parse_args()
    run_dir = args.keep or tempfile.mkdtemp(prefix="bench-filter-")
    rows = alpaca_rows()
    write_rated(run_dir, rows, synthetic_ratings(len(rows), seed=0))
    base = min(baseline(run_dir) for _ in range(3))
    results = {}
    for name, overrides in MODES.items():
        started = time.perf_counter()
        record = run_filter(load_config(None, [f"run_dir={run_dir}", *overrides]))
        seconds = time.perf_counter() - started
        results[name] = {"selected": record["selected"], "seconds": round(seconds, 2), "ratio_to_baseline": round(seconds / base, 1)}
        if "compare" in record:
            results[name]["overlap_with_claude_t45"] = record["compare"]["by_content"]
        coding = record["per_category"]["coding"]
        results[name]["coding_kept"] = f"{coding['kept']}/{coding['rows']}"
    print(json.dumps({"rows": len(rows), "baseline_pandas_threshold_s": round(base, 2), "modes": results}, indent=2))
    worst = max(r["seconds"] for r in results.values())
    print(f"filter over {len(rows):,} rows: {worst:.1f} s at most per mode, {worst / base:.1f}x a bare pandas threshold "
          f"({base:.2f} s) that writes no selection record, categories or plots")
    if args.keep:
        print(f"plots in {os.path.join(run_dir, 'plots')}")


if __name__ == "__main__":
    main()
