"""The pilot: graders compared on a sample before the full rating (`alpagasus rate --pilot N`).

    alpagasus rate --config configs/pilot_chatgpt_vs_claude.yaml --pilot 500

1. A seeded random sample of N rows that can be rated, spread over the whole input, is drawn on
   the workers (each row keyed by a hash of the seed and its id; the N smallest keys win) and
   written to `<run_dir>/pilot/sample.jsonl` in the normalized form (ids kept).
2. Each grader (`rate` first, then `pilot.graders`) rates the sample as a rating of its own into
   `<run_dir>/pilot/<k>-<grader>/`: every backend, limit, resume and cap of a rating holds.
3. The figures are computed from the ratings (scipy, scikit-learn) into `pilot.json`, `pilot.md`
   and a histogram per grader: the share kept at each threshold, projected to the whole input
   with a 95% interval; the full run's projected cost; between graders Spearman's rho, exact
   agreement, quadratic-weighted kappa and the kept/dropped confusion.
A full rating with the same grader and settings as one of the pilot's takes the pilot's ratings
as its own (`stages.rate`), so nothing is paid twice.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from alpagasus_ray import columns as C
from alpagasus_ray.config import Config, DataConfig, result_settings
from alpagasus_ray.errors import InputError
from alpagasus_ray.llm.engines import engine_for
from alpagasus_ray.ray_runtime import ensure_ray
from alpagasus_ray.stages.rate import run_rate
from alpagasus_ray.store.inputs import INVALID_REASON, input_dataset, scan_input
from alpagasus_ray.store.layout import RunDir, write_json, write_whole
from alpagasus_ray.store.rated import open_rated
from alpagasus_ray.store.records import write_jsonl

log = logging.getLogger(__name__)

# Rows drawn per row wanted on the first pass: the keys below the expected N-th smallest, with room.
OVERDRAW = 3
SAMPLE, SOURCES = "sample.jsonl", "sample_sources.json"


def run_pilot(config: Config, size: int | None = None) -> dict:
    """Rate a sample of the input with every grader and compare them; returns the record written
    to `<run_dir>/pilot/pilot.json`."""
    size = size or config.pilot.size
    run = RunDir(config.run_dir)
    ensure_ray()
    scan = scan_input(config.data)
    if scan.valid == 0:
        raise InputError(f"{', '.join(scan.files)}: no row can be rated ({scan.rows:,} rows, none valid)")
    sample = draw_sample(config.data, scan, size, config.pilot.seed)
    write_jsonl(run.pilot(SAMPLE), (_sample_row(r) for r in sample))
    write_json(run.pilot(SOURCES), {r[C.ID]: r[C.SOURCE] for r in sample})
    log.info("pilot: %d rows drawn at random (seed %d) from %s rows that can be rated", len(sample),
             config.pilot.seed, f"{scan.valid:,}")
    graders = []
    for number, endpoint in enumerate(pilot_graders(config), start=1):
        name = f"{number}-{_slug(endpoint)}"
        sub = config.model_copy(update={
            "run_dir": run.pilot(name), "rate": endpoint,
            "data": DataConfig(path=run.pilot(SAMPLE), format="jsonl", id_field=C.ID,
                               max_row_chars=config.data.max_row_chars)})
        log.info("pilot: grader %d, %s", number, name)
        summary = run_rate(sub)
        graders.append(_grader_figures(config, name, endpoint, summary, scan))
    record = {"sample": {"rows": len(sample), "seed": config.pilot.seed, "drawn_from": scan.valid,
                         "input_rows": scan.rows, "input_files": scan.files},
              "tau": config.filter.threshold, "thresholds": _thresholds(config),
              "graders": [g for g, _ in graders],
              "pairs": [_pair(a, b, config.filter.threshold) for i, a in enumerate(graders) for b in graders[i + 1:]]}
    write_json(run.pilot("pilot.json"), record)
    write_whole(run.pilot("pilot.md"), pilot_markdown(record).encode())
    if config.filter.plots:
        _plots(run, graders, config.filter.threshold)
    return record


def pilot_graders(config: Config) -> list:
    """The graders a pilot compares: `rate` first, unless `pilot.graders` lists it."""
    listed = list(config.pilot.graders)
    wanted = result_settings(config.rate)
    return listed if any(result_settings(g) == wanted for g in listed) else [config.rate, *listed]


def draw_sample(data: DataConfig, scan, size: int, seed: int) -> list[dict]:
    """`size` rows that can be rated (all of them when fewer), drawn at random over the whole input:
    each row's key is a hash of the seed and its id, and the rows with the smallest keys are taken.
    The workers send only the rows below a cut that holds about `OVERDRAW` x `size` of them."""
    wanted = min(size, scan.valid)
    cut = min(1.0, OVERDRAW * wanted / scan.valid)
    while True:
        rows = (input_dataset(data, scan.files, scan.repeats)
                .map_batches(_below_cut, fn_kwargs={"seed": seed, "cut": cut}, batch_format="pyarrow", batch_size=None)
                .take_all())
        if len(rows) >= wanted or cut >= 1.0:
            break
        cut = min(1.0, cut * 2)  # unlucky: fewer keys fell under the cut than wanted
    rows.sort(key=lambda r: r["_key"])
    return rows[:wanted]


def sample_key(seed: int, row_id: str) -> float:
    """A row's place in the seeded random order, in [0, 1).

    >>> sample_key(0, "a") == sample_key(0, "a") != sample_key(1, "a")
    True
    """
    digest = hashlib.blake2b(f"{seed}\x00{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _below_cut(block: pa.Table, seed: int, cut: float) -> pa.Table:
    valid = block.filter(pc.is_null(block[INVALID_REASON]))
    keys = pa.array([sample_key(seed, i) for i in valid[C.ID].to_pylist()], pa.float64())
    valid = valid.append_column("_key", keys)
    return valid.filter(pc.less(valid["_key"], cut))


def _sample_row(row: dict) -> dict:
    """A sampled row as the sample file holds it: its id and its text, in the normalized form."""
    if row.get(C.MESSAGES) is not None:
        return {C.ID: row[C.ID], C.MESSAGES: row[C.MESSAGES]}
    return {C.ID: row[C.ID], C.INSTRUCTION: row[C.INSTRUCTION], C.INPUT: row[C.INPUT], C.OUTPUT: row[C.OUTPUT]}


def _slug(endpoint) -> str:
    """A grader as a directory name: its backend and its model's last path part.

    >>> from alpagasus_ray.config import load_config
    >>> _slug(load_config(None, ["rate.model=gpt-4o-mini"]).rate), _slug(load_config(None, ["rate.model=/m/tiny llm"]).rate)
    ('openai-gpt-4o-mini', 'openai-tiny-llm')
    """
    model = endpoint.model.rstrip("/").rsplit("/", 1)[-1]
    return f"{endpoint.backend}-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in model)


def _thresholds(config: Config) -> list[float]:
    return sorted({config.filter.threshold, *config.pilot.thresholds})


def _grader_figures(config: Config, name: str, endpoint, summary: dict, scan) -> tuple[dict, dict]:
    """What one grader's sample says, and its scores by id (for the pairs)."""
    from scipy.stats import binomtest

    engine = engine_for(endpoint)
    table = open_rated(RunDir(config.run_dir).pilot(name)).read()
    rows = table.select([C.ID, C.STATUS, C.SCORE]).to_pylist()
    scores = {r[C.ID]: r[C.SCORE] for r in rows if r[C.STATUS] == C.OK}
    sent = [r for r in rows if r[C.STATUS] not in C.SET_ASIDE]
    failed = sum(r[C.STATUS] != C.OK for r in sent)
    kept = {}
    for tau in _thresholds(config):
        k, n = sum(s >= tau for s in scores.values()), len(scores)
        if n == 0:
            kept[f"{tau:g}"] = None
            continue
        interval = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        kept[f"{tau:g}"] = {"kept": k, "of": n, "share": k / n, "share_95": [interval.low, interval.high],
                            "projected_rows": round(k / n * scan.valid),
                            "projected_rows_95": [math.floor(interval.low * scan.valid), math.ceil(interval.high * scan.valid)]}
    requests = summary["turns"]["rated"] if "turns" in summary else len(sent)  # by turn: a request a turn
    full_requests = scan.turns if scan.conversations and endpoint.unit == "turn" else scan.valid
    tokens_in = summary["tokens_in"] / requests if requests else 0.0
    tokens_out = summary["tokens_out"] / requests if requests else 0.0
    projected = {"requests": full_requests, "tokens_in": round(tokens_in * full_requests),
                 "tokens_out": round(tokens_out * full_requests)}
    figures = {
        "name": name, "grader": engine.name, "dimension": endpoint.dimension, "backend": endpoint.backend,
        "rows": len(rows), "ok": len(scores), "failed": failed, "failure_rate": failed / len(sent) if sent else None,
        "set_aside": len(rows) - len(sent), "score_histogram": {f"{k:g}": v for k, v in sorted(Counter(scores.values()).items())},
        "kept": kept, "tokens_in_per_request": round(tokens_in, 1), "tokens_out_per_request": round(tokens_out, 1),
        "cost_usd_sample": summary.get("cost_usd"), "full_run": {**projected, **_projected_cost(engine, endpoint, projected)},
    }
    return figures, scores


