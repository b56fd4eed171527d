"""`PartResults`: a stage's results as Parquet parts in a `rated.PartStore`, for the LLM layer.

The engines save each finished batch as a part (`writer`, on the worker where it finished); the
driver asks the store which ids to ask again and for the rows to send; a finished pass over them
replaces the rows it was asked for. The same store serves a run directory on a local disk, a
shared mount or an object store.
"""

from __future__ import annotations

from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from alpagasus_ray import columns as C
from alpagasus_ray.llm.task import replaced_by
from alpagasus_ray.store.parts import PartStore, PartWriter


class PartResults:
    """`store`'s parts as the `task.Results` of a stage. `to_stored` turns a batch of rows with
    their results into the store's rows (picklable: it runs on the workers); `sent` names the
    columns a row is sent with, read back from the store to ask it again."""

    def __init__(self, store: PartStore, sent: list[str], to_stored: Callable[[pa.Table], pa.Table] | None = None):
        self.store, self.sent, self.to_stored = store, sent, to_stored

    def writer(self, prefix: str = "part") -> PartWriter:
        return PartWriter(self.store.uri, self.store.schema, self.to_stored, prefix)

    def parts(self) -> list[str]:
        return self.store.parts()

    def remove_parts(self, prefix: str) -> int:
        return self.store.remove_parts(prefix)

    def ids_to_ask_again(self, retry_failed: bool, reask: bool) -> list[str]:
        return self.store.ids_to_ask_again(retry_failed, reask)

    def rows(self, ids: list[str]) -> list[pa.Table]:
        """The failed rows of `ids` as they were sent: a few rows, the failures of a run."""
        wanted = pc.field(C.ID).isin(ids) & (pc.field(C.STATUS) != C.OK)
        schema = pa.schema([self.store.schema.field(n) for n in self.sent])
        return [pa.Table.from_batches([b], schema=schema) for b in self.store.batches(self.sent, wanted) if b.num_rows]

    def replace(self, ids: list[str], round: str, keep_parts: set[str]) -> None:
        self.store.drop_rows(ids, replaced_by(round), keep_parts=keep_parts)
