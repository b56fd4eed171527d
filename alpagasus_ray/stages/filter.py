"""The filter stage: turn ratings into the training subset, as the paper does.

    alpagasus filter --config configs/filter_alpagasus_9k.yaml [filter.threshold=4.0] [--compare OTHER.json]

Reads `<run_dir>/rated/`, keeps rows by one of the modes of `FilterConfig`, and writes
`selected.json` / `selected.jsonl` (Alpaca format, plus id and score), `selection.json` (what was
done and the counts) and `plots/*.png`. Only rows rated `ok` are ever selected. Everything is
checked before anything is written, and the files appear together at the end.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import textwrap
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from alpagasus_ray import columns as C
from alpagasus_ray import plots
from alpagasus_ray.errors import UserError
from alpagasus_ray.config import Config, FilterConfig
from alpagasus_ray.rules import selection
from alpagasus_ray.rules.prompts import SCORE_MAX, SCORE_MIN
from alpagasus_ray.store.layout import RunDir, is_local, open_filesystem
from alpagasus_ray.store.parts import SCAN_BATCH_ROWS, best_per_id, value_counts
from alpagasus_ray.store.formatting import CONVERSATIONS, SYSTEM, turns_for
from alpagasus_ray.store.rated import RatedStore, open_rated

log = logging.getLogger(__name__)

REQUIRED = (C.ID, C.INSTRUCTION, C.INPUT, C.OUTPUT, C.SCORE, C.STATUS)
CHAT_REQUIRED = (C.ID, C.MESSAGES, C.FORMATTING, C.SCORE, C.STATUS)
CATEGORY = "_category"


class FilterError(UserError):
    """A selection that cannot be made as configured; nothing was written."""


def run_filter(config: Config) -> dict:
    """Select the training rows of `config.run_dir`; returns what selection.json records."""
    f = config.filter
    if not SCORE_MIN <= f.threshold <= SCORE_MAX and f.mode in ("threshold", "subsample", "balanced"):
        raise FilterError(f"filter.threshold={f.threshold:g} is outside the grader's scale {SCORE_MIN:g}-{SCORE_MAX:g}")
    if f.mode == "balanced" and f.category_floor == 0 and not f.category_quota:
        raise FilterError("filter.mode=balanced needs filter.category_floor > 0 or a filter.category_quota")
    k = _resolve_k(f)
    if f.mode in ("top_k", "random_k", "subsample") and k is None:
        raise FilterError("this filter.mode needs filter.k (or filter.k_from)")
    store = open_rated(f.rated_from or config.run_dir)
    if store.chat and f.compare:
        raise FilterError("filter.compare compares alpaca selections; this run rated conversations")
    scan = scan_rated(store, f, _category_reader(config, store.chat), k)
    if not scan.pool:
        raise FilterError(f"no rated row has status ok and a {f.score}: nothing to select from "
                          f"(statuses: {dict(scan.statuses)})")
    candidates = scan.candidates
    chosen = candidates.take(pa.array(_choose(candidates, scan, f, k), pa.int64()))
    selected = functools.partial(_with_text, store, chosen)  # the rows to write, a range at a time
    writer = ChatWriter(config) if store.chat else None
    tau = f.threshold if f.mode in ("threshold", "subsample", "balanced") else pc.min(chosen[_SCORE]).as_py()

    kept_categories = Counter(chosen[CATEGORY].to_pylist())
    record = {
        "mode": f.mode,
        "params": {k: v for k, v in f.model_dump().items() if k not in ("compare", "plots")},
        "k": chosen.num_rows if f.mode in ("top_k", "random_k", "subsample") else None,
        "seed": f.seed,
        "score": f.score,
        "rows_rated": scan.rows,
        "by_status": {s: scan.statuses.get(s, 0) for s in C.STATUSES},
        "not_selectable": scan.rows - scan.pool,
        "dropped_suspect": scan.dropped_suspect if f.drop_suspect else None,
        "pool": scan.pool,
        "selected": chosen.num_rows,
        "kept_fraction_of_pool": round(chosen.num_rows / scan.pool, 4),
        "kept_fraction_of_rated": round(chosen.num_rows / scan.rows, 4),
        "min_selected_score": pc.min(chosen[_SCORE]).as_py(),
        "per_category": _per_category(scan.categories, scan.pool_categories, kept_categories),
        "category_source": f"field:{f.category_field}" if f.category_field else "keywords",
        "rows_are": "conversations" if store.chat else "alpaca rows",
    }
    if f.compare:
        record["compare"] = compare(pa.concat_tables(selected()), f.compare)
    kept_at_tau = scan.at_threshold if tau == f.threshold else _pool_rows_at_or_above(store, f.score, tau)
    _write_outputs(config.run_dir, selected, record, scan.pool_scores, kept_at_tau, f, writer)
    log.info("filter: %s: kept %s of %s ok rows (%.1f%%)", f.mode, f"{chosen.num_rows:,}",
             f"{scan.pool:,}", 100 * record["kept_fraction_of_pool"])
    return record


_SCORE = "_score"  # the score the filter selects on (filter.score), in the candidates


@dataclass
class RatedScan:
    """What one streaming pass over the rated parts leaves: counts, and the rows the mode may choose."""

    rows: int  # rated rows, one per id
    statuses: Counter
    categories: Counter  # rows per category
    pool: int  # rows that can be selected: status ok and a score
    pool_categories: Counter
    pool_scores: Counter  # pool rows per score value (to 0.001), for the pictures
    at_threshold: int  # pool rows scoring at least filter.threshold
    # The pool rows the mode may choose, in id order (id, _score, score_expected, category):
    # those at or above the threshold (threshold, subsample), the best k (top_k), or the whole pool
    # (random_k, balanced, which draw from or rank all of it).
    candidates: pa.Table
    dropped_suspect: int = 0  # rows ok but flagged as talking to the grader, left out (filter.drop_suspect)


def scan_rated(store: RatedStore, f: FilterConfig, category_of, k: int | None = None) -> RatedScan:
    """One pass over the rated parts, a batch at a time. The filter's memory is the rows the mode
    may choose and the rows not ok (few: they are how an id rated twice is found), not the run.

    An id has two rows only after a re-ask or retry was killed before it removed the rows it
    replaced; the better row counts (ok, parse_failed, request_failed, invalid_input, then the
    most attempts), as `rated.best_per_id` has it. Only rows not ok are ever replaced.
    """
    parts = store.parts()
    if not parts:
        raise FilterError(f"{store.uri}: no rated rows; run `alpagasus rate` first")
    names = pq.read_schema(parts[0], filesystem=store.fs).names
    missing = [c for c in (*(CHAT_REQUIRED if store.chat else REQUIRED), f.score) if c not in names]
    if missing:
        raise FilterError(f"{store.uri}: the rated rows lack column(s) {', '.join(missing)}")
    light = list(dict.fromkeys([C.ID, C.STATUS, C.ATTEMPTS, C.SCORE_EXPECTED, f.score, C.SUSPECT]))
    rows, statuses, categories, suspect = 0, Counter(), Counter(), 0
    pool, pool_categories, pool_scores, at_threshold = 0, Counter(), Counter(), 0
    not_ok, candidates = [], []
    top = _CANDIDATES_OF_MODE[f.mode]
    for batch in store.batches(light + category_of.columns, parts=parts):
        table = pa.Table.from_batches([batch])
        table = table.select(light).append_column(_SCORE, table[f.score]).append_column(CATEGORY, category_of(table))
        rows += table.num_rows
        statuses.update(value_counts(table[C.STATUS]))
        categories.update(value_counts(table[CATEGORY]))
        ok = pc.equal(table[C.STATUS], C.OK)
        not_ok.append(table.filter(pc.invert(ok)).select([C.ID, C.STATUS, C.ATTEMPTS, CATEGORY]))
        selectable = table.filter(pc.and_(ok, pc.is_valid(table[_SCORE])))
        if f.drop_suspect:  # rows flagged as talking to the grader are not part of the pool
            flagged = pc.is_valid(selectable[C.SUSPECT])
            suspect += pc.sum(flagged).as_py() or 0
            selectable = selectable.filter(pc.invert(flagged))
        selectable = selectable.select([C.ID, _SCORE, C.SCORE_EXPECTED, CATEGORY])
        pool += selectable.num_rows
        pool_categories.update(value_counts(selectable[CATEGORY]))
        pool_scores.update(value_counts(pc.round(selectable[_SCORE], 3)))
        at_threshold += pc.sum(pc.greater_equal(selectable[_SCORE], f.threshold)).as_py() or 0
        candidates = top(candidates + [selectable], f, k)
    not_ok = pa.concat_tables(not_ok)
    standing = _standing(store, not_ok)
    rows -= not_ok.num_rows - standing.num_rows
    statuses.subtract(value_counts(not_ok[C.STATUS]))
    statuses.update(value_counts(standing[C.STATUS]))
    categories.subtract(value_counts(not_ok[CATEGORY]))
    categories.update(value_counts(standing[CATEGORY]))
    candidates = pa.concat_tables(candidates).sort_by([(C.ID, "ascending")])
    if pc.count_distinct(candidates[C.ID]).as_py() != candidates.num_rows:
        counts = pc.value_counts(candidates[C.ID])
        rid = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        raise FilterError(f"{store.uri}: id {rid!r} has two rows rated ok; a rating writes one per id, "
                          "so the parts were changed by hand or mixed from two runs")
    return RatedScan(rows, +statuses, +categories, pool, pool_categories, pool_scores, at_threshold, candidates, suspect)


def _standing(store: RatedStore, not_ok: pa.Table) -> pa.Table:
    """Of the rows not ok, those no better row of their id replaces (see `scan_rated`)."""
    if not not_ok.num_rows:
        return not_ok
    rated_ok = [b.column(0) for b in store.batches(
        [C.ID], (pc.field(C.STATUS) == C.OK) & pc.field(C.ID).isin(pc.unique(not_ok[C.ID])))]
    best = best_per_id(not_ok)
    return best.filter(pc.invert(pc.is_in(best[C.ID], value_set=pa.chunked_array(rated_ok, pa.string()).combine_chunks())))


def _at_or_above(tables: list[pa.Table], f: FilterConfig, k: int | None) -> list[pa.Table]:
    """The rows scoring at least `filter.threshold`: the last batch's, beside those held."""
    return [*tables[:-1], tables[-1].filter(pc.greater_equal(tables[-1][_SCORE], f.threshold))]