def _projected_cost(engine, endpoint, projected: dict) -> dict:
    """The full run's cost at the grader's prices: synchronous, and through a Batch API (its
    `batch_price_factor`, or OpenAI's and Anthropic's half price)."""
    if engine.price_factor() is None or endpoint.price_input_per_million is None:
        return {"cost_usd_synchronous": None, "cost_usd_batch": None}
    sync = engine.cost(projected["tokens_in"], projected["tokens_out"], full_price=True)
    factor = getattr(endpoint, "batch_price_factor", 0.5)
    return {"cost_usd_synchronous": sync, "cost_usd_batch": round(sync * factor, 6)}


def _pair(a: tuple[dict, dict], b: tuple[dict, dict], tau: float) -> dict:
    """Two graders on the rows both rated ok."""
    from scipy.stats import spearmanr
    from sklearn.metrics import cohen_kappa_score, confusion_matrix

    (fa, sa), (fb, sb) = a, b
    ids = sorted(sa.keys() & sb.keys())
    x, y = [sa[i] for i in ids], [sb[i] for i in ids]
    pair = {"a": fa["name"], "b": fb["name"], "rows": len(ids), "spearman_rho": None, "exact_agreement": None,
            "quadratic_kappa": None, "kept_at_tau": None}
    if not ids:
        return pair
    rho = spearmanr(x, y).statistic if len(set(x)) > 1 and len(set(y)) > 1 else float("nan")
    # The 0-5 scale in steps of 0.5, as the eleven classes of the kappa.
    kappa = cohen_kappa_score([round(v * 2) for v in x], [round(v * 2) for v in y], weights="quadratic",
                              labels=list(range(11))) if len(set(x) | set(y)) > 1 else float("nan")
    matrix = confusion_matrix([v >= tau for v in x], [v >= tau for v in y], labels=[True, False])
    pair.update(spearman_rho=_number(rho), exact_agreement=sum(p == q for p, q in zip(x, y)) / len(ids),
                quadratic_kappa=_number(kappa),
                kept_at_tau={"both": int(matrix[0][0]), "a_only": int(matrix[0][1]), "b_only": int(matrix[1][0]),
                             "neither": int(matrix[1][1])})
    return pair


