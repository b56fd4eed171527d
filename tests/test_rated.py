"""The rated parts of a run: which rows a pass asks again, and the clean-up after a killed re-ask."""

import pyarrow as pa

from alpagasus_ray.store.rated import RATED_SCHEMA, RatedStore


def _rows(*rows):
    """Rated rows from (id, status, attempts) triples."""
    full = [{"id": i, "instruction": f"row {i}", "input": "", "output": "x", "score": 4.0 if s == "ok" else None,
             "status": s, "attempts": a, "grader": "openai:fake", "dimension": "accuracy", "prompt_version": "v",
             "tokens_in": 0, "tokens_out": 0, "source": f"f:{i}"} for i, s, a in rows]
    return pa.Table.from_pylist(full, schema=RATED_SCHEMA)


def test_a_killed_re_ask_is_cleaned_up_and_only_open_failures_are_asked_again(tmp_path):
    store = RatedStore(str(tmp_path))
    # The first pass: two request failures, two unreadable first replies, one rating.
    store.write(_rows(("a", "request_failed", 1), ("b", "request_failed", 1), ("c", "parse_failed", 1),
                      ("d", "parse_failed", 1), ("e", "ok", 1)))
    # A retry and a re-ask that wrote their rows, then were killed before removing the old ones.
    store.write(_rows(("a", "ok", 1), ("c", "parse_failed", 2)))
    assert store.ids_to_ask_again(retry_failed=True, reask=False) == ["b"]
    assert store.ids_to_ask_again(retry_failed=False, reask=True) == ["d"]
    rows = {(r["id"], r["status"], r["attempts"]) for r in store.read().to_pylist()}
    assert sum(b.num_rows for b in store.batches(["id"])) == 5  # one row per id again
    assert rows == {("a", "ok", 1), ("b", "request_failed", 1), ("c", "parse_failed", 2),
                    ("d", "parse_failed", 1), ("e", "ok", 1)}
    assert store.ids_to_ask_again(retry_failed=False, reask=False) == []
