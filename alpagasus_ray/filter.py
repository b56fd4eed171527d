"""The filter stage: turn ratings into the training subset, as the paper does.

    alpagasus filter --config configs/filter_alpagasus_9k.yaml [filter.threshold=4.0] [--compare OTHER.json]

Reads `<run_dir>/rated/`, keeps rows by one of the modes of `FilterConfig`, and writes
`selected.json` / `selected.jsonl` (Alpaca format, plus id and score), `selection.json` (what was
done and the counts) and `plots/*.png`. Only rows rated `ok` are ever selected. Everything is
checked before anything is written, and the files appear together at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alpagasus_ray import columns as C
from alpagasus_ray import plots, selection
from alpagasus_ray.config import Config, FilterConfig
from alpagasus_ray.prompts import SCORE_MAX, SCORE_MIN
from alpagasus_ray.layout import RunDir, is_local, open_filesystem
from alpagasus_ray.rated import RatedStore, best_per_id

log = logging.getLogger(__name__)

REQUIRED = (C.ID, C.INSTRUCTION, C.INPUT, C.OUTPUT, C.SCORE, C.STATUS)
CATEGORY = "_category"


class FilterError(ValueError):
    """A selection that cannot be made as configured; nothing was written."""


def run_filter(config: Config) -> dict:
    """Select the training rows of `config.run_dir`; returns what selection.json records."""
    f = config.filter
    store = RatedStore(f.rated_from or config.run_dir)
    rated = load_rated(store, f.score, None if f.category_field else f.category_keywords)
    if not SCORE_MIN <= f.threshold <= SCORE_MAX and f.mode in ("threshold", "subsample", "balanced"):
        raise FilterError(f"filter.threshold={f.threshold:g} is outside the grader's scale {SCORE_MIN:g}-{SCORE_MAX:g}")
    statuses = Counter(rated[C.STATUS].to_pylist())
    categories_all = _categories(rated, config)
    is_ok = pc.and_(pc.equal(rated[C.STATUS], C.OK), pc.is_valid(rated[f.score])).to_pylist()
    pool_index = [i for i, ok in enumerate(is_ok) if ok]
    if not pool_index:
        raise FilterError(f"no rated row has status ok and a {f.score}: nothing to select from (statuses: {dict(statuses)})")
    pool = rated.take(pa.array(pool_index))
    categories = [categories_all[i] for i in pool_index]
    chosen = _choose(pool, categories, f)
    selected = _with_text(store, pool.take(pa.array(chosen)), f.score)

    per_category = _per_category(categories_all, categories, [categories[i] for i in chosen])
    record = {
        "mode": f.mode,
        "params": {k: v for k, v in f.model_dump().items() if k not in ("compare", "plots")},
        "k": len(chosen) if f.mode in ("top_k", "random_k", "subsample") else None,
        "seed": f.seed,
        "score": f.score,
        "rows_rated": rated.num_rows,
        "by_status": {s: statuses.get(s, 0) for s in C.STATUSES},
        "not_selectable": rated.num_rows - pool.num_rows,
        "pool": pool.num_rows,
        "selected": selected.num_rows,
        "kept_fraction_of_pool": round(selected.num_rows / pool.num_rows, 4),
        "kept_fraction_of_rated": round(selected.num_rows / rated.num_rows, 4),
        "min_selected_score": pc.min(selected[f.score]).as_py(),
        "per_category": per_category,
        "category_source": f"field:{f.category_field}" if f.category_field else "keywords",
    }
    if f.compare:
        record["compare"] = compare(selected, f.compare)
    _write_outputs(config.run_dir, selected, record, pool[f.score].to_pylist(), f)
    log.info("filter: %s: kept %s of %s ok rows (%.1f%%)", f.mode, f"{selected.num_rows:,}",
             f"{pool.num_rows:,}", 100 * record["kept_fraction_of_pool"])
    return record


def load_rated(store: RatedStore, score: str = C.SCORE, keywords: list[str] | None = None) -> pa.Table:
    """What selection needs of every rated row (id, status, attempts, scores, and the keyword
    category when `keywords` are given), one row per id in id order; the text stays on disk.

    A streaming scan: each batch's text is read, categorized and dropped.
    """
    path = store.uri
    parts = store.parts()
    if not parts:
        raise FilterError(f"{path}: no rated rows; run `alpagasus rate` first")
    schema = pq.read_schema(parts[0], filesystem=store.fs)
    missing = [c for c in (*REQUIRED, score) if c not in schema.names]
    if missing:
        raise FilterError(f"{path}: the rated rows lack column(s) {', '.join(missing)}")
    light = list(dict.fromkeys([C.ID, C.STATUS, C.ATTEMPTS, C.SCORE, C.SCORE_EXPECTED, score]))
    text = [C.INSTRUCTION, C.INPUT, C.OUTPUT] if keywords is not None else []
    tables = []
    for batch in store.batches(light + text):
        table = pa.Table.from_batches([batch])
        if keywords is not None:
            rows = zip(*(table[c].to_pylist() for c in text))
            category = [selection.keyword_category("\n".join(r), keywords) for r in rows]
            table = table.select(light).append_column(CATEGORY, pa.array(category, pa.string()))
        tables.append(table)
    return best_per_id(pa.concat_tables(tables))


def _with_text(store: RatedStore, chosen: pa.Table, score: str) -> pa.Table:
    """The chosen rows with their text, read back for their ids only, in the order chosen."""
    ids = chosen[C.ID].to_pylist()
    found = {}
    for batch in store.batches([C.ID, C.INSTRUCTION, C.INPUT, C.OUTPUT], pc.field(C.ID).isin(ids)):
        for row in batch.to_pylist():
            found.setdefault(row[C.ID], row)
    rows = [found[i] for i in ids]
    return pa.table({
        C.INSTRUCTION: [r[C.INSTRUCTION] for r in rows], C.INPUT: [r[C.INPUT] for r in rows],
        C.OUTPUT: [r[C.OUTPUT] for r in rows], C.ID: ids, score: chosen[score],
    })


def _choose(pool: pa.Table, categories: list[str], f: FilterConfig) -> list[int]:
    scores = pool[f.score].to_pylist()
    expected = pool[C.SCORE_EXPECTED].to_pylist() if C.SCORE_EXPECTED in pool.column_names else [None] * len(scores)
    ids = pool[C.ID].to_pylist()
    k = _resolve_k(f)
    if f.mode == "threshold":
        chosen = selection.threshold(scores, f.threshold)
    elif f.mode == "top_k":
        chosen = selection.top_k(scores, expected, ids, _check_k(k, len(scores), "the ok rows"))
    elif f.mode == "random_k":
        chosen = selection.random_k(range(len(scores)), _check_k(k, len(scores), "the ok rows"), f.seed)
    elif f.mode == "subsample":
        kept = selection.threshold(scores, f.threshold)
        chosen = selection.random_k(kept, _check_k(k, len(kept), f"the rows scoring >= {f.threshold:g}"), f.seed)
    else:  # balanced
        if f.category_floor == 0 and not f.category_quota:
            raise FilterError("filter.mode=balanced needs filter.category_floor > 0 or a filter.category_quota")
        unknown = set(f.category_quota) - set(categories)
        if unknown:
            raise FilterError(f"filter.category_quota names categories with no ok row: {sorted(unknown)}")
        chosen = selection.with_category_floor(
            selection.threshold(scores, f.threshold), selection.rank_order(scores, expected, ids),
            categories, f.category_floor, f.category_quota,
        )
    if not chosen:
        raise FilterError(f"filter.mode={f.mode} selects no row (e.g. no ok row scores >= {f.threshold:g})")
    return chosen


def _resolve_k(f: FilterConfig) -> int | None:
    if f.k_from is None:
        return f.k
    try:
        with open(f.k_from) as fh:
            other = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise FilterError(f"filter.k_from={f.k_from}: cannot read a selection: {e}") from None
    return other["selected"] if isinstance(other, dict) and "selected" in other else len(other)


def _check_k(k: int | None, available: int, what: str) -> int:
    if k is None:
        raise FilterError("this filter.mode needs filter.k (or filter.k_from)")
    if k > available:
        raise FilterError(f"filter.k={k:,} is more than {what} ({available:,})")
    return k


def _categories(rated: pa.Table, config: Config) -> list[str]:
    """Each rated row's category: from an input field joined by id, or by keyword rules."""
    f = config.filter
    if f.category_field is None:
        return rated[CATEGORY].to_pylist()
    from alpagasus_ray.data import read_rows

    source = read_rows(config.data, extra_fields=(f.category_field,)).table
    by_id = dict(zip(source[C.ID].to_pylist(), source[f.category_field].to_pylist()))
    if not any(v is not None for v in by_id.values()):
        raise FilterError(f"filter.category_field={f.category_field!r}: no row of {config.data.path} has it")
    return [by_id.get(i) or "(none)" for i in rated[C.ID].to_pylist()]


