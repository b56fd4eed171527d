"""The pilot (`alpagasus rate --pilot N`) against two real local graders that score differently:
its figures equal a computation by hand from the same ratings, and the full rating after it sends
only the rows the pilot did not rate."""

import json
import math

import pyarrow.parquet as pq
import pytest

import fake_openai_server
from alpagasus_ray.cli import main
from alpagasus_ray.config import load_config
from alpagasus_ray.stages.rate import run_rate

ROWS, SAMPLE = 200, 60
Z95 = 1.959963984540054
A_REPLIES = ["5\nRight.", "4.5\nMostly right.", "4\nGood enough.", "3\nHalf right.", "2\nWrong."]
B_REPLIES = ["4.5\nFine.", "3.5\nSo-so.", "5\nPerfect.", "1\nNo.", "4\nGood.", "2.5\nWeak."]


def _rows(path):
    rows = [{"id": f"r{i:03d}", "instruction": f"ROW-{i:03d} Name a colour.", "input": "", "output": f"Colour {i}."}
            for i in range(ROWS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pilot_rows(run, name):
    rated = pq.read_table(run / "pilot" / name / "rated").to_pylist()
    return {r["id"]: r for r in rated}


def _wilson(k, n):
    p = k / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return centre - half, centre + half


def _ranks(values):
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # ties share their average rank
        i = j + 1
    return ranks


def _pearson(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def _quadratic_kappa(x, y):
    a, b = [round(v * 2) for v in x], [round(v * 2) for v in y]
    n, k = len(a), 11
    observed = [[0] * k for _ in range(k)]
    for i, j in zip(a, b):
        observed[i][j] += 1
    row, col = [sum(r) for r in observed], [sum(observed[i][j] for i in range(k)) for j in range(k)]
    weight = [[(i - j) ** 2 / (k - 1) ** 2 for j in range(k)] for i in range(k)]
    disagree = sum(weight[i][j] * observed[i][j] for i in range(k) for j in range(k))
    expected = sum(weight[i][j] * row[i] * col[j] / n for i in range(k) for j in range(k))
    return 1 - disagree / expected


def test_the_pilot_compares_two_graders_as_a_hand_count_does_and_the_full_rating_pays_only_the_rest(tmp_path, ray_local):
    data, run = _rows(tmp_path / "rows.jsonl"), tmp_path / "run"
    prices = ["price_input_per_million: 2", "price_output_per_million: 8"]
    with fake_openai_server.serve({"replies": A_REPLIES}) as url_a, fake_openai_server.serve({"replies": B_REPLIES}) as url_b:
        second = "{backend: openai, base_url: '%s', model: fake-b, concurrency: 4, %s}" % (url_b, ", ".join(prices))
        args = [f"run_dir={run}", f"data.path={data}", "rate.backend=openai", f"rate.base_url={url_a}",
                "rate.model=fake-a", "rate.concurrency=4", "rate.price_input_per_million=2",
                "rate.price_output_per_million=8", f"pilot.graders=[{second}]", "filter.plots=false"]
        assert main(["rate", "--config", "/dev/null", "--pilot", str(SAMPLE), *args]) == 0
        sent_a, sent_b = fake_openai_server.stats(url_a)["requests"], fake_openai_server.stats(url_b)["requests"]
        fake_openai_server.reset(url_a)
        summary = run_rate(load_config(None, args))
        full = fake_openai_server.stats(url_a)["requests"]
    record = json.loads((run / "pilot" / "pilot.json").read_text())
    a, b = _pilot_rows(run, "1-openai-fake-a"), _pilot_rows(run, "2-openai-fake-b")
    # The same sample for both graders: SAMPLE distinct rows of the input, each rated once by each.
    assert a.keys() == b.keys() and len(a) == SAMPLE == sent_a == sent_b == record["sample"]["rows"]
    assert a.keys() <= {f"r{i:03d}" for i in range(ROWS)} and record["sample"]["drawn_from"] == ROWS
    # Each grader's figures, by hand from its ratings.
    for figures, rows in zip(record["graders"], (a, b)):
        scores = [r["score"] for r in rows.values()]
        assert figures["ok"] == SAMPLE and figures["failure_rate"] == 0
        for tau in ("4", "4.5"):
            k = sum(s >= float(tau) for s in scores)
            kept = figures["kept"][tau]
            assert (kept["kept"], kept["of"]) == (k, SAMPLE)
            assert kept["share_95"] == pytest.approx(_wilson(k, SAMPLE), abs=1e-9)
            assert kept["projected_rows"] == round(k / SAMPLE * ROWS)
        tokens_in = sum(r["tokens_in"] for r in rows.values()) / SAMPLE
        tokens_out = sum(r["tokens_out"] for r in rows.values()) / SAMPLE
        expected = (round(tokens_in * ROWS) * 2 + round(tokens_out * ROWS) * 8) / 1e6
        assert figures["full_run"]["cost_usd_synchronous"] == pytest.approx(expected, abs=1e-6)
        assert figures["full_run"]["cost_usd_batch"] == pytest.approx(expected / 2, abs=1e-6)
    # The pair, by hand.
    ids = sorted(a)
    x, y = [a[i]["score"] for i in ids], [b[i]["score"] for i in ids]
    pair = record["pairs"][0]
    assert pair["rows"] == SAMPLE
    assert pair["spearman_rho"] == pytest.approx(_pearson(_ranks(x), _ranks(y)), abs=1e-9)
    assert pair["exact_agreement"] == pytest.approx(sum(p == q for p, q in zip(x, y)) / SAMPLE)
    assert pair["quadratic_kappa"] == pytest.approx(_quadratic_kappa(x, y), abs=1e-9)
    kept = [(p >= 4.5, q >= 4.5) for p, q in zip(x, y)]
    assert pair["kept_at_tau"] == {"both": kept.count((True, True)), "a_only": kept.count((True, False)),
                                   "b_only": kept.count((False, True)), "neither": kept.count((False, False))}
    assert "| 1-openai-fake-a | 2-openai-fake-b | 60 |" in (run / "pilot" / "pilot.md").read_text()
    # The full rating with the first grader takes the pilot's ratings as they are: only the rest is sent.
    assert full == ROWS - SAMPLE
    assert summary["rows_out"] == ROWS and summary["by_status"]["ok"] == ROWS
    rated = {r["id"]: r for r in pq.read_table(run / "rated").to_pylist()}
    assert all(rated[i]["score"] == a[i]["score"] for i in ids)
    assert rated[ids[0]]["source"] == f"{data}:{int(ids[0][1:]) + 1}"  # where the row is in the input
