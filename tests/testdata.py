"""Where tests find their data: one place for every test.

Small data ships under `tests/data/` (see its README for sources and licences). Scale data, such as
the whole 52k Alpaca set or the released copies of the test sets, is read from `ALPAGASUS_DATA_DIR`
(default: `../shared/data` beside the repository). A test that needs it is skipped, with the
reason, when it is absent; with `ALPAGASUS_REQUIRE_DATA=1` (set by `.ci/run`) it fails instead, so CI
never passes by skipping them.
"""

from __future__ import annotations

import json
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = os.path.join(HERE, "data")
ALPACA_2K = os.path.join(SMALL, "alpaca_2k.json")  # the first 2,000 rows of the Alpaca set
DOLLY_400 = os.path.join(SMALL, "dolly_400.json")  # the first 400 rows of the paper's Dolly selection


def data_dir() -> str:
    return os.environ.get("ALPAGASUS_DATA_DIR") or os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data"))


def scale_data(relative: str) -> str:
    """The path of a scale data file under the data directory, or a skip (a failure in CI) naming it."""
    path = os.path.join(data_dir(), relative)
    if not os.path.exists(path):
        reason = (f"scale data missing: {relative} is not under {data_dir()} "
                  "(set ALPAGASUS_DATA_DIR to a directory holding it)")
        if os.environ.get("ALPAGASUS_REQUIRE_DATA") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def alpaca_rows(n: int | None = None) -> list[dict]:
    """The first n Alpaca rows: from the shipped slice up to 2,000, else from the whole set (scale data)."""
    path = ALPACA_2K if n is not None and n <= 2000 else scale_data("alpaca_52k_reconstructed.json")
    with open(path) as f:
        rows = json.load(f)
    return rows[:n] if n else rows


def dolly_rows(n: int = 400) -> list[dict]:
    """The first n (at most 400) rows of the paper's Dolly selection."""
    assert n <= 400, "only 400 Dolly rows ship with the tests"
    with open(DOLLY_400) as f:
        return json.load(f)[:n]
