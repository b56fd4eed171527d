"""Reading instruction-tuning rows: Alpaca-style JSON arrays, JSONL and Parquet, local or remote.

Every input row comes out as exactly one row, either ready to rate or set aside with the reason
(`invalid_reason`); a file that cannot be read at all raises `InputError` before anything is sent.
Every row gets a stable `id`: the input's own when it has one, else one derived from its content.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from alpagasus_ray import columns as C
from alpagasus_ray.config import DataConfig
from alpagasus_ray.errors import InputError, user_error
from alpagasus_ray.store.formatting import ALPACA, DETECT_ROWS, clean, content_id, detect, normalize
from alpagasus_ray.store.layout import open_filesystem
from alpagasus_ray.store.rated import MESSAGES_TYPE

log = logging.getLogger(__name__)

INVALID_REASON = "invalid_reason"
# The status a row set aside gets: invalid_input (its shape), or too_long (a stage's `check`).
SET_ASIDE_STATUS = "set_aside_status"
# A row's place in the input (file index << 32 | row index): orders rows across files and blocks.
POSITION = "_position"
# Bytes a rating prompt adds to each turn it shows, at most: its label ("[Assistant: the response
# to rate]") and the blank line between turns.
TURN_LABEL_BYTES = 40
# Rows per block read: small enough to stream, large enough that per-block costs do not show.
BLOCK_ROWS = 2048
BUILTIN_PREFIX = "builtin:"
SAMPLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample")  # in the package
EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


@dataclass
class Rows:
    """The rows of one input, in input order, with what was noticed while reading them."""

    table: pa.Table  # id, instruction, input, output, source, invalid_reason
    files: list[str]
    duplicate_ids: dict[str, list[str]] = field(default_factory=dict)  # id -> sources of its repeats

    @property
    def num_invalid(self) -> int:
        return self.table.num_rows - self.table[INVALID_REASON].null_count


def read_rows(cfg: DataConfig, extra_fields: tuple[str, ...] = ()) -> Rows:
    """Read every file of `cfg.path` into one table of rows (see `Rows`), in this process.

    For inputs that fit in memory (a selection to train on, a category field to join); the
    rating stage reads through `input_dataset` on Ray workers instead. `extra_fields` are input
    fields kept as string columns beside the text (e.g. Dolly's `category`); missing ones are null.

    Raises:
        InputError: a path that matches no file, an empty or unreadable file, a JSON array that
            does not parse. Row-level problems never raise: the row is kept with its reason.
    """
    files = list_files(cfg.path)
    blocks = list(_read_files(files, range(len(files)), cfg, extra_fields, cfg.limit))
    if not blocks or sum(b.num_rows for b in blocks) == 0:
        raise InputError(f"{cfg.path}: no rows found")
    table = pa.concat_tables(blocks)
    ids = table[C.ID].to_pylist()
    positions = table[POSITION].to_pylist()
    seen: dict[str, list[int]] = {}
    for rid, pos in zip(ids, positions):
        seen.setdefault(rid, []).append(pos)
    repeats = {rid: p for rid, p in seen.items() if len(p) > 1}
    table = suffix_repeats(table, repeats)
    formattings = dict(zip((p >> 32 for p in positions), table[C.FORMATTING].to_pylist()))
    _check_one_kind(cfg, {files[i]: f for i, f in sorted(formattings.items())})
    sources = dict(zip(positions, table[C.SOURCE].to_pylist()))
    duplicates = {rid: [sources[p] for p in pos] for rid, pos in repeats.items()}
    return Rows(table=table.drop_columns([POSITION]), files=files, duplicate_ids=duplicates)


def suffix_repeats(block: pa.Table, repeats: dict[str, list[int]]) -> pa.Table:
    """Give repeated ids a '~N' suffix (N = 2, 3, ... in input order) so every row stays addressable.

    `repeats` holds each repeated id with the positions (`POSITION`) of all its rows, in input
    order; the first row keeps the id. The same input always gives the same ids.
    """
    if not repeats:
        return block
    ids = block[C.ID].to_pylist()
    for i, (rid, pos) in enumerate(zip(ids, block[POSITION].to_pylist())):
        where = repeats.get(rid)
        if where is not None and where[0] != pos:
            ids[i] = f"{rid}~{where.index(pos) + 1}"
    return block.set_column(block.schema.get_field_index(C.ID), C.ID, pa.array(ids, pa.string()))


def row_schema(extra_fields: tuple[str, ...] = ()) -> pa.Schema:
    """The columns of a read row: an alpaca row fills instruction, input and output, a conversation
    `messages`; `POSITION` orders rows across files and is dropped before output."""
    names = [C.ID, C.INSTRUCTION, C.INPUT, C.OUTPUT]
    after = [C.FORMATTING, C.SOURCE, INVALID_REASON, SET_ASIDE_STATUS, *extra_fields]
    return pa.schema([*((n, pa.string()) for n in names), (C.MESSAGES, MESSAGES_TYPE),
                      *((n, pa.string()) for n in after), (POSITION, pa.int64())])


def _read_files(files: list[str], indices, cfg: DataConfig, extra_fields: tuple[str, ...],
                limit: int | None, rows_per_block: int = BLOCK_ROWS) -> Iterator[pa.Table]:
    """Blocks of normalized rows of `files` (their indices in the whole input are `indices`), in
    order, up to `limit` rows."""
    schema = row_schema(extra_fields)
    taken = 0
    for path, file_index in zip(files, indices):
        fmt = cfg.format if cfg.format != "auto" else EXTENSIONS.get(_extension(path), "jsonl")
        items = _read_file(path, fmt)
        formatting, chosen_by = cfg.formatting, ""
        if formatting == "auto":
            first = list(itertools.islice(items, DETECT_ROWS))
            formatting = detect([item for _, item in first], cfg)
            chosen_by = " (data.formatting=auto chose it from the file's first rows)"
            items = itertools.chain(first, items)
        records = []
        for index, (source, item) in enumerate(items):
            record = _normalize(source, item, formatting, cfg, chosen_by)
            for name in extra_fields:
                value = item.get(name) if isinstance(item, dict) else None
                record[name] = None if value is None else clean(str(value))
            record[POSITION] = (file_index << 32) | index
            records.append(record)
            taken += 1
            if len(records) == rows_per_block or taken == limit:
                yield pa.Table.from_pylist(records, schema=schema)
                records = []
            if taken == limit:
                return
        if records:
            yield pa.Table.from_pylist(records, schema=schema)


def list_files(path: str) -> list[str]:
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        for extension in (".json", ".jsonl"):
            sample = os.path.join(SAMPLE_DIR, f"{name}{extension}")
            if os.path.isfile(sample):
                return [sample]
        raise InputError(f"{path}: no such built-in sample (there are builtin:alpaca_sample and builtin:chat_sample)")
    if "://" not in path and any(ch in path for ch in "*?["):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise InputError(f"{path}: the pattern matches no file")
        return files
    fs, inner = _filesystem(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{path}: no such file or directory")
    if info.type == pafs.FileType.Directory:
        found = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
        files = sorted(
            _rejoin(path, inner, f.path) for f in found
            if f.type == pafs.FileType.File and _extension(f.path) in EXTENSIONS
            and not os.path.basename(f.path).startswith((".", "_"))
        )
        if not files:
            raise InputError(f"{path}: the directory holds no .json, .jsonl or .parquet file")
        return files
    return [path]


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    try:
        return open_filesystem(path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise InputError(f"{path}: cannot open this filesystem: {e}") from None


def _rejoin(original: str, inner_root: str, inner_file: str) -> str:
    """Give a listed file the same form (URI or relative path) as the directory it came from."""
    return original.rstrip("/") + "/" + inner_file[len(inner_root.rstrip("/")) + 1:]


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _read_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its end) of a text file, read in chunks: a file of any size streams."""
    fs, inner = _filesystem(path)
    try:
        with fs.open_input_stream(inner) as stream:
            pending, lineno = b"", 0
            while chunk := stream.read(1 << 24):
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    lineno += 1
                    yield lineno, line.rstrip(b"\r")
            if pending:
                yield lineno + 1, pending.rstrip(b"\r")
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: cannot read: {e}") from None


def _read_file(path: str, fmt: str) -> Iterator[tuple[str, Any]]:
    """Yield (source, item) for each row of one file; item is the parsed row or an `_Unreadable`."""
    if fmt == "parquet":
        yield from _read_parquet(path)
        return
    lines = _read_lines(path)
    first = next((item for item in lines if item[1].strip()), None)
    if first is None:
        raise InputError(f"{path}: the file is empty")
    lineno, line = first
    line = line.removeprefix(b"\xef\xbb\xbf")
    if fmt == "json" and line.lstrip().startswith(b"["):
        # A JSON array is parsed whole (on the worker that reads this file).
        data = b"\n" * (lineno - 1) + line + b"\n" + b"\n".join(rest for _, rest in lines)
        try:
            items = json.loads(data.decode("utf-8", "surrogateescape"))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None
        for index, item in enumerate(items):
            yield f"{path}[{index}]", item
        return
    for lineno, line in itertools.chain([(lineno, line)], lines):
        if not line.strip():
            continue
        # surrogateescape keeps bytes that are not UTF-8, so the row holding them is set aside, not the file.
        text = line.decode("utf-8", "surrogateescape")
        try:
            yield f"{path}:{lineno}", json.loads(text)
        except json.JSONDecodeError as e:
            yield f"{path}:{lineno}", _Unreadable(f"not valid JSON ({e.msg} at column {e.colno})", text)


def _read_parquet(path: str) -> Iterator[tuple[str, Any]]:
    fs, inner = _filesystem(path)
    try:
        parquet = pq.ParquetFile(inner, filesystem=fs)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: not a readable Parquet file: {e}") from None
    index = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield f"{path}[{index}]", row
            index += 1


@dataclass(frozen=True)
class _Unreadable:
    reason: str
    raw: str


def _normalize(source: str, item: Any, formatting: str, cfg: DataConfig, chosen_by: str) -> dict[str, Any]:
    """One input item as a flat record; problems go to `invalid_reason`, the row is kept."""
    record = {C.ID: None, C.INSTRUCTION: None, C.INPUT: None, C.OUTPUT: None, C.MESSAGES: None,
              C.FORMATTING: formatting, C.SOURCE: source, INVALID_REASON: None, SET_ASIDE_STATUS: None}
    if formatting == ALPACA:
        record.update(dict.fromkeys(C.TEXT_FIELDS, ""))
    else:
        record[C.MESSAGES] = []
    if isinstance(item, _Unreadable):
        record[INVALID_REASON] = item.reason
        record[C.ID] = content_id("", "", clean(item.raw))
        return record
    normalized = normalize(item, formatting, cfg, chosen_by)
    record[INVALID_REASON] = normalized.pop("reason")
    record.update(normalized)
    if record[INVALID_REASON] is not None:
        record[SET_ASIDE_STATUS] = C.INVALID_INPUT
    return record


# On Ray Data: the same reading, done by read tasks on the workers (one per file), so the driver
# holds counts, not rows.


def input_dataset(cfg: DataConfig, files: list[str], repeats: dict[str, list[int]] | None = None,
                  extra_fields: tuple[str, ...] = (), rows_per_block: int = BLOCK_ROWS, check=None):
    """A Ray Dataset of the rows of `files` (the columns of `row_schema`), read on the workers.

    `repeats` (from `scan_input`) gives repeated ids their '~N' suffix as the rows are read, so
    ids are final the moment a row exists. `check` (a block -> block function) may set aside
    more rows as they are read, e.g. those too long for the grader. With `cfg.limit` one task
    reads the files in order. Blocks hold up to `rows_per_block` rows.
    """
    import ray

    # A quarter CPU per read task: beside a vLLM engine (a whole CPU on a CPU node), its light
    # stages and the API actors, a two-core machine still runs every stage at once.
    source = _InputSource(cfg, files, repeats or {}, extra_fields, rows_per_block, check)
    # As many blocks as read tasks: Ray would otherwise split each task's output into many tiny blocks.
    tasks = 1 if cfg.limit is not None else len(files)
    return ray.data.read_datasource(source, num_cpus=0.25, override_num_blocks=tasks)


def _input_source_class():
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class InputSource(Datasource):
        """Instruction-tuning rows of JSON, JSONL and Parquet files, normalized as they are read."""

        def __init__(self, cfg, files, repeats, extra_fields, rows_per_block, check):
            super().__init__()
            self.cfg, self.files, self.repeats, self.extra_fields = cfg, files, repeats, extra_fields
            self.rows_per_block, self.check = rows_per_block, check

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            indices = list(range(len(self.files)))
            groups = [indices] if self.cfg.limit is not None else [[i] for i in indices]
            tasks = []
            for group in groups:
                files = [self.files[i] for i in group]
                read = functools.partial(_read_task, files, group, self.cfg, self.extra_fields, self.repeats,
                                         self.rows_per_block, self.check)
                meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=files, exec_stats=None)
                tasks.append(ReadTask(read, meta, schema=row_schema(self.extra_fields)))
            return tasks

        def get_name(self):
            return "ReadInput"

    return InputSource


