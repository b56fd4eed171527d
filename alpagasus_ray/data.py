"""Reading instruction-tuning rows: Alpaca-style JSON arrays, JSONL and Parquet, local or remote.

Every input row comes out as exactly one row, either ready to rate or set aside with the reason
(`invalid_reason`); a file that cannot be read at all raises `InputError` before anything is sent.
Every row gets a stable `id`: the input's own when it has one, else one derived from its content.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from alpagasus_ray import columns as C
from alpagasus_ray.config import DataConfig

INVALID_REASON = "invalid_reason"
BUILTIN_PREFIX = "builtin:"
SAMPLE_DIR = os.path.join(os.path.dirname(__file__), "sample")
# Dolly 15k names its fields differently; mapped before `data.field_map`.
DOLLY_NAMES = {"context": C.INPUT, "response": C.OUTPUT}
EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
# Lone surrogates: bytes that were not valid UTF-8 (kept by surrogateescape) or "\udXXX" escapes.
_SURROGATE = re.compile("[\ud800-\udfff]")


class InputError(ValueError):
    """An input that cannot be read at all. The message names the file (and line) and what to do."""


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
    """Read every file of `cfg.path` into one table of rows (see `Rows`).

    `extra_fields` are input fields kept as string columns beside the text (e.g. Dolly's
    `category`); missing ones are null.

    Raises:
        InputError: a path that matches no file, an empty or unreadable file, a JSON array that
            does not parse. Row-level problems never raise: the row is kept with its reason.
    """
    files = _list_files(cfg.path)
    records: list[dict[str, Any]] = []
    for path in files:
        fmt = cfg.format if cfg.format != "auto" else EXTENSIONS.get(_extension(path), "jsonl")
        for source, item in _read_file(path, fmt):
            record = _normalize(source, item, cfg)
            for name in extra_fields:
                value = item.get(name) if isinstance(item, dict) else None
                record[name] = None if value is None else _clean(str(value))
            records.append(record)
            if cfg.limit is not None and len(records) >= cfg.limit:
                break
        if cfg.limit is not None and len(records) >= cfg.limit:
            break
    if not records:
        raise InputError(f"{cfg.path}: no rows found")
    duplicates = _make_ids_unique(records)
    names = [C.ID, C.INSTRUCTION, C.INPUT, C.OUTPUT, C.SOURCE, INVALID_REASON, *extra_fields]
    table = pa.table({name: pa.array([r[name] for r in records], pa.string()) for name in names})
    return Rows(table=table, files=files, duplicate_ids=duplicates)


def content_id(instruction: str, input: str, output: str) -> str:
    """A stable id from a row's content: the same text always gives the same id.

    >>> content_id("Add 2 and 2.", "", "4")
    '6d243927c1e88246'
    >>> content_id("Add 2 and 2.", "", "4") == content_id("Add 2 and 2", ".", "4")
    False
    """
    payload = json.dumps([instruction, input, output], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _list_files(path: str) -> list[str]:
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        sample = os.path.join(SAMPLE_DIR, f"{name}.json")
        if not os.path.isfile(sample):
            raise InputError(f"{path}: no such built-in sample (there is builtin:alpaca_sample)")
        return [sample]
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
    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise InputError(f"{path}: cannot open this filesystem: {e}") from None
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _rejoin(original: str, inner_root: str, inner_file: str) -> str:
    """Give a listed file the same form (URI or relative path) as the directory it came from."""
    return original.rstrip("/") + "/" + inner_file[len(inner_root.rstrip("/")) + 1:]


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _read_bytes(path: str) -> bytes:
    fs, inner = _filesystem(path)
    try:
        with fs.open_input_stream(inner) as stream:
            return stream.read()
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: cannot read: {e}") from None


def _read_file(path: str, fmt: str) -> Iterator[tuple[str, Any]]:
    """Yield (source, item) for each row of one file; item is the parsed row or an `_Unreadable`."""
    if fmt == "parquet":
        yield from _read_parquet(path)
        return
    data = _read_bytes(path)
    if not data.strip():
        raise InputError(f"{path}: the file is empty")
    # surrogateescape keeps bytes that are not UTF-8, so the row holding them is set aside, not the file.
    text = data.decode("utf-8", "surrogateescape").lstrip("\ufeff")
    if fmt == "json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None
        for index, item in enumerate(items):
            yield f"{path}[{index}]", item
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{lineno}", _Unreadable(f"not valid JSON ({e.msg} at column {e.colno})", line)


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


def _normalize(source: str, item: Any, cfg: DataConfig) -> dict[str, Any]:
    """One input item as a flat record; problems go to `invalid_reason`, the row is kept."""
    record = {C.ID: None, C.INSTRUCTION: "", C.INPUT: "", C.OUTPUT: "", C.SOURCE: source, INVALID_REASON: None}
    if isinstance(item, _Unreadable):
        record[INVALID_REASON] = item.reason
        record[C.ID] = content_id("", "", _clean(item.raw))
        return record
    if not isinstance(item, dict):
        record[INVALID_REASON] = f"a row is a JSON object, got {type(item).__name__}"
        record[C.ID] = content_id("", "", _clean(json.dumps(item, ensure_ascii=False)))
        return record
    renames = {**DOLLY_NAMES, **cfg.field_map}
    fields = {renames.get(k, k): v for k, v in item.items()}
    problems = []
    for name in C.TEXT_FIELDS:
        value = fields.get(name)
        if value is None and name == C.INPUT:
            value = ""  # Alpaca rows without context leave input empty or out
        if value is None:
            problems.append(f"missing field '{name}'")
            value = ""
        elif not isinstance(value, str):
            problems.append(f"field '{name}' is {type(value).__name__}, expected a string")
            value = json.dumps(value, ensure_ascii=False)
        elif _SURROGATE.search(value):
            problems.append(f"field '{name}' is not valid UTF-8")
        record[name] = _clean(value)
    size = sum(len(record[name]) for name in C.TEXT_FIELDS)
    if size > cfg.max_row_chars:
        problems.append(f"row has {size:,} characters, more than data.max_row_chars={cfg.max_row_chars:,}")
    if problems:
        record[INVALID_REASON] = "; ".join(problems)
    given = fields.get(cfg.id_field)
    if isinstance(given, (str, int)) and not isinstance(given, bool) and str(given).strip():
        record[C.ID] = _clean(str(given))
    else:
        record[C.ID] = content_id(record[C.INSTRUCTION], record[C.INPUT], record[C.OUTPUT])
    return record


def _clean(text: str) -> str:
    """Text Arrow can store: each undecodable byte or lone surrogate becomes U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


def _make_ids_unique(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Give repeated ids a '~N' suffix (N = 2, 3, ... in input order) so every row stays addressable.

    Returns the repeated ids with the sources of all their rows, for the report.
    """
    first_source: dict[str, str] = {}
    counts: dict[str, int] = {}
    duplicates: dict[str, list[str]] = {}
    for record in records:
        rid = record[C.ID]
        if rid not in counts:
            counts[rid] = 1
            first_source[rid] = record[C.SOURCE]
            continue
        counts[rid] += 1
        duplicates.setdefault(rid, [first_source[rid]]).append(record[C.SOURCE])
        record[C.ID] = f"{rid}~{counts[rid]}"
    return duplicates