def _number(value: float) -> float | None:
    """None for an undefined figure (NaN: e.g. a grader that gave one score to every row)."""
    return None if value is None or math.isnan(value) else float(value)


def pilot_markdown(record: dict) -> str:
    """`pilot.md`: the graders side by side, then each pair."""
    sample = record["sample"]
    lines = [f"# Pilot: {len(record['graders'])} graders on {sample['rows']:,} rows",
             "",
             f"A random sample (seed {sample['seed']}) of the {sample['drawn_from']:,} rows that can be rated, of "
             f"{sample['input_rows']:,} in {', '.join(sample['input_files'])}. Shares kept are of the rows rated ok, "
             "with a 95% Wilson interval; projected rows are the share times the rows that can be rated.",
             "", "## Graders", ""]
    taus = [f"{t:g}" for t in record["thresholds"]]
    lines.append("| grader | dimension | ok | failure rate | " + " | ".join(f"kept at {t}" for t in taus)
                 + " | tokens in / out a request | full run, synchronous | full run, Batch API |")
    lines.append("|---" * (7 + len(taus)) + "|")
    for g in record["graders"]:
        kept = [_kept_cell(g["kept"][t]) for t in taus]
        full = g["full_run"]
        lines.append(f"| {g['name']} | {g['dimension']} | {g['ok']:,} of {g['rows']:,} | {_share(g['failure_rate'])} | "
                     + " | ".join(kept) + f" | {g['tokens_in_per_request']:,} / {g['tokens_out_per_request']:,} | "
                     f"{_usd(full['cost_usd_synchronous'])} | {_usd(full['cost_usd_batch'])} |")
    if record["pairs"]:
        tau = f"{record['tau']:g}"
        lines += ["", "## Between graders", "",
                  f"On the rows both rated ok. Kept at tau = {tau}: both / only the first / only the second / neither.", "",
                  "| first | second | rows | Spearman's rho | exact agreement | quadratic kappa | kept at tau |",
                  "|---|---|---|---|---|---|---|"]
        for p in record["pairs"]:
            k = p["kept_at_tau"]
            cell = f"{k['both']} / {k['a_only']} / {k['b_only']} / {k['neither']}" if k else "-"
            lines.append(f"| {p['a']} | {p['b']} | {p['rows']:,} | {_figure(p['spearman_rho'])} | "
                         f"{_share(p['exact_agreement'])} | {_figure(p['quadratic_kappa'])} | {cell} |")
    return "\n".join(lines) + "\n"


def _kept_cell(kept: dict | None) -> str:
    if kept is None:
        return "-"
    low, high = kept["share_95"]
    rows_low, rows_high = kept["projected_rows_95"]
    return (f"{kept['share']:.1%} ({low:.1%}-{high:.1%}); {kept['projected_rows']:,} rows "
            f"({rows_low:,}-{rows_high:,})")


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _usd(value: float | None) -> str:
    """A cost as a person reads it: cents above a dollar, four significant digits below.

    >>> _usd(1234.5678), _usd(0.012345), _usd(None)
    ('$1,234.57', '$0.01235', 'not paid')
    """
    if value is None:
        return "not paid"
    return f"${value:,.2f}" if value >= 1 else f"${value:.4g}"


def _plots(run: RunDir, graders: list[tuple[dict, dict]], tau: float) -> None:
    from alpagasus_ray import plots

    for figures, scores in graders:
        plots.score_histogram(Counter(scores.values()), tau, run.pilot("plots", f"{figures['name']}_scores.png"),
                              f"{figures['grader']} ({figures['dimension']}): {figures['ok']:,} sample rows rated ok")