def _all(tables: list[pa.Table], f: FilterConfig, k: int | None) -> list[pa.Table]:
    """The whole pool (random_k draws by position in it; balanced ranks it per category)."""
    return tables


def _best_k(tables: list[pa.Table], f: FilterConfig, k: int | None) -> list[pa.Table]:
    """The best k rows so far by `selection.rank_order` (k: `filter.k`, or the size of
    `filter.k_from`), cut once they pile up."""
    held = sum(t.num_rows for t in tables)
    if k is None or held <= max(2 * k, SCAN_BATCH_ROWS):
        return tables
    table = pa.concat_tables(tables)
    expected = pc.fill_null(table[C.SCORE_EXPECTED], float("-inf"))  # a row without one ranks after those with
    ranked = pa.table({"s": table[_SCORE], "e": expected, "i": table[C.ID]})
    order = pc.sort_indices(ranked, sort_keys=[("s", "descending"), ("e", "descending"), ("i", "ascending")])
    return [table.take(order.slice(0, k))]


_CANDIDATES_OF_MODE = {"threshold": _at_or_above, "subsample": _at_or_above, "top_k": _best_k,
                       "random_k": _all, "balanced": _all}


def _pool_rows_at_or_above(store: RatedStore, score: str, tau: float) -> int:
    return sum(b.num_rows for b in store.batches([C.ID], (pc.field(C.STATUS) == C.OK) & (pc.field(score) >= tau)))


