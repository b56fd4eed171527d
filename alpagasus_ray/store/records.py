"""JSONL files of records (answers, verdicts, training metrics): written whole once a stage has its
results (`write_jsonl`), read with the line of any problem named (`read_jsonl`); and what an
output directory's records were made from (`start_outputs`), so stale ones are removed."""

from __future__ import annotations

import json
import os
from typing import Iterable

from alpagasus_ray.errors import InputError
from alpagasus_ray.store.layout import (
    INPUTS_FILE, join, list_dir, open_filesystem, read_bytes, read_json, remove, write_json, write_whole,
)


def write_jsonl(uri: str, records: Iterable[dict]) -> None:
    """A JSONL file of `records`, written whole (on any filesystem)."""
    write_whole(uri, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())


def read_jsonl(path: str, with_lines: bool = False) -> list:
    """All records of a finished JSONL file (with their line numbers when asked); a line that is
    not JSON, or not UTF-8, is an error naming it."""
    rows = []
    fs, inner = open_filesystem(path)
    with fs.open_input_stream(inner) as f:
        for lineno, line in enumerate(f.read().splitlines(), start=1):
            if line.strip():
                try:
                    record = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    raise InputError(f"{path}:{lineno}: not valid UTF-8") from None
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                rows.append((lineno, record) if with_lines else record)
    return rows


def start_outputs(out_dir: str, inputs: dict) -> bool:
    """Prepare `out_dir` for records made from `inputs` (JSON-able): when its records were made
    from other inputs (a retrained model, regenerated answers), they are stale and are deleted.
    Returns True when something was deleted (the records and their parts)."""
    path = join(out_dir, INPUTS_FILE)
    made_from = read_json(path)
    stale = made_from is not None and made_from != json.loads(json.dumps(inputs))
    if stale:
        for name in list_dir(out_dir):
            if name.endswith(".jsonl"):
                remove(join(out_dir, name))
        remove(join(out_dir, "parts"))
    write_json(path, inputs)
    return stale


def file_stamps(paths: Iterable[str]) -> list:
    """(name, size, mtime) of each existing file: cheap evidence that files changed."""
    return [(os.path.basename(p), os.path.getsize(p), os.path.getmtime(p)) for p in sorted(paths) if os.path.isfile(p)]


def content_digest(paths: Iterable[str]) -> str:
    """sha256 of the files' contents, in name order."""
    import hashlib

    digest = hashlib.sha256()
    for p in sorted(paths):
        digest.update(p.rstrip("/").rsplit("/", 1)[-1].encode())
        digest.update(read_bytes(p))
    return digest.hexdigest()[:16]
