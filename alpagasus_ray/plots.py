"""PNG pictures, with plain matplotlib: of a selection (what a person looks at to choose tau) and
of an evaluation (win/tie/lose as in the paper's Fig. 6, per category, against training size)."""

from __future__ import annotations

import bisect
import itertools
import os
from collections import Counter

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import StrMethodFormatter  # noqa: E402

_THOUSANDS = StrMethodFormatter("{x:,.0f}")


def score_histogram(counts: Counter, tau: float | None, path: str, title: str) -> None:
    """Rows per score (the paper's Fig. 5; `counts`: rows per score value), with the chosen
    threshold marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    values = sorted(counts)
    if all(v * 2 == round(v * 2) for v in values):  # the grader's 0.5 steps: one bar per value
        bars = ax.bar([f"{v:g}" for v in values], [counts[v] for v in values], color="#4C72B0")
        ax.bar_label(bars, fmt="{:,.0f}", fontsize=8)
        if tau is not None:
            ax.axvline(sum(v < tau for v in values) - 0.5, color="#C44E52", linestyle="--", label=f"tau = {tau:g}")
    else:
        ax.hist(values, weights=[counts[v] for v in values], bins=50, range=(0, 5), color="#4C72B0")
        if tau is not None:
            ax.axvline(tau, color="#C44E52", linestyle="--", label=f"tau = {tau:g}")
    ax.set_xlabel("score")
    ax.set_ylabel("rows")
    ax.yaxis.set_major_formatter(_THOUSANDS)
    ax.set_title(title)
    if tau is not None:
        ax.legend()
    _save(fig, path)


def tau_curve(counts: Counter, tau: float | None, kept: int, path: str, title: str) -> None:
    """Rows kept by `score >= tau` for every tau (`counts`: rows per score value), with the chosen
    point marked (`kept` rows at `tau`)."""
    # rows >= tau is constant on each interval (previous score value, next score value].
    values = sorted(counts)
    at_or_above = list(itertools.accumulate(counts[v] for v in reversed(values)))[::-1]
    taus = [0.0, *values] + ([5.0] if values[-1] < 5.0 else [])
    first = [bisect.bisect_left(values, t) for t in taus]  # the first value >= each tau
    rows = [at_or_above[j] if j < len(values) else 0 for j in first]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.step(taus, rows, where="pre", color="#4C72B0")
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


WIN_TIE_LOSE_COLORS = {"win": "#55A868", "tie": "#CCCCCC", "lose": "#C44E52"}


def win_tie_lose(results: dict[str, dict], path: str, title: str) -> None:
    """One stacked bar per test set: the candidate's wins, ties and losses (the paper's Fig. 6)."""
    names = list(results)
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(names) + 1.6))
    left = [0] * len(names)
    for outcome, color in WIN_TIE_LOSE_COLORS.items():
        counts = [results[n][outcome] for n in names]
        bars = ax.barh([f"{n} (N={results[n]['n']})" for n in names], counts, left=left, color=color, label=outcome)
        ax.bar_label(bars, labels=[str(c) if c else "" for c in counts], label_type="center", fontsize=9)
        left = [a + b for a, b in zip(left, counts)]
    for i, n in enumerate(names):
        ax.annotate(f"{results[n]['winning_score']:.3f}", (left[i], i), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("prompts (winning score at the right)")
    ax.set_xlim(0, max(left + [1]) * 1.15)
    ax.set_title(title)
    ax.legend(loc="lower right", ncol=3, fontsize=8)
    _save(fig, path)


def category_scores(per_set: dict[str, dict[str, dict]], path: str, title: str) -> None:
    """Winning score per category (Vicuna categories, WizardLM skills), one panel per test set."""
    sets = list(per_set)
    heights = [len(per_set[s]) for s in sets]
    fig, axes = plt.subplots(len(sets), 1, figsize=(8, 0.28 * sum(heights) + 1.2 * len(sets)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, name in zip(axes[:, 0], sets):
        cats = sorted(per_set[name], key=lambda c: per_set[name][c]["winning_score"])
        scores = [per_set[name][c]["winning_score"] for c in cats]
        colors = ["#55A868" if s > 1 else "#C44E52" if s < 1 else "#999999" for s in scores]
        bars = ax.barh([f"{c} ({per_set[name][c]['n']})" for c in cats], scores, color=colors)
        ax.bar_label(bars, labels=[f"{s:.2f}" for s in scores], fontsize=7, padding=2)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlim(0, 2.15)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(name, fontsize=10)
    axes[-1, 0].set_xlabel("winning score (1.0 = parity)")
    fig.suptitle(title)
    _save(fig, path)


def score_vs_size(points: dict[str, list[tuple[int, float]]], path: str, title: str) -> None:
    """Winning score against training size, one line per test set (the paper's Fig. 2)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in points.items():
        values = sorted(values)
        ax.plot([v[0] for v in values], [v[1] for v in values], marker="o", label=name)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xlabel("training rows")
    ax.set_ylabel("winning score")
    ax.xaxis.set_major_formatter(_THOUSANDS)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _save(fig, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