def _InputSource(*args):
    return _input_source_class()(*args)


def _read_task(files, indices, cfg, extra_fields, repeats, rows_per_block, check) -> Iterator[pa.Table]:
    for block in _read_files(files, indices, cfg, extra_fields, cfg.limit, rows_per_block):
        block = suffix_repeats(block, repeats)
        yield check(block) if check is not None else block


@dataclass
class InputScan:
    """What a pass over the input found: counts, the repeated ids, the first rows set aside."""

    files: list[str]
    rows: int
    invalid: int  # rows set aside: invalid_input, or too_long
    text_bytes: int  # UTF-8 bytes of instruction + input + output (or all turns) of the rows that can be rated
    repeats: dict[str, list[int]]  # repeated id -> positions of its rows, in input order
    repeat_sources: dict[str, list[str]]  # repeated id -> sources of its rows (at most 20 ids)
    invalid_examples: list[dict]  # source and reason of the first rows set aside
    formattings: dict[str, str] = field(default_factory=dict)  # file -> the formatting it was read as
    turns: int = 0  # assistant turns of the conversations that can be rated
    turn_bytes: int = 0  # bytes the assistant turns are sent with, each with the turns before it and their labels
    too_long: int = 0  # rows set aside as too long for the grader (by the scan's `check`)

    @property
    def conversations(self) -> bool:
        """Whether the rows are conversations (an input is all conversations or all alpaca rows)."""
        return any(f != ALPACA for f in self.formattings.values())

    @property
    def valid(self) -> int:
        return self.rows - self.invalid


