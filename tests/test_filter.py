"""The filter stage: every mode from the CLI and from config, the outputs, the pictures, bad input."""

import glob
import json
import os

import matplotlib.image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alpagasus_ray import columns as C
from alpagasus_ray.cli import main
from alpagasus_ray.config import CODING_KEYWORDS, load_config
from alpagasus_ray.stages import filter as filter_module
from alpagasus_ray.store import parts as parts_module
from alpagasus_ray.stages.filter import FilterError, run_filter

from rated_fixtures import synthetic_ratings, write_rated
from testdata import DOLLY_400, alpaca_rows

N = 600


@pytest.fixture(scope="module")
def rated_dir(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("rated"))
    rows = alpaca_rows(N)
    ratings = synthetic_ratings(N, seed=3, failed_fraction=0.05)
    ids = write_rated(run_dir, rows, ratings)
    return run_dir, dict(zip(ids, ratings))


def _run(rated, tmp_path, *overrides):
    """Run `alpagasus filter` from the CLI on a copy of the rated rows; returns selection.json and selected.json."""
    out = tmp_path / "run"
    out.mkdir(parents=True)
    os.symlink(os.path.join(rated[0], "rated"), out / "rated")
    code = main(["filter", "--config", "configs/filter_alpagasus_9k.yaml", f"run_dir={out}", *overrides])
    assert code == 0
    return json.load(open(out / "selection.json")), json.load(open(out / "selected.json")), out


def test_threshold_keeps_exactly_the_ok_rows_at_or_above_tau_and_the_counts_add_up(rated_dir, tmp_path):
    record, selected, out = _run(rated_dir, tmp_path, "filter.threshold=4.5")
    truth = rated_dir[1]
    expected_ids = {i for i, (st, s, _) in truth.items() if st == C.OK and s >= 4.5}
    assert {r["id"] for r in selected} == expected_ids and record["selected"] == len(expected_ids)
    assert all(set(r) == {"instruction", "input", "output", "id", "score"} and r["score"] >= 4.5 for r in selected)
    assert [json.loads(line) for line in open(out / "selected.jsonl")] == selected
    assert sum(record["by_status"].values()) == record["rows_rated"] == N
    assert record["pool"] + record["not_selectable"] == N
    assert record["pool"] == record["by_status"]["ok"] and record["not_selectable"] > 0
    per = record["per_category"]
    assert sum(c["rows"] for c in per.values()) == N and sum(c["kept"] for c in per.values()) == record["selected"]
    assert record["kept_fraction_of_pool"] == round(len(expected_ids) / record["pool"], 4)


def test_rated_from_selects_from_another_runs_ratings_and_rates_nothing(rated_dir, tmp_path, capsys):
    """filter.rated_from: a control selection of the same rated data, in a run directory of its own."""
    control = tmp_path / "control"
    code = main(["filter", "--config", "configs/filter_random_9k.yaml", f"run_dir={control}",
                 f"filter.rated_from={rated_dir[0]}", "filter.k=50"])
    assert code == 0 and not (control / "rated").exists()
    record, selected = json.load(open(control / "selection.json")), json.load(open(control / "selected.json"))
    truth = rated_dir[1]
    assert record["selected"] == len(selected) == 50 and record["rows_rated"] == N
    assert {r["id"] for r in selected} <= {i for i, (st, _, _) in truth.items() if st == C.OK}
    # Nothing there to select from: the error names the other run, not this one.
    empty = tmp_path / "empty"
    capsys.readouterr()
    code = main(["filter", "--config", "configs/filter_random_9k.yaml", f"run_dir={control}", f"filter.rated_from={empty}"])
    assert code == 2 and str(empty) in capsys.readouterr().err


def test_score_expected_selects_on_the_finer_score(rated_dir, tmp_path):
    record, selected, _ = _run(rated_dir, tmp_path, "filter.score=score_expected", "filter.threshold=4.3")
    truth = rated_dir[1]
    assert {r["id"] for r in selected} == {i for i, (st, _, e) in truth.items() if st == C.OK and e >= 4.3}
    assert all(r["score"] == truth[r["id"]][2] for r in selected)


