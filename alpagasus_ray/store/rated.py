"""The rated rows of a run: Parquet parts under `<run_dir>/rated/` (see `parts`), one row per input
row with its rating or the reason it was set aside.

An alpaca row keeps its text in `instruction`, `input`, `output` (`RATED_SCHEMA`); a conversation
keeps its turns in `messages`, and with `rate.unit=turn` each assistant turn's score and status in
order beside the conversation's (`CHAT_RATED_SCHEMA`). The turns themselves are rated into
`<run_dir>/rated_turns/` (`TURN_SCHEMA`), one row per assistant turn, and the conversations'
rows are made from them.
"""

from __future__ import annotations

import pyarrow as pa

from alpagasus_ray import columns as C
from alpagasus_ray.store.layout import RunDir
from alpagasus_ray.store.parts import PartStore

RATED_SCHEMA = pa.schema([
    (C.ID, pa.string()), (C.INSTRUCTION, pa.string()), (C.INPUT, pa.string()), (C.OUTPUT, pa.string()),
    (C.SCORE, pa.float64()), (C.SCORE_EXPECTED, pa.float64()), (C.STATUS, pa.string()), (C.REVIEW, pa.string()),
    (C.GRADER, pa.string()), (C.DIMENSION, pa.string()), (C.PROMPT_VERSION, pa.string()),
    (C.ATTEMPTS, pa.int32()), (C.ERROR, pa.string()), (C.TOKENS_IN, pa.int64()), (C.TOKENS_OUT, pa.int64()),
    (C.SOURCE, pa.string()), (C.SUSPECT, pa.string()),
])


# A conversation's turns, normalized: [{"role": "system"|"user"|"assistant", "content": str}, ...].
MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
# Conversation-level columns.
UNIT, TURN_SCORES, TURN_STATUSES = "unit", "turn_scores", "turn_statuses"
CHAT_RATED_SCHEMA = pa.schema([
    (C.ID, pa.string()), (C.MESSAGES, MESSAGES_TYPE), (C.FORMATTING, pa.string()),
    (C.SCORE, pa.float64()), (C.SCORE_EXPECTED, pa.float64()), (C.STATUS, pa.string()), (C.REVIEW, pa.string()),
    (C.GRADER, pa.string()), (C.DIMENSION, pa.string()), (C.PROMPT_VERSION, pa.string()),
    (C.ATTEMPTS, pa.int32()), (C.ERROR, pa.string()), (C.TOKENS_IN, pa.int64()), (C.TOKENS_OUT, pa.int64()),
    (C.SOURCE, pa.string()), (UNIT, pa.string()),
    (TURN_SCORES, pa.list_(pa.float64())), (TURN_STATUSES, pa.list_(pa.string())), (C.SUSPECT, pa.string()),
])
# One rated assistant turn: `messages` is the conversation up to and including it (kept only while
# the turn may be asked again: null once it is ok).
CONVERSATION, TURN = "conversation", "turn"
TURN_SCHEMA = pa.schema([
    (C.ID, pa.string()), (CONVERSATION, pa.string()), (TURN, pa.int32()), (C.MESSAGES, MESSAGES_TYPE),
    (C.SCORE, pa.float64()), (C.SCORE_EXPECTED, pa.float64()), (C.STATUS, pa.string()), (C.REVIEW, pa.string()),
    (C.ATTEMPTS, pa.int32()), (C.ERROR, pa.string()), (C.TOKENS_IN, pa.int64()), (C.TOKENS_OUT, pa.int64()),
    (C.GRADER, pa.string()), (C.DIMENSION, pa.string()), (C.PROMPT_VERSION, pa.string()),
])


class RatedStore(PartStore):
    """`<run_dir>/rated/`: the rated rows of a run (alpaca rows, or conversations with `chat`)."""

    def __init__(self, run_dir: str, chat: bool = False):
        super().__init__(RunDir(run_dir).rated, CHAT_RATED_SCHEMA if chat else RATED_SCHEMA)
        self.run_dir = run_dir

    @property
    def chat(self) -> bool:
        return self.schema is CHAT_RATED_SCHEMA


def open_rated(run_dir: str) -> RatedStore:
    """The rated rows of `run_dir`, of whichever kind its parts hold (conversations have `messages`)."""
    import pyarrow.parquet as pq

    store = RatedStore(run_dir)
    parts = store.parts()
    if parts and C.MESSAGES in pq.read_schema(parts[0], filesystem=store.fs).names:
        return RatedStore(run_dir, chat=True)
    return store


class TurnStore(PartStore):
    """`<run_dir>/rated_turns/`: the rated assistant turns of conversations (`rate.unit=turn`)."""

    def __init__(self, run_dir: str):
        super().__init__(RunDir(run_dir).rated_turns, TURN_SCHEMA)
