"""PNG pictures of a selection, with plain matplotlib: what a person looks at to choose tau."""

from __future__ import annotations

import bisect
import os
from collections import Counter
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import StrMethodFormatter  # noqa: E402

_THOUSANDS = StrMethodFormatter("{x:,.0f}")


def score_histogram(scores: Sequence[float], tau: float | None, path: str, title: str) -> None:
    """Rows per score (the paper's Fig. 5), with the chosen threshold marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    if all(s * 2 == round(s * 2) for s in scores):  # the grader's 0.5 steps: one bar per value
        counts = Counter(scores)
        values = sorted(counts)
        bars = ax.bar([f"{v:g}" for v in values], [counts[v] for v in values], color="#4C72B0")
        ax.bar_label(bars, fmt="{:,.0f}", fontsize=8)
        if tau is not None:
            ax.axvline(sum(v < tau for v in values) - 0.5, color="#C44E52", linestyle="--", label=f"tau = {tau:g}")
    else:
        ax.hist(scores, bins=50, range=(0, 5), color="#4C72B0")
        if tau is not None:
            ax.axvline(tau, color="#C44E52", linestyle="--", label=f"tau = {tau:g}")
    ax.set_xlabel("score")
    ax.set_ylabel("rows")
    ax.yaxis.set_major_formatter(_THOUSANDS)
    ax.set_title(title)
    if tau is not None:
        ax.legend()
    _save(fig, path)


def tau_curve(scores: Sequence[float], tau: float | None, kept: int, path: str, title: str) -> None:
    """Rows kept by `score >= tau` for every tau, with the chosen point marked."""
    # rows >= tau is constant on each interval (previous score value, next score value].
    ordered = sorted(scores)
    values = sorted(set(ordered))
    taus = [0.0, *values] + ([5.0] if values[-1] < 5.0 else [])
    counts = [len(ordered) - bisect.bisect_left(ordered, t) for t in taus]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.step(taus, counts, where="pre", color="#4C72B0")
    if tau is not None:
        ax.axvline(tau, color="#C44E52", linestyle="--")
        ax.plot([tau], [kept], "o", color="#C44E52")
        ax.annotate(f"tau = {tau:g}: {kept:,} rows", (tau, kept), textcoords="offset points", xytext=(-10, 10), ha="right")
    ax.set_xlabel("threshold tau")
    ax.set_ylabel("rows with score >= tau")
    ax.yaxis.set_major_formatter(_THOUSANDS)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _save(fig, path)


def category_kept(per_category: dict[str, dict], overall: float, path: str, title: str) -> None:
    """Kept fraction per category, beside the overall kept fraction."""
    names = sorted(per_category, key=lambda c: per_category[c]["kept_fraction"])
    fractions = [per_category[c]["kept_fraction"] for c in names]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.4 * len(names) + 1.5)))
    bars = ax.barh([f"{c} ({per_category[c]['rows']:,})" for c in names], fractions, color="#55A868")
    ax.bar_label(bars, labels=[f"{f:.1%}" for f in fractions], fontsize=8, padding=2)
    ax.axvline(overall, color="#C44E52", linestyle="--", label=f"all rows: {overall:.1%}")
    ax.set_xlabel("fraction of the category's rows kept")
    ax.set_xlim(0, min(1.0, max(fractions + [overall]) * 1.25 + 0.05))
    ax.set_title(title)
    ax.legend(loc="lower right")
    _save(fig, path)


def _save(fig, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
