"""Rating conversations, with the conversation prompt (`rules.prompts.conversation_rating_messages`).

- `rate.unit=conversation`: a conversation is one row of the LLM layer, rated whole and stored in
  `<run_dir>/rated/` as its batch finishes, as an alpaca row is.
- `rate.unit=turn`: each assistant turn is a row of the LLM layer (`turn_rows`), rated with the
  turns before it as context and saved in `<run_dir>/rated_turns/` as its batch finishes; a kill
  loses only the turns in flight, and the rerun sends only the turns not saved. Once every pass
  is done, `assemble` makes the conversations' rows in `<run_dir>/rated/` from the input and the
  turns: one row per conversation, each assistant turn's score and status in order, and the
  conversation's score the `rate.aggregate` of its turns' scores when every turn is ok. A
  conversation with a turn that is not ok has no score and names that turn; it is never scored
  from the turns that happened to succeed.

Every function here that takes a batch runs on the workers (Ray Data).
"""

from __future__ import annotations

import functools
import statistics
import time

import pyarrow as pa
import pyarrow.compute as pc

from alpagasus_ray import columns as C
from alpagasus_ray.config import RateConfig
from alpagasus_ray.llm.context import Context
from alpagasus_ray.llm.results import PartResults
from alpagasus_ray.rules.injection import suspect
from alpagasus_ray.rules.prompts import CHAT_PROMPT_VERSION, conversation_rating_messages, prompt_version
from alpagasus_ray.stages.rating import LIGHT, RatingTask, RowRating, rating_meta, set_aside_dataset
from alpagasus_ray.store.inputs import INVALID_REASON, SET_ASIDE_STATUS
from alpagasus_ray.store.parts import PartStore, PartWriter
from alpagasus_ray.store.rated import (
    CHAT_RATED_SCHEMA,
    CONVERSATION,
    MESSAGES_TYPE,
    TURN,
    TURN_SCHEMA,
    TURN_SCORES,
    TURN_STATUSES,
    UNIT,
    RatedStore,
    TurnStore,
)

# What the LLM layer is given of a conversation (unit=conversation) and of a turn (unit=turn).
CHAT_SENT = [C.ID, C.MESSAGES, C.FORMATTING, C.SOURCE]
TURN_SENT = [C.ID, CONVERSATION, TURN, C.MESSAGES]
AGGREGATES = {"min": min, "mean": statistics.fmean, "last": lambda scores: scores[-1]}
# Status order when the same turn was saved twice (an ask-again pass in progress): the best wins.
_RANK = {status: rank for rank, status in enumerate(C.STATUSES)}


class ChatRatingTask(RatingTask):
    """The conversation prompt: the whole conversation, or a turn with the turns before it."""

    def messages(self, row: dict) -> list[dict]:
        return conversation_rating_messages(row[C.MESSAGES], self.cfg.unit, self.cfg.dimension, self.cfg.fence)


def chat_prompt_version(cfg: RateConfig) -> str:
    """The prompt a conversation is rated with: its version and the unit (the two units' prompts differ)."""
    return f"{prompt_version(CHAT_PROMPT_VERSION, cfg.fence)}:{cfg.unit}"


def turn_id(conversation: str, position: int) -> str:
    """The id of the assistant turn at `position` (1-based, in the normalized turns) of a conversation."""
    return f"{conversation}@{position}"


def _messages(column) -> pa.Array:
    """Turns as `MESSAGES_TYPE` (a row that went through an engine as JSON comes back with its
    struct fields in another order)."""
    return pa.array(column.to_pylist(), MESSAGES_TYPE)


def _conversation_rows(batch: pa.Table, meta: dict, results: dict) -> pa.Table:
    """`batch`'s conversations in the columns of CHAT_RATED_SCHEMA: `results` gives the columns
    the batch does not hold, the rating's `meta` the same value in every row."""
    n = batch.num_rows
    columns = {name: batch[name] for name in batch.column_names}
    if C.MESSAGES in columns:
        columns[C.MESSAGES] = _messages(batch[C.MESSAGES])
    columns.update(results)
    columns.update({k: pa.array([v] * n, pa.string()) for k, v in meta.items()})
    columns[C.SUSPECT] = pa.array([conversation_suspect(turns) for turns in batch[C.MESSAGES].to_pylist()], pa.string())
    return pa.table({f.name: columns[f.name] if f.name in columns else pa.nulls(n, f.type)
                     for f in CHAT_RATED_SCHEMA}, schema=CHAT_RATED_SCHEMA)


def conversation_suspect(turns: list[dict] | None) -> str | None:
    """The pattern that flags a conversation as talking to the grader (its assistant turns are the
    responses rated), or None."""
    turns = turns or []
    return suspect([t["content"] for t in turns if t["role"] != "assistant"],
                   [t["content"] for t in turns if t["role"] == "assistant"])