def test_top_k_takes_the_best_with_deterministic_ties(rated_dir, tmp_path):
    record, selected, _ = _run(rated_dir, tmp_path, "filter.mode=top_k", "filter.k=50")
    truth = rated_dir[1]
    ok = sorted(((-s, -e, i) for i, (st, s, e) in truth.items() if st == C.OK))
    assert [r["id"] for r in sorted(selected, key=lambda r: (-r["score"], -truth[r["id"]][2], r["id"]))] == [i for *_, i in ok[:50]]
    assert record["k"] == 50


def test_random_k_is_reproducible_and_k_from_matches_another_selection(rated_dir, tmp_path):
    base, _, base_dir = _run(rated_dir, tmp_path / "a", "filter.threshold=4.5")
    one = _run(rated_dir, tmp_path / "b", "filter.mode=random_k", f"filter.k_from={base_dir / 'selection.json'}")
    two = _run(rated_dir, tmp_path / "c", "filter.mode=random_k", f"filter.k_from={base_dir / 'selected.json'}")
    other = _run(rated_dir, tmp_path / "d", "filter.mode=random_k", "filter.k=40", "filter.seed=1")
    assert one[0]["selected"] == base["selected"] == len(one[1])
    assert [r["id"] for r in one[1]] == [r["id"] for r in two[1]]
    assert {r["id"] for r in other[1]} != {r["id"] for r in one[1]}
    truth = rated_dir[1]
    assert all(truth[r["id"]][0] == C.OK for r in one[1])  # non-ok rows are never drawn


def test_subsample_draws_k_from_the_threshold_selection(rated_dir, tmp_path):
    record, selected, _ = _run(rated_dir, tmp_path, "filter.mode=subsample", "filter.k=30", "filter.threshold=4.5")
    assert len(selected) == 30 and all(r["score"] >= 4.5 for r in selected)
    assert record["params"]["seed"] == 0 and record["seed"] == 0


def test_an_id_rated_twice_counts_once_by_its_better_row_and_top_k_cuts_as_it_streams(tmp_path, monkeypatch):
    # A re-ask killed after writing its rows and before removing the ones they replace: the failed
    # rows of 60 ids have a second row, ok with 5.0 or parse_failed again.
    rows = alpaca_rows(400)
    ratings = synthetic_ratings(len(rows), seed=4, failed_fraction=0.3)
    ids = write_rated(str(tmp_path), rows, ratings)
    failed = [i for i, (status, _, _) in enumerate(ratings) if status != C.OK][:60]
    again = [(C.OK, 5.0, 5.0) if j % 2 else (C.PARSE_FAILED, None, None) for j in range(len(failed))]
    write_rated(str(tmp_path), [rows[i] for i in failed], again)
    truth = dict(zip(ids, ratings))
    for i, rating in zip(failed, again):
        if rating[0] == C.OK or ratings[i][0] == C.REQUEST_FAILED:
            truth[ids[i]] = rating
    # Candidates of top_k are cut to the best k whenever more than max(2k, 40) pile up.
    monkeypatch.setattr(filter_module, "SCAN_BATCH_ROWS", 40)
    monkeypatch.setattr(parts_module, "SCAN_BATCH_ROWS", 50)  # batches of 50 rows
    monkeypatch.setattr(parts_module, "COALESCE_ROWS", 50)
    monkeypatch.setattr(filter_module, "RANGE_ROWS", 7)  # the selected rows' text gathered 7 rows at a time

    record = run_filter(load_config(None, [f"run_dir={tmp_path}", "filter.threshold=4.5"]))
    assert record["rows_rated"] == len(rows)
    statuses = [status for status, _, _ in truth.values()]
    assert record["by_status"] == {s: statuses.count(s) for s in C.STATUSES}
    selected = json.load(open(tmp_path / "selected.json"))
    assert [r["id"] for r in selected] == sorted(i for i, (st, s, _) in truth.items() if st == C.OK and s >= 4.5)
    assert sum(r["id"] in {ids[i] for i in failed} for r in selected) == 30  # the re-asked rows that came back ok
    text = {i: (r["instruction"], r.get("input", ""), r["output"]) for i, r in zip(ids, rows)}
    assert all((r["instruction"], r["input"], r["output"]) == text[r["id"]] for r in selected)

    top = run_filter(load_config(None, [f"run_dir={tmp_path}", "filter.mode=top_k", "filter.k=15"]))
    best = sorted((-s, -e, i) for i, (st, s, e) in truth.items() if st == C.OK)[:15]
    assert top["selected"] == 15
    assert [r["id"] for r in json.load(open(tmp_path / "selected.json"))] == sorted(i for *_, i in best)


