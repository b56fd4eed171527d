"""Rated run directories made without a grader: real Alpaca rows with chosen or synthetic scores."""

from __future__ import annotations

import random

import pyarrow as pa

from alpagasus_ray import columns as C
from alpagasus_ray.store.inputs import content_id
from alpagasus_ray.rules.prompts import PROMPT_VERSION
from alpagasus_ray.store.rated import RATED_SCHEMA, RatedStore

# Roughly the shape of the paper's Fig. 5 for 52k rows (9,229 at >= 4.5, ~39k at >= 4.0).
PAPER_LIKE = {5.0: 300, 4.5: 8929, 4.0: 30000, 3.5: 5200, 3.0: 3900, 2.5: 1400, 2.0: 1200,
              1.5: 300, 1.0: 300, 0.5: 100, 0.0: 73}


def write_rated(run_dir: str, rows: list[dict], ratings: list[tuple[str, float | None, float | None]]) -> list[str]:
    """Write rated rows (status, score, expected score per row) as the rating stage would; returns ids."""
    ids = [r.get("id") or content_id(r["instruction"], r.get("input", ""), r["output"]) for r in rows]
    n = len(rows)
    table = pa.table({
        C.ID: ids, C.INSTRUCTION: [r["instruction"] for r in rows], C.INPUT: [r.get("input", "") for r in rows],
        C.OUTPUT: [r["output"] for r in rows],
        C.SCORE: [s if st == C.OK else None for st, s, _ in ratings],
        C.SCORE_EXPECTED: [e if st == C.OK else None for st, _, e in ratings],
        C.STATUS: [st for st, _, _ in ratings], C.REVIEW: [""] * n, C.GRADER: ["openai:synthetic"] * n,
        C.DIMENSION: ["accuracy"] * n, C.PROMPT_VERSION: [PROMPT_VERSION] * n, C.ATTEMPTS: [1] * n,
        C.ERROR: [None if st == C.OK else "synthetic" for st, _, _ in ratings], C.TOKENS_IN: [0] * n,
        C.TOKENS_OUT: [0] * n, C.SOURCE: [f"synthetic[{i}]" for i in range(n)], C.SUSPECT: [None] * n,
    }, schema=RATED_SCHEMA)
    store = RatedStore(run_dir)
    for start in range(0, n, 5000):
        store.write(table.slice(start, 5000))
    return ids


def synthetic_ratings(n: int, seed: int = 0, failed_fraction: float = 0.01) -> list[tuple[str, float | None, float | None]]:
    """n (status, score, expected) drawn from the paper-like histogram, a few rows not ok."""
    rnd = random.Random(seed)
    values, weights = zip(*PAPER_LIKE.items())
    out = []
    for _ in range(n):
        if rnd.random() < failed_fraction:
            out.append((rnd.choice([C.PARSE_FAILED, C.REQUEST_FAILED]), None, None))
            continue
        score = rnd.choices(values, weights)[0]
        out.append((C.OK, score, round(min(5.0, max(0.0, score + rnd.uniform(-0.4, 0.2))), 4)))
    return out