def chat_rated_rows(batch: pa.Table, meta: dict) -> pa.Table:
    """Conversations rated whole (unit=conversation), as stored rows."""
    return _conversation_rows(batch, meta, {UNIT: pa.array(["conversation"] * batch.num_rows, pa.string())})


def chat_set_aside_rows(batch: pa.Table, meta: dict) -> pa.Table:
    """Conversations that cannot be rated, as stored rows with the status they were set aside
    with and the reason (unit=conversation; with unit=turn `assemble` writes them)."""
    n = batch.num_rows
    return _conversation_rows(batch.select(CHAT_SENT), meta, {
        C.STATUS: batch[SET_ASIDE_STATUS], C.ERROR: batch[INVALID_REASON],
        C.REVIEW: pa.array([""] * n, pa.string()), C.ATTEMPTS: pa.array([0] * n, pa.int32()),
        C.TOKENS_IN: pa.array([0] * n, pa.int64()), C.TOKENS_OUT: pa.array([0] * n, pa.int64()),
        UNIT: pa.array(["conversation"] * n, pa.string()),
    })


def conversations_to_send(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch[INVALID_REASON])).select(CHAT_SENT)


def turn_rows(batch: pa.Table) -> pa.Table:
    """One row per assistant turn of the conversations that can be rated: its id, its
    conversation, its position, and the turns up to it (the later turns are not shown)."""
    batch = batch.filter(pc.is_null(batch[INVALID_REASON]))
    rows = []
    for conversation, turns in zip(batch[C.ID].to_pylist(), batch[C.MESSAGES].to_pylist()):
        for position, turn in enumerate(turns, 1):
            if turn["role"] == "assistant":
                rows.append({C.ID: turn_id(conversation, position), CONVERSATION: conversation, TURN: position,
                             C.MESSAGES: turns[:position]})
    schema = pa.schema([TURN_SCHEMA.field(name) for name in TURN_SENT])
    return pa.Table.from_pylist(rows, schema=schema)


def turn_stored(batch: pa.Table, meta: dict) -> pa.Table:
    """Rated turns as stored rows; a turn that is ok keeps no text (only a turn asked again needs it)."""
    n = batch.num_rows
    columns = {name: batch[name] for name in batch.column_names}
    columns.update({k: pa.array([v] * n, pa.string()) for k, v in meta.items()})
    ok = pc.equal(batch[C.STATUS], C.OK)
    columns[C.MESSAGES] = pc.if_else(ok, pa.nulls(n, MESSAGES_TYPE), _messages(batch[C.MESSAGES]))
    return pa.table({f.name: columns[f.name] for f in TURN_SCHEMA}, schema=TURN_SCHEMA)


# Assembling the conversations from their turns (unit=turn).

_KIND = "_kind"  # 0: the conversation as read, 1: one of its rated turns
_KEY = "_conversation"