# Chosen rows whose text is gathered at a time when the selection is written.
RANGE_ROWS = 16_384
_POSITION = "_position"


def _with_text(store: RatedStore, chosen: pa.Table) -> Iterator[pa.Table]:
    """The chosen rows with their text, in the order chosen, `RANGE_ROWS` at a time (columns
    instruction, input, output, id, score: those of selected.json; for conversations messages,
    formatting, id, score).

    One scan reads the text of the chosen ids and spreads it into a temporary file per range of
    positions in the chosen order; then each range is read back and put in order. What is held is
    the text of one range, not of the whole selection (a fifth of 520k rows: about 100 MB).
    """
    ids = chosen[C.ID].combine_chunks()
    names = [C.MESSAGES, C.FORMATTING] if store.chat else [C.INSTRUCTION, C.INPUT, C.OUTPUT]
    text = [store.schema.field(n) for n in names]
    schema = pa.schema([(_POSITION, pa.int64()), *text])
    with tempfile.TemporaryDirectory(prefix="alpagasus-selected-") as tmp:
        writers = {}
        try:
            for batch in store.batches([C.ID, *names], pc.field(C.ID).isin(ids)):
                position = pc.index_in(batch.column(0), value_set=ids).cast(pa.int64())
                found = pa.Table.from_arrays([position, *batch.columns[1:]], schema=schema)
                ranges = pc.divide(position, RANGE_ROWS)
                for r in pc.unique(ranges).to_pylist():
                    if r not in writers:
                        writers[r] = pa.ipc.new_stream(os.path.join(tmp, f"{r}.arrow"), schema)
                    writers[r].write_table(found.filter(pc.equal(ranges, r)))
        finally:
            for writer in writers.values():
                writer.close()
        for r, start in enumerate(range(0, len(ids), RANGE_ROWS)):
            count = min(RANGE_ROWS, len(ids) - start)
            found = pa.ipc.open_stream(os.path.join(tmp, f"{r}.arrow")).read_all() if r in writers else schema.empty_table()
            # an id in two parts (a killed re-ask) has the same text twice: the first is taken
            where = pc.index_in(pa.array(range(start, start + count), pa.int64()), value_set=found[_POSITION])
            if where.null_count:
                raise RuntimeError(f"{store.uri}: {where.null_count} chosen rows vanished from the parts while reading")
            rows = found.take(where)
            yield pa.table({**{n: rows[n] for n in names},
                            C.ID: ids.slice(start, count), C.SCORE: chosen[_SCORE].slice(start, count)})


