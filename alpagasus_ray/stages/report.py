"""The report: win/tie/lose and winning score of every judged pair, per test set and category.

    alpagasus report --config configs/paper_alpagasus_9k.yaml

Reads `<run_dir>/judgments/*/` and writes `<run_dir>/report.json`, shaped
{"<candidate>_vs_<baseline>": {"<test_set>": {"win", "tie", "lose", "parse_failed", "failed", "n",
"winning_score", "capacity", "categories"}}} with "all" for the test sets together;
`<run_dir>/report.md` (the same as tables, and every artifact of the run) and `<run_dir>/plots/`.
With `report.runs` (e.g. the 3k/6k/9k runs, each judged against the 52k model) it also plots the
winning score against training size, as the paper's Fig. 2.

A prompt counts once (a multi-turn prompt once per turn, with "turns" giving each turn's counts):
its two judgments combine by the rule of Sec. 3.3 (`judging.combine`). A prompt whose judgment
could not be read is `parse_failed`, one whose judgment or answer failed is `failed`; neither is
part of N.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter, defaultdict

import pyarrow.fs as pafs

from alpagasus_ray import columns as C
from alpagasus_ray.config import Config
from alpagasus_ray.errors import InputError
from alpagasus_ray.rules.judging import LOSE, TIE, WIN, capacity, combine, winning_score
from alpagasus_ray.stages.judge import BASELINE_FIRST, CANDIDATE_FIRST
from alpagasus_ray.store.layout import (
    GENERATION_FILE, JUDGE_FILE, RunDir, exists, is_dir, join, list_dir, open_filesystem, read_bytes, read_json,
    write_json, write_whole,
)
from alpagasus_ray.store.records import read_jsonl
from alpagasus_ray.tiny_model import is_stand_in

ALL = "all"
SMOKE_NOTE = ("Smoke scale: a model here is the tiny locally built stand-in (builtin:tiny-llama); "
              "these scores carry no meaning, they show the machinery.")


def tally(judgments: list[dict]) -> dict:
    """Win/tie/lose of the candidate over prompts, from judgments in both orders.

    >>> j = [{"id": "p1", "order": "candidate_first", "status": "ok", "outcome": "win", "score_candidate": 8, "score_baseline": 6},
    ...      {"id": "p1", "order": "baseline_first", "status": "ok", "outcome": "tie", "score_candidate": 7, "score_baseline": 7},
    ...      {"id": "p2", "order": "candidate_first", "status": "parse_failed", "outcome": None}]
    >>> t = tally(j)
    >>> t["win"], t["tie"], t["lose"], t["parse_failed"], t["failed"], t["winning_score"], t["capacity"]
    (1, 0, 0, 1, 0, 2.0, 1.1538)
    """
    by_prompt: dict[tuple[str, int], dict[str, dict]] = defaultdict(dict)
    for j in judgments:
        by_prompt[j[C.ID], j.get("turn") or 1][j["order"]] = j
    counts = Counter({WIN: 0, TIE: 0, LOSE: 0, C.PARSE_FAILED: 0, "failed": 0})
    mine, theirs = [], []
    for orders in by_prompt.values():
        pair = [orders.get(CANDIDATE_FIRST), orders.get(BASELINE_FIRST)]
        if all(j is not None and j[C.STATUS] == C.OK for j in pair):
            counts[combine(pair[0]["outcome"], pair[1]["outcome"])] += 1
        elif any(j is not None and j[C.STATUS] == C.PARSE_FAILED for j in pair):
            counts[C.PARSE_FAILED] += 1
        else:
            counts["failed"] += 1
        for j in pair:
            if j is not None and j[C.STATUS] == C.OK and j.get("score_candidate") is not None:
                mine.append(j["score_candidate"])
                theirs.append(j["score_baseline"])
    n = counts[WIN] + counts[TIE] + counts[LOSE]
    return {**counts, "n": n, "prompts": len(by_prompt), "winning_score": winning_score(counts[WIN], counts[TIE], counts[LOSE]),
            "capacity": capacity(mine, theirs) if mine else None}


def summarize_pair(pair_dir: str) -> dict:
    """The report entry of one judged pair: per test set, with categories, and "all"."""
    sets = sorted(n[: -len(".jsonl")] for n in list_dir(pair_dir) if n.endswith(".jsonl"))
    if not sets:
        raise InputError(f"{pair_dir}: no judgments (run alpagasus judge first)")
    entry, everything = {}, []
    for name in sets:
        judgments = read_jsonl(join(pair_dir, f"{name}.jsonl"))
        everything += judgments
        entry[name] = _with_turns(tally(judgments), judgments)
        by_category = defaultdict(list)
        for j in judgments:
            if j.get("category") is not None:
                by_category[j["category"]].append(j)
        if len(by_category) > 1:
            entry[name]["categories"] = {c: _short(tally(js)) for c, js in sorted(by_category.items())}
    entry[ALL] = _with_turns(tally(everything), everything)
    return entry


def _with_turns(result: dict, judgments: list[dict]) -> dict:
    """`result` with each turn's counts under "turns", when there are multi-turn prompts."""
    by_turn = defaultdict(list)
    for j in judgments:
        by_turn[j.get("turn") or 1].append(j)
    if len(by_turn) > 1:
        result["turns"] = {str(turn): _short(tally(js)) for turn, js in sorted(by_turn.items())}
    return result