def scan_input(cfg: DataConfig, check=None) -> InputScan:
    """Read the input once on the workers, keeping a thin copy of each row (id, position, source,
    reason, size) in Ray's object store; count it, and find its repeated ids with a Ray Data
    aggregation. The driver receives a small row per block and the repeats only. `check` is
    `input_dataset`'s.

    Raises:
        InputError: a file cannot be read at all, or the input has no rows.
    """
    from ray.data.expressions import col

    files = list_files(cfg.path)
    with reading_errors():
        thin = input_dataset(cfg, files, check=check).map_batches(_thin, batch_format="pyarrow", batch_size=None).materialize()
    per_block = thin.map_batches(_block_counts, batch_format="pyarrow", batch_size=None).take_all()
    rows = sum(b["rows"] for b in per_block)
    if rows == 0:
        raise InputError(f"{cfg.path}: no rows found")
    # A partition per ~100k rows: Ray's default of 200 costs seconds on a small input.
    partitions = max(1, min(200, rows // 100_000))
    with sort_shuffle():
        repeated = thin.groupby(C.ID, num_partitions=partitions).count().filter(expr=col("count()") > 1).take_all()
    repeats, repeat_sources = {}, {}
    if repeated:
        ids = [r[C.ID] for r in repeated]
        found = thin.select_columns([C.ID, POSITION, C.SOURCE]).filter(expr=col(C.ID).is_in(ids)).take_all()
        for r in sorted(found, key=lambda r: r[POSITION]):
            repeats.setdefault(r[C.ID], []).append(r[POSITION])
            if len(repeat_sources) < 20 or r[C.ID] in repeat_sources:
                repeat_sources.setdefault(r[C.ID], []).append(r[C.SOURCE])
    examples = [e for b in per_block for e in json.loads(b["invalid_examples"])]
    formattings = {files[int(i)]: f for b in per_block for i, f in json.loads(b["formattings"]).items()}
    _check_one_kind(cfg, formattings)
    return InputScan(
        files=files, rows=rows, invalid=sum(b["invalid"] for b in per_block),
        text_bytes=sum(b["text_bytes"] for b in per_block), repeats=repeats, repeat_sources=repeat_sources,
        invalid_examples=sorted(examples, key=lambda e: e["position"])[:3],
        formattings={f: formattings[f] for f in files if f in formattings},
        turns=sum(b["turns"] for b in per_block), turn_bytes=sum(b["turn_bytes"] for b in per_block),
        too_long=sum(b["too_long"] for b in per_block),
    )


def _check_one_kind(cfg: DataConfig, formattings: dict[str, str]) -> None:
    """Say how each file was read; an input mixing alpaca rows and conversations is an error."""
    kinds: dict[str, list[str]] = {}
    for path, formatting in formattings.items():
        kinds.setdefault(formatting, []).append(path)
    how = "data.formatting=auto, from each file's first rows" if cfg.formatting == "auto" else "data.formatting"
    for formatting, paths in kinds.items():
        named = paths[0] if len(paths) == 1 else f"{len(paths)} files ({paths[0]}, ...)"
        log.info("data: %s read as %s (%s)", named, formatting, how)
    if ALPACA in kinds and len(kinds) > 1:
        other = next(k for k in kinds if k != ALPACA)
        raise InputError(f"the input mixes alpaca rows ({kinds[ALPACA][0]}) and {other} conversations "
                         f"({kinds[other][0]}): rate them in separate runs, or set data.formatting")


def _thin(block: pa.Table) -> pa.Table:
    """What the scan keeps of a row: no text, only the size of a row that can be rated."""
    import pyarrow.compute as pc

    size = pc.add(pc.add(pc.binary_length(block[C.INSTRUCTION]), pc.binary_length(block[C.INPUT])),
                  pc.binary_length(block[C.OUTPUT]))
    turn_bytes, turns, sent_bytes = (pa.array(v, pa.int64()) for v in _conversation_sizes(block[C.MESSAGES]))
    sizes = {"bytes": pc.coalesce(pc.cast(size, pa.int64()), turn_bytes), "turns": turns, "turn_bytes": sent_bytes}
    invalid = pc.is_valid(block[INVALID_REASON])
    thin = block.select([C.ID, POSITION, C.SOURCE, INVALID_REASON, SET_ASIDE_STATUS, C.FORMATTING])
    for name, values in sizes.items():
        thin = thin.append_column(name, pc.if_else(invalid, 0, values))
    return thin


def _conversation_sizes(messages: pa.ChunkedArray) -> tuple[list[int], list[int], list[int]]:
    """Of each conversation (0 for a row that is not one): the UTF-8 bytes of its turns, its
    assistant turns, and the bytes each assistant turn is sent with (the turns up to it, each with
    the label a rating prompt shows it under)."""
    if messages.null_count == len(messages):  # alpaca rows: no conversation to measure
        return [0] * len(messages), [0] * len(messages), [0] * len(messages)
    sizes, turns, turn_bytes = [], [], []
    for conversation in messages.to_pylist():
        total = shown = answers = sent = 0
        for turn in conversation or ():
            size = len(turn["content"].encode("utf-8"))
            total += size
            shown += size + TURN_LABEL_BYTES
            if turn["role"] == "assistant":
                answers += 1
                sent += shown
        sizes.append(total)
        turns.append(answers)
        turn_bytes.append(sent)
    return sizes, turns, turn_bytes


def _block_counts(block: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    invalid = pc.is_valid(block[INVALID_REASON])
    first = block.filter(invalid).slice(0, 3).to_pylist()
    examples = [{"source": r[C.SOURCE], "reason": r[INVALID_REASON], "position": r[POSITION]} for r in first]
    files = pc.shift_right(block[POSITION], 32).to_pylist()
    formattings = dict(zip(files, block[C.FORMATTING].to_pylist()))  # file index -> how it was read
    too_long = pc.sum(pc.equal(block[SET_ASIDE_STATUS], C.TOO_LONG)).as_py() or 0
    return pa.table({"rows": [block.num_rows], "invalid": [pc.sum(invalid).as_py() or 0], "too_long": [too_long],
                     "text_bytes": [pc.sum(block["bytes"]).as_py() or 0], "turns": [pc.sum(block["turns"]).as_py() or 0],
                     "turn_bytes": [pc.sum(block["turn_bytes"]).as_py() or 0], "invalid_examples": [json.dumps(examples)],
                     "formattings": [json.dumps(formattings)]})


@contextlib.contextmanager
def sort_shuffle():
    """Ray Data's groupings in this block shuffle by sorting, as tasks: the hash shuffle's
    aggregator actors take seconds to start, and on a CPU node they wait for cores."""
    from ray.data.context import DataContext, ShuffleStrategy

    context = DataContext.get_current()
    strategy, context.shuffle_strategy = context.shuffle_strategy, ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        context.shuffle_strategy = strategy


@contextlib.contextmanager
def reading_errors():
    """An `InputError` raised by a read task on a worker reaches the driver as itself."""
    try:
        yield
    except Exception as e:  # Ray wraps what a task raised, its text the worker's traceback
        cause = user_error(e)
        if not isinstance(cause, InputError):
            raise
        raise InputError(str(cause)) from None