def _choose(candidates: pa.Table, scan: RatedScan, f: FilterConfig, k: int | None) -> list[int]:
    """Rows of `candidates` to keep, in id order: the same rows as the rules of `selection` give
    over the whole pool."""
    scores = candidates[_SCORE].to_pylist()
    n = len(scores)
    if f.mode == "threshold":  # the candidates are the rows at or above it
        chosen = list(range(n))
    elif f.mode == "subsample":  # drawn by position from the threshold rows, as over the pool
        chosen = selection.random_k(range(n), _check_k(k, n, f"the rows scoring >= {f.threshold:g}"), f.seed)
    elif f.mode == "top_k":
        chosen = selection.top_k(scores, candidates[C.SCORE_EXPECTED].to_pylist(), candidates[C.ID].to_pylist(),
                                 _check_k(k, scan.pool, "the ok rows"))
    elif f.mode == "random_k":
        chosen = selection.random_k(range(n), _check_k(k, n, "the ok rows"), f.seed)
    else:  # balanced
        categories = candidates[CATEGORY].to_pylist()
        unknown = set(f.category_quota) - set(categories)
        if unknown:
            raise FilterError(f"filter.category_quota names categories with no ok row: {sorted(unknown)}")
        order = selection.rank_order(scores, candidates[C.SCORE_EXPECTED].to_pylist(), candidates[C.ID].to_pylist())
        chosen = selection.with_category_floor(selection.threshold(scores, f.threshold), order, categories,
                                               f.category_floor, f.category_quota)
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


def _check_k(k: int, available: int, what: str) -> int:
    if k > available:
        raise FilterError(f"filter.k={k:,} is more than {what} ({available:,})")
    return k