def run_report(config: Config) -> dict:
    """Write report.json, report.md and the plots of `config.run_dir`; returns the report."""
    from alpagasus_ray import plots

    run = RunDir(config.run_dir)
    judgments_dir = run.judgments()
    pairs = list_dir(judgments_dir)
    if not pairs:
        raise InputError(f"{judgments_dir}: no judged pairs (run alpagasus judge first)")
    report = {pair: summarize_pair(run.judgments(pair)) for pair in pairs}
    by_size = _by_size([config.run_dir, *config.report.runs]) if config.report.runs else None  # checked before writing
    write_json(run.report_json, report)
    about = {pair: _about(run.judgments(pair)) for pair in pairs}
    smoke = any(a["smoke"] for a in about.values())
    written = []
    if config.report.plots:
        plot_dir = tempfile.mkdtemp(prefix="alpagasus-plots-")  # drawn here, then written where the run is
        suffix = " (smoke scale: no meaning)" if smoke else ""
        for pair, entry in report.items():
            sets = {s: v for s, v in entry.items() if s != ALL}
            path = os.path.join(plot_dir, f"{pair}_win_tie_lose.png")
            plots.win_tie_lose({**sets, ALL: entry[ALL]}, path, f"{pair.replace('_vs_', ' vs ')}{suffix}")
            written.append(path)
            categorized = {s: v["categories"] for s, v in sets.items() if "categories" in v and len(v["categories"]) <= 40}
            if categorized:
                path = os.path.join(plot_dir, f"{pair}_categories.png")
                plots.category_scores(categorized, path, f"{pair.replace('_vs_', ' vs ')} by category{suffix}")
                written.append(path)
        if by_size:
            path = os.path.join(plot_dir, "winning_score_vs_size.png")
            plots.score_vs_size(by_size, path, f"winning score vs training size{suffix}")
            written.append(path)
        for i, path in enumerate(written):
            with open(path, "rb") as f:
                written[i] = join(run.plots, os.path.basename(path))
                write_whole(written[i], f.read())
        shutil.rmtree(plot_dir, ignore_errors=True)
    write_whole(run.report_md, _markdown(report, about, smoke, written, config.run_dir).encode())
    return report


def _short(t: dict) -> dict:
    return {k: t[k] for k in (WIN, TIE, LOSE, C.PARSE_FAILED, "failed", "n", "winning_score")}


def _about(pair_dir: str) -> dict:
    """Who was judged by whom, from the judge record and the answers' generation records."""
    record = read_json(join(pair_dir, JUDGE_FILE)) or {}
    models = [(read_json(join(record.get(key) or "", GENERATION_FILE)) or {}).get("model")
              for key in ("candidate_answers", "baseline_answers")]
    judge = record.get("judge", "")
    smoke = is_stand_in(judge.partition(":")[2]) or any(is_stand_in(m) for m in models)
    return {"judge": judge, "prompt": record.get("prompt"), "models": models, "smoke": smoke}


def _by_size(run_dirs: list[str]) -> dict[str, list[tuple[int, float]]]:
    """(training rows, winning score) per test set over runs, each run's first judged pair."""
    points = defaultdict(list)
    for run in map(RunDir, run_dirs):
        selection = run.selection
        if not exists(selection):
            raise InputError(f"{selection}: missing; report.runs needs each run's selection (its training size)")
        size = read_json(selection)["selected"]
        judgments_dir = run.judgments()
        pairs = list_dir(judgments_dir)
        if not pairs:
            raise InputError(f"{judgments_dir}: no judged pairs in a run of report.runs")
        for name, result in summarize_pair(run.judgments(pairs[0])).items():
            points[name].append((size, result["winning_score"]))
    return dict(points)


