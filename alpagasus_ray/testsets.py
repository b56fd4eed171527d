"""The four test sets of the paper (Koala, Vicuna, WizardLM, Self-Instruct), read from their
original formats, shipped in the package; any file in one of those formats, or Alpaca-style rows,
works too.

Every prompt comes out as {id, test_set, category, instruction, input}; ids are prefixed with the
test set so answers of different sets never collide.
"""

from __future__ import annotations

import json
import os

from alpagasus_ray.config import TEST_SETS
from alpagasus_ray.errors import InputError

TESTSET_DIR = os.path.join(os.path.dirname(__file__), "testsets")


def load_test_set(name_or_path: str, limit: int | None = None) -> list[dict]:
    """The prompts of a test set: a name of TEST_SETS or a JSONL file in one of their formats.

    >>> rows = load_test_set("vicuna")
    >>> len(rows), rows[0]["id"], rows[0]["category"]
    (80, 'vicuna-1', 'generic')
    >>> load_test_set("sinstruct", limit=1)[0]["input"] != ""
    True
    """
    path = os.path.join(TESTSET_DIR, f"{name_or_path}.jsonl") if name_or_path in TEST_SETS else name_or_path
    name = name_or_path if name_or_path in TEST_SETS else os.path.splitext(os.path.basename(path))[0]
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    except OSError as e:
        raise InputError(f"{path}: cannot read the test set: {e.strerror}") from None
    prompts = []
    for lineno, line in lines[:limit] if limit else lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        prompts.append(_prompt(row, name, f"{path}:{lineno}"))
    if not prompts:
        raise InputError(f"{path}: the test set is empty")
    return prompts


def _prompt(row: dict, name: str, where: str) -> dict:
    """One row of any known format as {id, test_set, category, instruction, input}."""
    if "text" in row and "question_id" in row:  # Vicuna
        rid, instruction, extra, category = row["question_id"], row["text"], "", row.get("category")
    elif "prompt" in row:  # Koala
        rid, instruction, extra, category = row.get("id"), row["prompt"], "", None
    elif "instances" in row:  # Self-Instruct user-oriented
        rid, instruction, category = row.get("id"), row["instruction"], row.get("motivation_app")
        extra = (row["instances"][0] or {}).get("input", "") if row["instances"] else ""
    elif "Instruction" in row:  # WizardLM
        rid, instruction, extra, category = row.get("idx"), row["Instruction"], "", row.get("Skill")
    elif "instruction" in row:  # Alpaca-style
        rid, instruction, extra, category = row.get("id"), row["instruction"], row.get("input", ""), row.get("category")
    else:
        raise InputError(f"{where}: unknown test-set format (fields {sorted(row)}); expected Vicuna 'text', "
                         "Koala 'prompt', Self-Instruct 'instruction'+'instances', WizardLM 'Instruction', or Alpaca rows")
    if rid is None:
        raise InputError(f"{where}: the row has no id")
    rid = str(rid)
    return {"id": rid if rid.startswith(name) else f"{name}-{rid}", "test_set": name,
            "category": None if category is None else str(category), "instruction": instruction, "input": extra or ""}