def _per_category(all_rows: list[str], pool: list[str], kept: list[str]) -> dict[str, dict]:
    rows, ok, selected = Counter(all_rows), Counter(pool), Counter(kept)
    return {
        c: {"rows": rows[c], "ok": ok[c], "kept": selected[c],
            "kept_fraction": round(selected[c] / rows[c], 4), "filter_ratio": round(1 - selected[c] / rows[c], 4)}
        for c in sorted(rows)
    }


def compare(selected: pa.Table, other_path: str) -> dict:
    """Overlap of this selection with another of the same data, by exact row content and, when
    the other has ids, by id."""
    other = _read_selection(other_path)
    content = lambda r: (r.get(C.INSTRUCTION), r.get(C.INPUT) or "", r.get(C.OUTPUT))  # noqa: E731
    mine = selected.select([C.ID, C.INSTRUCTION, C.INPUT, C.OUTPUT]).to_pylist()
    result = {"other": other_path, "other_rows": len(other), "this_rows": len(mine),
              "by_content": selection.overlap({content(r) for r in mine}, {content(r) for r in other})}
    other_ids = {str(r[C.ID]) for r in other if r.get(C.ID) is not None}
    result["by_id"] = selection.overlap({r[C.ID] for r in mine}, other_ids) if other_ids else None
    return result


