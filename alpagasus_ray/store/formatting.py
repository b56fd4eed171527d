"""The shapes a row of instruction-tuning data comes in, and how each becomes a normalized record.

- `alpaca`: `instruction`, `input`, `output` (and Dolly's `context`, `response`; `data.field_map`);
- `messages`: OpenAI / Hugging Face chat turns, `{"role": "user", "content": "..."}` in `messages`;
- `sharegpt`: `{"from": "human", "value": "..."}` turns in `conversations`.

`data.formatting` picks one (LLaMA-Factory's word for it); `auto` decides per file from its first
rows. `data.columns` says where a conversation is for other layouts, in LLaMA-Factory's names: the
conversation's field (`messages`), a field holding a system prompt (`system`), and the turn's keys
and role names (`role_tag`, `content_tag`, `user_tag`, `assistant_tag`, `system_tag`).

A conversation is normalized to a list of `{"role": "system"|"user"|"assistant", "content": str}`
turns: an optional system turn first, then user and assistant turns in alternation. A conversation
that breaks a rule is kept, set aside with the reason, never repaired. A last user turn with no
reply is kept and not rated.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from alpagasus_ray import columns as C
from alpagasus_ray.config import DataConfig

ALPACA, MESSAGES, SHAREGPT = "alpaca", "messages", "sharegpt"
CONVERSATIONS = (MESSAGES, SHAREGPT)
SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
# Dolly 15k names its fields differently; mapped before `data.field_map`.
DOLLY_NAMES = {"context": C.INPUT, "response": C.OUTPUT}
# Rows `auto` looks at to decide a file's formatting.
DETECT_ROWS = 20
# Lone surrogates: bytes that were not valid UTF-8 (kept by surrogateescape) or "\udXXX" escapes.
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Turns:
    """Where the turns of a conversation are in a row, and what its role names mean."""

    column: str  # the field holding the list of turns
    role: str  # the key of a turn's role
    content: str  # the key of a turn's text
    roles: dict[str, str]  # a role name in the input -> system / user / assistant
    system_column: str | None = None  # a field holding a system prompt, put before the turns


# Each conversation formatting's own names; `data.columns` overrides any of them.
DEFAULT_TURNS = {
    MESSAGES: Turns("messages", "role", "content", {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}),
    SHAREGPT: Turns("conversations", "from", "value",
                    {"system": SYSTEM, "human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}),
}


def turns_for(formatting: str, cfg: DataConfig) -> Turns:
    """The turn layout of `formatting` with `data.columns` applied.

    >>> turns_for("sharegpt", DataConfig(columns={"user_tag": "person"})).roles
    {'system': 'system', 'gpt': 'assistant', 'assistant': 'assistant', 'person': 'user'}
    """
    base, given = DEFAULT_TURNS[formatting], cfg.columns
    roles = dict(base.roles)
    for canonical, names in ((SYSTEM, given.system_tag), (USER, given.user_tag), (ASSISTANT, given.assistant_tag)):
        if names is not None:
            roles = {name: role for name, role in roles.items() if role != canonical}
            roles.update(dict.fromkeys([names] if isinstance(names, str) else names, canonical))
    return Turns(given.messages or base.column, given.role_tag or base.role, given.content_tag or base.content,
                 roles, given.system)


def shape_of(item: Any, cfg: DataConfig) -> str | None:
    """The formatting a row looks like (None: none of them)."""
    if not isinstance(item, dict):
        return None
    for formatting in CONVERSATIONS:
        turns = turns_for(formatting, cfg)
        value = item.get(turns.column)
        if isinstance(value, list) and value and isinstance(value[0], dict) and turns.role in value[0]:
            return formatting
    renames = {**DOLLY_NAMES, **cfg.field_map}
    if any(renames.get(k, k) == C.INSTRUCTION for k in item):
        return ALPACA
    return None


def detect(items: list[Any], cfg: DataConfig) -> str:
    """The formatting of most of `items` (a file's first rows); alpaca when none is recognized,
    so that the rows are set aside with the alpaca fields they lack."""
    found = Counter(shape for item in items if (shape := shape_of(item, cfg)) is not None)
    return found.most_common(1)[0][0] if found else ALPACA


def normalize(item: Any, formatting: str, cfg: DataConfig, chosen_by: str = "") -> dict[str, Any]:
    """One input row as a record: the alpaca text fields or the conversation's turns, an id, and
    the reason it cannot be used (`reason`, None for a good row). `chosen_by` says how the file's
    formatting was decided, for the reason of a row of another shape."""
    if not isinstance(item, dict):
        return {"reason": f"a row is a JSON object, got {type(item).__name__}", C.ID: raw_id(item)}
    shape = shape_of(item, cfg)
    if shape is not None and shape != formatting and not (shape in CONVERSATIONS and formatting in CONVERSATIONS):
        record = _alpaca(item, cfg) if formatting == ALPACA else _conversation(item, turns_for(formatting, cfg), cfg)
        article = "an" if shape == ALPACA else "a"
        record["reason"] = f"{article} {shape} row in a file read as {formatting}{chosen_by}"
        return record
    if formatting == ALPACA:
        return _alpaca(item, cfg)
    return _conversation(item, turns_for(formatting, cfg), cfg)


def _alpaca(item: dict, cfg: DataConfig) -> dict[str, Any]:
    renames = {**DOLLY_NAMES, **cfg.field_map}
    fields = {renames.get(k, k): v for k, v in item.items()}
    record: dict[str, Any] = {}
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
        record[name] = clean(value)
    size = sum(len(record[name]) for name in C.TEXT_FIELDS)
    if size > cfg.max_row_chars:
        problems.append(f"row has {size:,} characters, more than data.max_row_chars={cfg.max_row_chars:,}")
    record["reason"] = "; ".join(problems) or None
    record[C.ID] = given_id(fields, cfg) or content_id(record[C.INSTRUCTION], record[C.INPUT], record[C.OUTPUT])
    return record


def _conversation(item: dict, turns: Turns, cfg: DataConfig) -> dict[str, Any]:
    messages, problem = conversation_turns(item, turns)
    size = sum(len(m["content"]) for m in messages)
    if problem is None and size > cfg.max_row_chars:
        problem = f"conversation has {size:,} characters, more than data.max_row_chars={cfg.max_row_chars:,}"
    # A conversation set aside may have lost turns in `messages`: its id comes from the row as read.
    own = conversation_id(messages) if problem is None else raw_id(item)
    return {C.MESSAGES: messages, "reason": problem, C.ID: given_id(item, cfg) or own}


def conversation_turns(item: dict, turns: Turns) -> tuple[list[dict], str | None]:
    """The normalized turns of one row, and the first rule it breaks (None: it can be rated).

    >>> t = DEFAULT_TURNS["sharegpt"]
    >>> conversation_turns({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}, t)
    ([{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}], None)
    >>> conversation_turns({"conversations": [{"from": "human", "value": "Hi"}]}, t)[1]
    'no assistant turn'
    """
    raw = item.get(turns.column)
    if raw is None:
        return [], f"missing field '{turns.column}'"
    if not isinstance(raw, list):
        return [], f"field '{turns.column}' is {type(raw).__name__}, expected a list of turns"
    messages: list[dict] = []
    problems: list[str] = []
    system = item.get(turns.system_column) if turns.system_column else None
    if system is not None and system != "":
        if isinstance(system, str):
            messages.append({"role": SYSTEM, "content": clean(system)})
        else:
            problems.append(f"field '{turns.system_column}' is {type(system).__name__}, expected a string")
    for number, turn in enumerate(raw, 1):
        if not isinstance(turn, dict):
            problems.append(f"turn {number} is {type(turn).__name__}, expected an object")
            continue
        name, content = turn.get(turns.role), turn.get(turns.content)
        role = turns.roles.get(name) if isinstance(name, str) else None
        if role is None:
            known = ", ".join(sorted(turns.roles))
            problems.append(f"turn {number}: unknown role {name!r} (known: {known}; see data.columns)"
                            if name is not None else f"turn {number}: no '{turns.role}'")
            continue
        if not isinstance(content, str):
            kind = "missing" if content is None else f"{type(content).__name__}, expected a string"
            problems.append(f"turn {number}: '{turns.content}' is {kind}")
            content = "" if content is None else json.dumps(content, ensure_ascii=False)
        elif not content.strip():
            problems.append(f"turn {number}: empty {role} turn")
        elif _SURROGATE.search(content):
            problems.append(f"turn {number}: not valid UTF-8")
        messages.append({"role": role, "content": clean(content)})
    if problems:
        return messages, problems[0]
    return messages, order_problem(messages, offset=1 if system else 0)


def order_problem(messages: list[dict], offset: int = 0) -> str | None:
    """What breaks the order of the turns: an optional system turn, then user and assistant in
    alternation, with at least one assistant turn. `offset` turns came from outside the list (a
    system field), for the turn numbers of the message."""
    expected = USER
    for index, message in enumerate(messages):
        role, number = message["role"], index + 1 - offset
        if role == SYSTEM:
            if index != 0:
                return f"turn {number}: a system turn after the first turn"
            continue
        if role != expected:
            return (f"turn {number}: the conversation starts with an assistant turn" if index == 0
                    or messages[index - 1]["role"] == SYSTEM
                    else f"turn {number}: {role} after {role} (turns alternate user / assistant)")
        expected = ASSISTANT if role == USER else USER
    if not any(m["role"] == ASSISTANT for m in messages):
        return "no assistant turn"
    return None


def given_id(fields: dict, cfg: DataConfig) -> str | None:
    """The row's own id (`data.id_field`), when it has a usable one."""
    given = fields.get(cfg.id_field)
    if isinstance(given, (str, int)) and not isinstance(given, bool) and str(given).strip():
        return clean(str(given))
    return None


def content_id(instruction: str, input: str, output: str) -> str:
    """A stable id from a row's content: the same text always gives the same id.

    >>> content_id("Add 2 and 2.", "", "4")
    '6d243927c1e88246'
    >>> content_id("Add 2 and 2.", "", "4") == content_id("Add 2 and 2", ".", "4")
    False
    """
    payload = json.dumps([instruction, input, output], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def conversation_id(messages: list[dict]) -> str:
    """A stable id from a conversation's normalized turns: the same conversation read as
    `messages` or as ShareGPT gets the same id, and never an alpaca row's.

    >>> conversation_id([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    '1502c849e9b20251'
    """
    payload = json.dumps({"messages": [[m["role"], m["content"]] for m in messages]}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def raw_id(item: Any) -> str:
    """A stable id from a row as read (for rows that cannot be normalized whole)."""
    return content_id("", "", clean(json.dumps(item, ensure_ascii=False, sort_keys=True)))


def clean(text: str) -> str:
    """Text Arrow can store: each undecodable byte or lone surrogate becomes U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)