def test_two_ok_rows_of_one_id_stop_the_filter(tmp_path):
    rows = alpaca_rows(20)
    write_rated(str(tmp_path), rows, [(C.OK, 4.5, 4.5)] * 20)
    write_rated(str(tmp_path), rows[:1], [(C.OK, 5.0, 5.0)])  # not something a rating writes
    with pytest.raises(FilterError, match="has two rows rated ok"):
        run_filter(load_config(None, [f"run_dir={tmp_path}"]))
    assert not (tmp_path / "selected.json").exists()


def test_category_floor_keeps_a_category_a_plain_threshold_drops(tmp_path):
    rows = alpaca_rows(2000)
    coding = {i for i, r in enumerate(rows)
              if any(k in r["instruction"] + r["input"] + r["output"] for k in CODING_KEYWORDS)}
    assert len(coding) >= 10
    ratings = [(C.OK, 3.0, 3.0) if i in coding else (C.OK, 4.5, 4.5) for i in range(len(rows))]
    write_rated(str(tmp_path), rows, ratings)
    plain = run_filter(load_config(None, [f"run_dir={tmp_path}", "filter.mode=threshold"]))
    assert plain["per_category"]["coding"]["kept"] == 0  # a plain threshold filters coding away
    floor = run_filter(load_config(None, [f"run_dir={tmp_path}", "filter.mode=balanced", "filter.category_floor=0.25"]))
    coding_rows = floor["per_category"]["coding"]["rows"]
    assert floor["per_category"]["coding"]["kept"] == -(-coding_rows // 4)  # ceil(25%)
    assert floor["selected"] == plain["selected"] + floor["per_category"]["coding"]["kept"]
    quota = run_filter(load_config(None, [f"run_dir={tmp_path}", "filter.mode=balanced", "filter.category_quota={coding: 7}"]))
    assert quota["per_category"]["coding"]["kept"] == 7


def test_categories_from_a_data_field_dolly(tmp_path):
    rows = json.load(open(DOLLY_400))
    ratings = [(C.OK, 4.5 if r["category"] != "creative_writing" else 2.0, None) for r in rows]
    write_rated(str(tmp_path), rows, ratings)
    overrides = [f"run_dir={tmp_path}", f"data.path={DOLLY_400}", "filter.category_field=category",
                 "filter.mode=balanced", "filter.category_floor=0.5"]
    record = run_filter(load_config(None, overrides))
    assert record["category_source"] == "field:category"
    creative = record["per_category"]["creative_writing"]
    assert creative["rows"] == sum(r["category"] == "creative_writing" for r in rows) > 0
    assert creative["kept"] == -(-creative["rows"] // 2)
    assert record["per_category"]["open_qa"]["filter_ratio"] == 0.0


def test_compare_reports_overlap_by_content_and_by_id(rated_dir, tmp_path):
    _, selected, _ = _run(rated_dir, tmp_path / "a", "filter.threshold=4.5")
    other_rows = [{k: r[k] for k in ("instruction", "input", "output")} for r in selected[:20]]
    other_rows += [{"instruction": "not in this data", "input": "", "output": "x"}] * 1
    other = tmp_path / "other.json"
    other.write_text(json.dumps(other_rows))
    record, _, _ = _run(rated_dir, tmp_path / "b", "filter.threshold=4.5", f"--compare={other}")
    by_content = record["compare"]["by_content"]
    assert by_content == {"both": 20, "only_this": len(selected) - 20, "only_other": 1,
                          "jaccard": round(20 / (len(selected) + 1), 4)}
    assert record["compare"]["by_id"] is None  # the other file has no ids


def test_pictures_exist_and_show_something(rated_dir, tmp_path):
    _, _, out = _run(rated_dir, tmp_path, "filter.threshold=4.5")
    for name in ("score_histogram.png", "tau_curve.png", "category_kept.png"):
        path = out / "plots" / name
        image = matplotlib.image.imread(str(path))
        assert path.stat().st_size > 10_000 and image.shape[0] > 200 and image.shape[1] > 400
        assert image[..., :3].std() > 0.05  # not a blank canvas


@pytest.mark.parametrize("overrides,message", [
    (["filter.threshold=7"], "outside the grader's scale 0-5"),
    (["filter.mode=top_k", "filter.k=100000"], "filter.k=100,000 is more than the ok rows"),
    (["filter.mode=top_k"], "needs filter.k"),
    (["filter.mode=balanced"], "needs filter.category_floor"),
    (["filter.threshold=5", "filter.mode=subsample", "filter.k=10000"], "is more than the rows scoring >= 5"),
])
def test_bad_selections_fail_clearly_and_write_nothing(rated_dir, tmp_path, overrides, message):
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(os.path.join(rated_dir[0], "rated"), out / "rated")
    with pytest.raises(FilterError, match=message):
        run_filter(load_config(None, [f"run_dir={out}", *overrides]))
    assert sorted(os.listdir(out)) == ["rated"]


def test_bad_rated_data_fails_clearly(tmp_path):
    with pytest.raises(FilterError, match="no rated rows; run `alpagasus rate` first"):
        run_filter(load_config(None, [f"run_dir={tmp_path}"]))
    (tmp_path / "rated").mkdir()
    pq.write_table(pa.table({"id": ["a"], "instruction": ["i"], "status": ["ok"]}), tmp_path / "rated" / "part-x.parquet")
    with pytest.raises(FilterError, match="lack column\\(s\\) input, output, score"):
        run_filter(load_config(None, [f"run_dir={tmp_path}"]))
    empty = tmp_path / "empty"
    write_rated(str(empty), alpaca_rows(5), [(C.REQUEST_FAILED, None, None)] * 5)
    with pytest.raises(FilterError, match="nothing to select from"):
        run_filter(load_config(None, [f"run_dir={empty}"]))
    assert not (empty / "selected.json").exists()


FILTER_CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "filter_*.yaml")))


@pytest.fixture(scope="module")
def rated_52k(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("rated52k"))
    rows = alpaca_rows()
    write_rated(run_dir, rows, synthetic_ratings(len(rows), seed=0))
    return run_dir


@pytest.mark.parametrize("path", FILTER_CONFIGS, ids=os.path.basename)
def test_every_shipped_filter_config_runs_as_written(path, request, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    overrides = [f"run_dir={out}"]
    if "dolly" in path:  # its data.path names the full Dolly file, which is not here: use the shipped slice
        rows = json.load(open(DOLLY_400))
        write_rated(str(out), rows, synthetic_ratings(len(rows), seed=1))
        overrides.append(f"data.path={DOLLY_400}")
    else:  # the whole Alpaca set, rated: the configs select thousands of rows
        os.symlink(os.path.join(request.getfixturevalue("rated_52k"), "rated"), out / "rated")
    assert main(["filter", "--config", path, *overrides]) == 0
    record = json.load(open(out / "selection.json"))
    config = load_config(path)
    assert record["mode"] == config.filter.mode and record["selected"] == len(json.load(open(out / "selected.json")))
    if config.filter.k:
        assert record["selected"] == config.filter.k