def assemble(rows, turns: TurnStore, store: RatedStore, cfg: RateConfig, meta: dict, generation: str,
             conversations_in: int) -> None:
    """Write every conversation of `rows` (the input's, set aside or not) to `store` as one row
    with its turns' results from `turns`, under parts named `generation-*`; then remove the parts
    of earlier assemblies. A kill before the end leaves the earlier rows, and a rerun assembles again."""
    import ray

    from alpagasus_ray.llm.engines.base import run_to_end
    from alpagasus_ray.store.inputs import sort_shuffle

    conversations = rows.map_batches(_conversation_side, batch_format="pyarrow", batch_size=None, **LIGHT)
    parts = turns.parts()
    if parts:
        groups = [{"parts": parts[i:i + 64]} for i in range(0, len(parts), 64)]
        rated = ray.data.from_items(groups).map_batches(
            _turn_side, fn_kwargs={"uri": turns.uri}, batch_format="pyarrow", batch_size=1, **LIGHT)
        conversations = conversations.union(rated)
    sink = PartWriter(store.uri, store.schema, prefix=generation)
    with sort_shuffle():
        # A partition per ~100k conversations: Ray's default of 200 costs seconds on a small input.
        partitions = max(1, min(200, conversations_in // 100_000))
        written = conversations.groupby(_KEY, num_partitions=partitions).map_groups(
            _assemble_group, fn_kwargs={"aggregate": cfg.aggregate, "meta": meta}, batch_format="pyarrow", **LIGHT,
        ).map_batches(_write, fn_kwargs={"sink": sink}, batch_format="pyarrow", batch_size=4096, **LIGHT)
        run_to_end(written)
    for part in store.parts():
        if not part.rsplit("/", 1)[-1].startswith(f"{generation}-"):
            store.fs.delete_file(part)


_SIDE = pa.schema([
    (_KEY, pa.string()), (_KIND, pa.int8()), (C.MESSAGES, MESSAGES_TYPE), (C.FORMATTING, pa.string()),
    (C.SOURCE, pa.string()), (INVALID_REASON, pa.string()), (SET_ASIDE_STATUS, pa.string()), (TURN, pa.int32()),
    *(TURN_SCHEMA.field(n) for n in (C.SCORE, C.SCORE_EXPECTED, C.STATUS, C.ATTEMPTS, C.ERROR, C.TOKENS_IN,
                                     C.TOKENS_OUT)),
])


def _side(columns: dict, n: int) -> pa.Table:
    return pa.table({f.name: columns[f.name] if f.name in columns else pa.nulls(n, f.type) for f in _SIDE},
                    schema=_SIDE)


def _conversation_side(batch: pa.Table) -> pa.Table:
    n = batch.num_rows
    return _side({_KEY: batch[C.ID], _KIND: pa.array([0] * n, pa.int8()), C.MESSAGES: _messages(batch[C.MESSAGES]),
                  C.FORMATTING: batch[C.FORMATTING], C.SOURCE: batch[C.SOURCE], INVALID_REASON: batch[INVALID_REASON],
                  SET_ASIDE_STATUS: batch[SET_ASIDE_STATUS]}, n)


def _turn_side(batch: pa.Table, uri: str) -> pa.Table:
    names = [CONVERSATION, TURN, C.SCORE, C.SCORE_EXPECTED, C.STATUS, C.ATTEMPTS, C.ERROR, C.TOKENS_IN, C.TOKENS_OUT]
    read = PartStore(uri, TURN_SCHEMA).batches(names, parts=batch["parts"][0].as_py())
    table = pa.Table.from_batches(list(read), schema=pa.schema([TURN_SCHEMA.field(n) for n in names]))
    n = table.num_rows
    columns = {name: table[name] for name in names[1:]}
    return _side({_KEY: table[CONVERSATION], _KIND: pa.array([1] * n, pa.int8()), **columns}, n)


def _assemble_group(group: pa.Table, aggregate: str, meta: dict) -> pa.Table:
    """One conversation's row from its row as read and its rated turns."""
    rows = group.to_pylist()
    conversation = next((r for r in rows if r[_KIND] == 0), None)
    if conversation is None:  # turns of a conversation no longer in the input: not part of this run
        return CHAT_RATED_SCHEMA.empty_table()
    best: dict[int, dict] = {}
    for turn in (r for r in rows if r[_KIND] == 1):
        held = best.get(turn[TURN])
        if held is None or (_RANK[turn[C.STATUS]], -turn[C.ATTEMPTS]) < (_RANK[held[C.STATUS]], -held[C.ATTEMPTS]):
            best[turn[TURN]] = turn
    row = {C.ID: conversation[_KEY], C.MESSAGES: conversation[C.MESSAGES], C.FORMATTING: conversation[C.FORMATTING],
           C.SOURCE: conversation[C.SOURCE], UNIT: "turn", C.ATTEMPTS: 0, C.TOKENS_IN: 0, C.TOKENS_OUT: 0, **meta,
           C.SUSPECT: conversation_suspect(conversation[C.MESSAGES])}
    if conversation[INVALID_REASON] is not None:
        row.update({C.STATUS: conversation[SET_ASIDE_STATUS], C.ERROR: conversation[INVALID_REASON], C.REVIEW: ""})
    else:
        positions = [p for p, t in enumerate(conversation[C.MESSAGES], 1) if t["role"] == "assistant"]
        turns = [best.get(p) for p in positions]
        row.update(_aggregated(positions, turns, aggregate))
    return pa.Table.from_pylist([row], schema=CHAT_RATED_SCHEMA)


def _aggregated(positions: list[int], turns: list[dict | None], aggregate: str) -> dict:
    """The conversation's results from its assistant turns' (None: a turn not rated)."""
    statuses = [t[C.STATUS] if t else C.REQUEST_FAILED for t in turns]
    scores = [t[C.SCORE] if t and t[C.STATUS] == C.OK else None for t in turns]
    row = {TURN_SCORES: scores, TURN_STATUSES: statuses,
           C.ATTEMPTS: max((t[C.ATTEMPTS] for t in turns if t), default=0),
           C.TOKENS_IN: sum(t[C.TOKENS_IN] or 0 for t in turns if t),
           C.TOKENS_OUT: sum(t[C.TOKENS_OUT] or 0 for t in turns if t)}
    failing = next((i for i, s in enumerate(statuses) if s != C.OK), None)
    if failing is not None:
        turn = turns[failing]
        why = turn[C.ERROR] if turn else "not rated"
        row.update({C.STATUS: statuses[failing], C.ERROR: f"turn {positions[failing]}: {statuses[failing]}: {why}"})
        return row
    expected = [t[C.SCORE_EXPECTED] for t in turns]
    row.update({C.STATUS: C.OK, C.SCORE: float(AGGREGATES[aggregate](scores)),
                C.SCORE_EXPECTED: float(AGGREGATES[aggregate](expected)) if None not in expected else None})
    return row


class TooLong:
    """Sets aside as too_long, as they are read, the rows whose longest request needs more than
    the grader's context: an alpaca row's one request; a conversation's whole exchange (unit=
    conversation) or its last assistant turn with every turn before it (unit=turn)."""

    def __init__(self, cfg: RateConfig, engine, context: Context):
        self.context, self.unit = context, cfg.unit
        self.row_task, self.chat_task = RatingTask(cfg, engine), ChatRatingTask(cfg, engine)

    def longest(self, row: dict):
        turns = row[C.MESSAGES]
        if turns is None:
            return self.row_task.request(row)
        if self.unit == "turn":
            last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
            turns = turns[:last + 1]
        return self.chat_task.request({C.MESSAGES: turns})

    def __call__(self, block: pa.Table) -> pa.Table:
        reasons, statuses = block[INVALID_REASON].to_pylist(), block[SET_ASIDE_STATUS].to_pylist()
        rows = block.select([C.INSTRUCTION, C.INPUT, C.OUTPUT, C.MESSAGES]).to_pylist()
        context = self.context
        for i, row in enumerate(rows):
            needed = None if reasons[i] is not None else context.too_long(self.longest(row))
            if needed is not None:
                reasons[i] = (f"needs {needed:,} tokens (the rating prompt and its longest reply), more than "
                              f"the grader's context of {context.tokens:,} (rate.{context.key}; counted by "
                              f"{context.counted_by})")
                statuses[i] = C.TOO_LONG
        block = block.set_column(block.schema.get_field_index(INVALID_REASON), INVALID_REASON,
                                 pa.array(reasons, pa.string()))
        return block.set_column(block.schema.get_field_index(SET_ASIDE_STATUS), SET_ASIDE_STATUS,
                                pa.array(statuses, pa.string()))


def _write(batch: pa.Table, sink) -> pa.Table:
    sink(batch)
    return pa.table({"rows": [batch.num_rows]})


class ConversationRating(RowRating):
    """Conversations rated whole: one request per conversation (`rate.unit=conversation`)."""

    def __init__(self, config, engine):
        self.cfg = config.rate
        self.store = RatedStore(config.run_dir, chat=True)
        self.task = ChatRatingTask(self.cfg, engine)
        self.meta = {**rating_meta(self.cfg), C.PROMPT_VERSION: chat_prompt_version(self.cfg)}
        self.results = PartResults(self.store, CHAT_SENT, functools.partial(chat_rated_rows, meta=self.meta))

    def prompt_bytes(self) -> int:
        return sum(len(m["content"].encode("utf-8")) for m in self.task.messages({C.MESSAGES: []}))

    def set_aside(self, rows, progress):
        return set_aside_dataset(rows, self.store, functools.partial(chat_set_aside_rows, meta=self.meta), progress)

    def to_ask(self, rows, skip):
        return skip(rows).map_batches(conversations_to_send, batch_format="pyarrow", batch_size=None, **LIGHT)


class TurnRating(ConversationRating):
    """Each assistant turn rated in its context, one request per turn (`rate.unit=turn`); the
    conversations' rows are assembled from the turns at the end (`assemble`)."""

    unit = "turn"

    def __init__(self, config, engine):
        super().__init__(config, engine)
        self.turns = TurnStore(config.run_dir)
        self.results = PartResults(self.turns, TURN_SENT, functools.partial(turn_stored, meta=self.meta))
        self.generation = f"asm{time.time_ns()}"

    @property
    def stores(self) -> list:
        return [self.store, self.turns]

    def requests(self, scan) -> tuple[int, int]:
        return scan.turns, scan.turn_bytes

    def set_aside(self, rows, progress):
        return None  # `assemble` writes every conversation, set aside or rated

    def to_ask(self, rows, skip):
        return skip(rows.map_batches(turn_rows, batch_format="pyarrow", batch_size=None, **LIGHT))

    def finish(self, rows, scan) -> None:
        assemble(rows, self.turns, self.store, self.cfg, self.meta, self.generation, scan.rows)

    def summary(self, sent: int) -> dict:
        counts = self.turns.status_counts()
        return {"rows_sent_this_run": None, "turns": {"rated": sum(counts.values()), "sent_this_run": sent,
                                                      "by_status": {s: counts.get(s, 0) for s in C.STATUSES}}}
