"""JSONL files of records written as results arrive, for the generation and judging stages.

A record is appended (and flushed) the moment it is known, so a killed job loses only what was in
flight; a rerun reads the file and asks only for the rest. A kill can tear the last line: reading
drops it, and the next append starts on a fresh line. When a stage finishes it rewrites the file
once, in prompt order, one record per key.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable


class RecordFile:
    """One JSONL file of records, each identified by `key(record)`; a later record of a key wins."""

    def __init__(self, path: str, key: Callable[[dict], str]):
        self.path = path
        self.key = key

    def read(self) -> dict[str, dict]:
        """Every record so far by key. A torn last line (a kill mid-write) is cut off the file."""
        if not os.path.exists(self.path):
            return {}
        with open(self.path, "rb") as f:
            data = f.read()
        records, good_end = {}, 0
        for line in data.splitlines(keepends=True):
            try:
                record = json.loads(line)
            except ValueError:
                if line.endswith(b"\n"):
                    from alpagasus_ray.data import InputError

                    raise InputError(f"{self.path}: a line that is not JSON in the middle of the file") from None
                break  # the torn last line
            records[self.key(record)] = record
            good_end += len(line)
        if good_end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
        return records

    def append(self, records: Iterable[dict]) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, records: Iterable[dict]) -> None:
        """Replace the file by `records` (write a temporary file, then rename)."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, self.path)


def append_by_test_set(files: dict[str, RecordFile], records: list[dict]) -> None:
    """Append each record to the file of its test set (one write per file)."""
    for name in {r["test_set"] for r in records}:
        files[name].append(r for r in records if r["test_set"] == name)


def read_json(path: str) -> dict | None:
    """A JSON record file's content, or None when there is none."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_jsonl(path: str, with_lines: bool = False) -> list:
    """All records of a finished JSONL file (with their line numbers when asked); a line that is
    not JSON, or not UTF-8, is an error naming it."""
    from alpagasus_ray.data import InputError

    rows = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
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
    Returns True when something was deleted."""
    from alpagasus_ray.layout import INPUTS_FILE

    path = os.path.join(out_dir, INPUTS_FILE)
    stale = False
    if os.path.exists(path):
        with open(path) as f:
            stale = json.load(f) != json.loads(json.dumps(inputs))
    if stale:
        for name in os.listdir(out_dir):
            if name.endswith(".jsonl"):
                os.remove(os.path.join(out_dir, name))
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(inputs, f, indent=2)
    return stale


def file_stamps(paths: Iterable[str]) -> list:
    """(name, size, mtime) of each existing file: cheap evidence that files changed."""
    return [(os.path.basename(p), os.path.getsize(p), os.path.getmtime(p)) for p in sorted(paths) if os.path.isfile(p)]


def content_digest(paths: Iterable[str]) -> str:
    """sha256 of the files' contents, in name order."""
    import hashlib

    digest = hashlib.sha256()
    for p in sorted(paths):
        digest.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]