def _read_selection(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FilterError(f"{path}: cannot read a selection to compare with: {e}") from None
    if not all(isinstance(r, dict) and C.INSTRUCTION in r and C.OUTPUT in r for r in rows):
        raise FilterError(f"{path}: a selection is Alpaca-format rows with instruction and output")
    return rows


def _write_outputs(run_dir: str, selected: pa.Table, record: dict, pool_scores: list[float], f: FilterConfig) -> None:
    """Write every output into a temporary directory, then move them in place together. A run
    directory on an object store gets them copied, selection.json (the record) last."""
    if not is_local(run_dir):
        with tempfile.TemporaryDirectory(prefix="alpagasus-filter-") as local:
            _write_outputs(local, selected, record, pool_scores, f)
            fs, root = open_filesystem(run_dir)
            staged = RunDir(local)
            names = [*(os.path.join("plots", n) for n in sorted(os.listdir(staged.plots)) if f.plots),
                     os.path.basename(staged.selected_json), os.path.basename(staged.selected_jsonl),
                     os.path.basename(staged.selection)]
            for name in names:
                with open(os.path.join(local, name), "rb") as src, fs.open_output_stream(f"{root}/{name}") as dst:
                    dst.write(src.read())
        return
    os.makedirs(run_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".filter-", dir=run_dir)
    staged, final = RunDir(tmp), RunDir(run_dir)  # written in a directory of the same layout, then moved
    try:
        rows = selected.select([C.INSTRUCTION, C.INPUT, C.OUTPUT, C.ID, f.score]).to_pylist()
        if f.score != C.SCORE:
            rows = [{**{k: v for k, v in r.items() if k != f.score}, C.SCORE: r[f.score]} for r in rows]
        with open(staged.selected_json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, ensure_ascii=False, indent=1)
        with open(staged.selected_jsonl, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if f.plots:
            _plot(staged.plots, record, pool_scores, f)
        with open(staged.selection, "w") as fh:
            json.dump(record, fh, indent=2)
        for name in ("selected_json", "selected_jsonl", "selection"):
            os.replace(getattr(staged, name), getattr(final, name))
        if f.plots:
            os.makedirs(final.plots, exist_ok=True)
            for name in os.listdir(staged.plots):
                os.replace(os.path.join(staged.plots, name), os.path.join(final.plots, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _plot(out: str, record: dict, pool_scores: list[float], f: FilterConfig) -> None:
    tau = f.threshold if f.mode in ("threshold", "subsample", "balanced") else record["min_selected_score"]
    kept_at_tau = sum(s >= tau for s in pool_scores)
    label = "logprob-weighted score" if f.score == C.SCORE_EXPECTED else "score"
    plots.score_histogram(pool_scores, tau, os.path.join(out, "score_histogram.png"),
                          f"{label} of {len(pool_scores):,} rated rows")
    plots.tau_curve(pool_scores, tau, kept_at_tau, os.path.join(out, "tau_curve.png"),
                    f"rows kept by threshold ({label})")
    plots.category_kept(record["per_category"], record["kept_fraction_of_rated"],
                        os.path.join(out, "category_kept.png"),
                        f"kept per category ({f.mode}: {record['selected']:,} of {record['rows_rated']:,} rows)")