class _KeywordCategory:
    """A rated row's category by the keyword rules (the paper's App. E), from its text."""

    def __init__(self, keywords: dict[str, list[str]], chat: bool = False):
        self.keywords, self.chat = keywords, chat
        self.columns = [C.MESSAGES] if chat else [C.INSTRUCTION, C.INPUT, C.OUTPUT]

    def __call__(self, table: pa.Table) -> pa.Array:
        if self.chat:  # the text of every turn
            texts = ["\n".join(t["content"] for t in turns or ()) for turns in table[C.MESSAGES].to_pylist()]
        else:
            texts = ["\n".join(r) for r in zip(*(table[c].to_pylist() for c in self.columns))]
        return pa.array([selection.keyword_category(text, self.keywords) for text in texts], pa.string())


class _FieldCategory:
    """A rated row's category from a field of the input rows, joined by id (held for every input
    row: a field such as Dolly's category is for inputs of that size)."""

    columns: list[str] = []

    def __init__(self, config: Config):
        from alpagasus_ray.store.inputs import read_rows

        field = config.filter.category_field
        source = read_rows(config.data, extra_fields=(field,)).table
        self.by_id = dict(zip(source[C.ID].to_pylist(), source[field].to_pylist()))
        if not any(v is not None for v in self.by_id.values()):
            raise FilterError(f"filter.category_field={field!r}: no row of {config.data.path} has it")

    def __call__(self, table: pa.Table) -> pa.Array:
        return pa.array([self.by_id.get(i) or "(none)" for i in table[C.ID].to_pylist()], pa.string())


def _category_reader(config: Config, chat: bool = False):
    f = config.filter
    return _FieldCategory(config) if f.category_field else _KeywordCategory(f.category_keywords, chat)