def _markdown(report: dict, about: dict, smoke: bool, plots_written: list[str], run_dir: str) -> str:
    lines = ["# AlpaGasus evaluation report", ""]
    if smoke:
        lines += [f"> **{SMOKE_NOTE}**", ""]
    lines += ["Winning score = (#win - #lose) / N + 1 over prompts judged in both orders (1.0 = parity). "
              "parse_failed and failed prompts are not part of N. Capacity = the candidate's judge scores "
              "summed over the baseline's.", ""]
    for pair, entry in report.items():
        a = about[pair]
        lines += [f"## {pair.replace('_vs_', ' vs ')}", "",
                  f"Judge `{a['judge']}` with the `{a['prompt']}` prompt; models: candidate `{a['models'][0]}`, "
                  f"baseline `{a['models'][1]}`.", "",
                  "| test set | win | tie | lose | parse_failed | failed | N | winning score | capacity |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, t in entry.items():
            cap = "" if t["capacity"] is None else f"{t['capacity']:.1%}"
            label = f"**{name}**" if name == ALL else name
            lines.append(f"| {label} | {t[WIN]} | {t[TIE]} | {t[LOSE]} | {t[C.PARSE_FAILED]} | {t['failed']} | "
                         f"{t['n']} | {t['winning_score']:.4f} | {cap} |")
        if "turns" in entry[ALL]:
            lines += ["", "### By turn (multi-turn prompts: each later turn judged in its conversation)", "",
                      "| test set | turn | win | tie | lose | N | winning score |", "|---|---|---|---|---|---|---|"]
            lines += [f"| {name} | {turn} | {v[WIN]} | {v[TIE]} | {v[LOSE]} | {v['n']} | {v['winning_score']:.4f} |"
                      for name, t in entry.items() if "turns" in t for turn, v in t["turns"].items()]
        for name, t in entry.items():
            if "categories" in t:
                lines += ["", f"### {name} by category", "", "| category | win | tie | lose | N | winning score |",
                          "|---|---|---|---|---|---|"]
                lines += [f"| {c} | {v[WIN]} | {v[TIE]} | {v[LOSE]} | {v['n']} | {v['winning_score']:.4f} |"
                          for c, v in t["categories"].items()]
        lines.append("")
    pilot = RunDir(run_dir).pilot("pilot.md")
    if exists(pilot):  # the graders compared before the rating (`rate --pilot`)
        lines += [f"#{line}" if line.startswith("#") else line for line in read_bytes(pilot).decode().splitlines()]
        lines.append("")
    lines += ["## Artifacts", ""]
    lines += [f"- `{_relative(p, run_dir)}`" for p in _artifacts(run_dir, plots_written)]
    return "\n".join(lines) + "\n"


def _relative(path: str, run_dir: str) -> str:
    """A path of the run as the report shows it: from the run directory, a directory ending in /.

    >>> _relative("s3://b/run/answers/x/koala.jsonl", "s3://b/run"), _relative("runs/a/model/", "runs/a")
    ('answers/x/koala.jsonl', 'model/')
    """
    inside = path[len(run_dir.rstrip("/")):].lstrip("/") if path.startswith(run_dir.rstrip("/")) else path
    return inside


def _artifacts(run_dir: str, extra: list[str]) -> list[str]:
    """Every file of the run a person would open (checkpoint shards and Parquet parts excepted)."""
    run = RunDir(run_dir)
    fs, root = open_filesystem(run_dir)
    bulk = [open_filesystem(b)[1] + "/" for b in run.bulk]
    found = set(extra) | {run.report_md}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        inside = info.path[len(root):].lstrip("/")
        pilot_run = inside.startswith("pilot/") and inside.count("/") > 1 and not inside.startswith("pilot/plots/")
        if (info.type != pafs.FileType.File or any(info.path.startswith(b) for b in bulk) or pilot_run
                or inside.split("/")[-1].startswith(".") or "parts" in inside.split("/")[:-1]):
            continue
        found.add(join(run_dir, *inside.split("/")))
    for whole in (run.model, run.rated):  # listed whole
        if is_dir(whole):
            found.add(whole + "/")
    return sorted(found)
