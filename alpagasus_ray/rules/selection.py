"""Selection rules: which rated rows to train on. Pure functions on plain lists, no I/O.

Every rule returns indices into the pool of rated rows, in ascending order, and is reproducible:
ties are broken by the logprob-weighted score, then by id; random choices take a seed.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Sequence


def rank_order(scores: Sequence[float], expected: Sequence[float | None], ids: Sequence[str]) -> list[int]:
    """Indices from best to worst: score, then expected score (missing last), then id.

    >>> rank_order([4.0, 5.0, 4.0, 4.0], [3.9, 4.8, None, 4.1], ["a", "b", "c", "d"])
    [1, 3, 0, 2]
    """
    def key(i: int):
        e = expected[i]
        return (-scores[i], e is None, -(e or 0.0), ids[i])

    return sorted(range(len(scores)), key=key)


def threshold(scores: Sequence[float], tau: float) -> list[int]:
    """Rows scoring at least tau (the paper's Eq. 1).

    >>> threshold([4.5, 4.0, 5.0, 3.5], 4.5)
    [0, 2]
    """
    return [i for i, s in enumerate(scores) if s >= tau]


def top_k(scores, expected, ids, k: int) -> list[int]:
    """The k best rows by `rank_order`.

    >>> top_k([4.0, 5.0, 4.0], [4.2, 4.9, 4.1], ["a", "b", "c"], 2)
    [0, 1]
    """
    return sorted(rank_order(scores, expected, ids)[:k])


def random_k(candidates: Sequence[int], k: int, seed: int) -> list[int]:
    """k of `candidates` drawn uniformly with `seed` (the paper's "9k-random" control, or a
    3k/6k subsample of the 9k).

    >>> random_k(range(10), 3, seed=0) == random_k(range(10), 3, seed=0)
    True
    >>> len(set(random_k(range(10), 10, seed=1)))
    10
    """
    return sorted(random.Random(seed).sample(list(candidates), k))


def with_category_floor(
    kept: Sequence[int],
    order: Sequence[int],
    categories: Sequence[str],
    floor: float = 0.0,
    quota: dict[str, int] | None = None,
) -> list[int]:
    """Add rows so that each category keeps at least `floor` of its rows (rounded up) and at
    least its `quota`; the added rows are each category's best by `order` not yet kept.

    >>> cats = ["code", "code", "text", "text"]
    >>> with_category_floor([2, 3], order=[2, 3, 0, 1], categories=cats, floor=0.5)
    [0, 2, 3]
    >>> with_category_floor([2, 3], order=[2, 3, 1, 0], categories=cats, quota={"code": 2})
    [0, 1, 2, 3]
    """
    quota = quota or {}
    size = Counter(categories)
    need = {c: min(n, max(math.ceil(floor * n), quota.get(c, 0))) for c, n in size.items()}
    chosen = set(kept)
    have = Counter(categories[i] for i in chosen)
    for i in order:
        category = categories[i]
        if i not in chosen and have[category] < need[category]:
            chosen.add(i)
            have[category] += 1
    return sorted(chosen)


def keyword_category(text: str, keywords: dict[str, list[str]], default: str = "other") -> str:
    """The first category with a keyword in `text` (the paper's App. E rule for coding rows).

    >>> keyword_category("Write a Python function.", {"coding": ["Python", "java"]})
    'coding'
    >>> keyword_category("Write a poem.", {"coding": ["Python", "java"]})
    'other'
    """
    for category, words in keywords.items():
        if any(word in text for word in words):
            return category
    return default


def overlap(these: set, others: set) -> dict:
    """Overlap of two selections as counts and Jaccard index.

    >>> overlap({1, 2, 3}, {2, 3, 4, 5})
    {'both': 2, 'only_this': 1, 'only_other': 2, 'jaccard': 0.4}
    """
    both = len(these & others)
    union = len(these | others)
    return {"both": both, "only_this": len(these - others), "only_other": len(others - these),
            "jaccard": round(both / union, 4) if union else 0.0}