def _per_category(rows: Counter, ok: Counter, kept: Counter) -> dict[str, dict]:
    return {
        c: {"rows": rows[c], "ok": ok[c], "kept": kept[c],
            "kept_fraction": round(kept[c] / rows[c], 4), "filter_ratio": round(1 - kept[c] / rows[c], 4)}
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


def _write_outputs(run_dir: str, selected: Callable[[], Iterable[pa.Table]], record: dict, pool_scores: Counter,
                   kept_at_tau: int, f: FilterConfig, writer: ChatWriter | None = None) -> None:
    """Write every output into a temporary directory, then move them in place together. A run
    directory on an object store gets them copied, selection.json (the record) last.
    `selected()` gives the selected rows, a slice at a time."""
    if not is_local(run_dir):
        with tempfile.TemporaryDirectory(prefix="alpagasus-filter-") as local:
            _write_outputs(local, selected, record, pool_scores, kept_at_tau, f, writer)
            fs, root = open_filesystem(run_dir)
            staged = RunDir(local)
            names = [*(os.path.join("plots", n) for n in sorted(os.listdir(staged.plots)) if f.plots),
                     os.path.basename(staged.selected_json), os.path.basename(staged.selected_jsonl),
                     os.path.basename(staged.selection)]
            for name in names:
                with open(os.path.join(local, name), "rb") as src, fs.open_output_stream(f"{root}/{name}") as dst:
                    shutil.copyfileobj(src, dst)
        return
    os.makedirs(run_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".filter-", dir=run_dir)
    staged, final = RunDir(tmp), RunDir(run_dir)  # written in a directory of the same layout, then moved
    try:
        if writer is None:
            write_selected(selected(), staged.selected_json, staged.selected_jsonl)
        else:
            writer.write(selected(), staged.selected_json, staged.selected_jsonl)
            record["assistant_turns_selected"] = writer.turns
        if f.plots:
            _plot(staged.plots, record, pool_scores, kept_at_tau, f)
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


WRITE_ROWS = 4096  # rows turned into Python objects at a time while writing


def write_selected(selected: Iterable[pa.Table], json_path: str, jsonl_path: str,
                   as_json: Callable[[dict], dict] | None = None, as_jsonl: Callable[[dict], dict] | None = None) -> None:
    """The rows of the tables `selected` as a JSON array (indented by one, as
    `json.dump(rows, indent=1)` writes it) and as JSON lines, a slice of rows at a time; `as_json`
    and `as_jsonl` shape a row for each file (the row as it is when None).

    >>> import tempfile; d = tempfile.mkdtemp()
    >>> rows = [{"instruction": "Say \\"hi\\"\\n", "input": "", "output": "héllo", "id": "a", "score": 4.5},
    ...         {"instruction": "b", "input": "c", "output": "d", "id": "b", "score": 5.0}]
    >>> write_selected([pa.Table.from_pylist(rows[:1]), pa.Table.from_pylist(rows[1:])], f"{d}/s.json", f"{d}/s.jsonl")
    >>> open(f"{d}/s.json", encoding="utf-8").read() == json.dumps(rows, ensure_ascii=False, indent=1)
    True
    >>> [json.loads(line) for line in open(f"{d}/s.jsonl", encoding="utf-8")] == rows
    True
    """
    with open(json_path, "w", encoding="utf-8") as array, open(jsonl_path, "w", encoding="utf-8") as lines:
        array.write("[")
        written = 0
        for table in selected:
            for start in range(0, table.num_rows, WRITE_ROWS):
                for row in table.slice(start, WRITE_ROWS).to_pylist():
                    array.write(",\n" if written else "\n")
                    shaped = as_json(row) if as_json else row
                    array.write(textwrap.indent(json.dumps(shaped, ensure_ascii=False, indent=1), " "))
                    lines.write(json.dumps(as_jsonl(row) if as_jsonl else row, ensure_ascii=False) + "\n")
                    written += 1
        array.write("\n]" if written else "]")


class ChatWriter:
    """Writes selected conversations: `selected.json` in the layout they were read in (`messages`
    in, `messages` out; ShareGPT in, ShareGPT out; with `data.columns` applied), and
    `selected.jsonl` as `messages` lists, as TRL's SFTTrainer and axolotl's chat_template read
    them; each with its id and score. Counts the assistant turns written (`turns`)."""

    def __init__(self, config: Config):
        self.layouts = {f: turns_for(f, config.data) for f in CONVERSATIONS}
        # Each role under its first name in the layout, as the input has it.
        self.names = {f: {role: name for name, role in reversed(layout.roles.items())}
                      for f, layout in self.layouts.items()}
        self.turns = 0

    def write(self, selected: Iterable[pa.Table], json_path: str, jsonl_path: str) -> None:
        write_selected(selected, json_path, jsonl_path, self.as_read, self.as_messages)

    def as_messages(self, row: dict) -> dict:
        self.turns += sum(t["role"] == "assistant" for t in row[C.MESSAGES])
        return {C.MESSAGES: row[C.MESSAGES], C.ID: row[C.ID], C.SCORE: row[C.SCORE]}

    def as_read(self, row: dict) -> dict:
        layout, names = self.layouts[row[C.FORMATTING]], self.names[row[C.FORMATTING]]
        turns = list(row[C.MESSAGES])
        shaped = {}
        if layout.system_column and turns and turns[0]["role"] == SYSTEM:
            shaped[layout.system_column] = turns.pop(0)["content"]
        shaped[layout.column] = [{layout.role: names[t["role"]], layout.content: t["content"]} for t in turns]
        return {**shaped, C.ID: row[C.ID], C.SCORE: row[C.SCORE]}


def _plot(out: str, record: dict, pool_scores: Counter, kept_at_tau: int, f: FilterConfig) -> None:
    tau = f.threshold if f.mode in ("threshold", "subsample", "balanced") else record["min_selected_score"]
    label = "logprob-weighted score" if f.score == C.SCORE_EXPECTED else "score"
    noun = "conversations" if record["rows_are"] == "conversations" else "rows"
    turns = record.get("assistant_turns_selected")
    kept = f"{record['selected']:,} of {record['rows_rated']:,} {noun}" + (f", {turns:,} assistant turns" if turns else "")
    plots.score_histogram(pool_scores, tau, os.path.join(out, "score_histogram.png"),
                          f"{label} of {record['pool']:,} rated {noun}")
    plots.tau_curve(pool_scores, tau, kept_at_tau, os.path.join(out, "tau_curve.png"),
                    f"{noun} kept by threshold ({label})")
    plots.category_kept(record["per_category"], record["kept_fraction_of_rated"],
                        os.path.join(out, "category_kept.png"), f"kept per category ({f.mode}: {kept})")
