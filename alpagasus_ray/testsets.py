"""The four test sets of the paper (Koala, Vicuna, WizardLM, Self-Instruct), read from their
original formats, shipped in the package; a file (JSONL or Parquet) in one of those formats, of
Alpaca-style rows, of MT-Bench questions (`turns`), or of conversations (`messages`, ShareGPT
`conversations`) works too.

Every prompt comes out as {id, test_set, category, instruction, input, follow_ups, system}: the
first user turn (with its input), the user turns after it (empty for a single-turn prompt, which
every prompt of the four is), and the system turn or None. Of a conversation, only the system and
user turns are read: the model answers every user turn itself, so the file's assistant turns are
not used. Ids are prefixed with the test set so answers of different sets never collide; a
conversation with no id is named by its row number.
"""

from __future__ import annotations

import json
import os

from alpagasus_ray.config import TEST_SETS
from alpagasus_ray.errors import InputError
from alpagasus_ray.store.formatting import DEFAULT_TURNS, MESSAGES, SHAREGPT

TESTSET_DIR = os.path.join(os.path.dirname(__file__), "testsets")


def load_test_set(name_or_path: str, limit: int | None = None) -> list[dict]:
    """The prompts of a test set: a name of TEST_SETS or a JSONL or Parquet file.

    >>> rows = load_test_set("vicuna")
    >>> len(rows), rows[0]["id"], rows[0]["category"], rows[0]["follow_ups"]
    (80, 'vicuna-1', 'generic', [])
    >>> load_test_set("sinstruct", limit=1)[0]["input"] != ""
    True
    """
    path = os.path.join(TESTSET_DIR, f"{name_or_path}.jsonl") if name_or_path in TEST_SETS else name_or_path
    name = name_or_path if name_or_path in TEST_SETS else os.path.splitext(os.path.basename(path))[0]
    prompts = [_prompt(row, name, where, n) for n, (where, row) in enumerate(_rows(path, limit), start=1)]
    if not prompts:
        raise InputError(f"{path}: the test set is empty")
    return prompts


def _rows(path: str, limit: int | None) -> list[tuple[str, dict]]:
    """(where, row) of each row of a JSONL or Parquet file, up to `limit`."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: cannot read the test set: {e}") from None
        return [(f"{path}[{i}]", row) for i, row in enumerate(rows[:limit] if limit else rows)]
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    except OSError as e:
        raise InputError(f"{path}: cannot read the test set: {e.strerror}") from None
    rows = []
    for lineno, line in lines[:limit] if limit else lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{lineno}: a test prompt is a JSON object, got {type(row).__name__}")
        rows.append((f"{path}:{lineno}", row))
    return rows


def _prompt(row: dict, name: str, where: str, number: int) -> dict:
    """One row of any known format as {id, test_set, category, instruction, input, follow_ups, system}."""
    follow_ups, system = [], None
    if "messages" in row or "conversations" in row:  # OpenAI / Hugging Face messages, ShareGPT
        system, users = _conversation(row, where)
        rid, instruction, extra, category = row.get("id", number), users[0], "", row.get("category")
        follow_ups = users[1:]
    elif "turns" in row:  # MT-Bench
        users = row["turns"]
        if not users or not all(isinstance(t, str) and t.strip() for t in users):
            raise InputError(f"{where}: 'turns' must be a non-empty list of non-empty strings")
        rid, instruction, extra, category = row.get("question_id", row.get("id")), users[0], "", row.get("category")
        follow_ups = users[1:]
    elif "text" in row and "question_id" in row:  # Vicuna
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
                         "Koala 'prompt', Self-Instruct 'instruction'+'instances', WizardLM 'Instruction', Alpaca rows, "
                         "MT-Bench 'turns', or a conversation ('messages', 'conversations')")
    if rid is None:
        raise InputError(f"{where}: the row has no id")
    rid = str(rid)
    return {"id": rid if rid.startswith(name) else f"{name}-{rid}", "test_set": name,
            "category": None if category is None else str(category), "instruction": instruction, "input": extra or "",
            "follow_ups": follow_ups, "system": system}


def _conversation(row: dict, where: str) -> tuple[str | None, list[str]]:
    """The system turn (or None) and the user turns of a conversation, checked.

    >>> _conversation({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
    ...                             {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]}, "f:1")
    ('Be brief.', ['Hi', 'Bye'])
    """
    layout = DEFAULT_TURNS[MESSAGES if "messages" in row else SHAREGPT]
    key, role_key, content_key = layout.column, layout.role, layout.content
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        raise InputError(f"{where}: {key!r} must be a non-empty list of turns")
    system, users = None, []
    for position, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or not isinstance(turn.get(content_key), str) or not turn[content_key].strip():
            raise InputError(f"{where}: turn {position}: expected an object with a non-empty {content_key!r}")
        role = layout.roles.get(turn.get(role_key))
        if role is None:
            raise InputError(f"{where}: turn {position}: unknown role {turn.get(role_key)!r} "
                             f"(known: {', '.join(layout.roles)})")
        if role == "system":
            if position != 1:
                raise InputError(f"{where}: turn {position}: a system turn after the first turn")
            system = turn[content_key]
        elif role == "user":
            users.append(turn[content_key])
    if not users:
        raise InputError(f"{where}: the conversation has no user turn")
    return system, users
