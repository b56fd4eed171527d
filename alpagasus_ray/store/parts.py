"""Rows with their results as Parquet parts in a directory, on a local disk, a shared mount or an
object store (s3://, gs://), written by the workers and read back by streaming scans.

The workers write each finished batch as a part (`PartWriter`); this module reads the parts back a
batch at a time (`pyarrow.dataset`), so the process reading holds counts or the rows it keeps,
never the whole table. Each id has one row once a stage has finished; while an ask-again pass
runs, an id can have two, and the better status wins (ok, parse_failed, request_failed,
invalid_input). The rated rows (`rated`), a model's answers and a judge's verdicts are all kept so.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from alpagasus_ray import columns as C
from alpagasus_ray.store.layout import (
    STAGING_PREFIX,
    open_filesystem,
    publish,
    staging_path,
)

SCAN_BATCH_ROWS = 65_536
# Rows of the small parts gathered into one batch by `RatedStore.batches`: few batches per run,
# each small enough that gathering it costs little (its text, when read, a few MB).
COALESCE_ROWS = 8_192
# Parts scanned together: a pyarrow scan keeps some state per file until it ends, about 48 KB for
# each of the run's small parts (8,125 parts at 520k rows: +390 MB); a few hundred at a time bound it.
SCAN_PARTS = 256
# Parts read ahead of the caller, in this thread (no scanner threads): Arrow's threaded defaults
# (4 files, 16 batches each) decode parts ahead while a slow caller works through one, which held
# the text of ~300 MB of conversations at 520k rows when the filter read their keyword categories
# (filter peak RSS x2.46 of 52k's; x1.17 read this way, at the same speed).
READAHEAD_PARTS = 2


class PartStore:
    """A directory of Parquet parts of rows with `schema` (an `id` and a `status` among its
    columns), on whatever filesystem `uri` is on."""

    def __init__(self, uri: str, schema: pa.Schema):
        self.uri, self.schema = uri, schema
        self.fs, self.path = open_filesystem(uri)

    def parts(self) -> list[str]:
        """The finished part files (filesystem paths), in name order."""
        found = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False, allow_not_found=True))
        return sorted(
            f.path for f in found
            if f.type == pafs.FileType.File and f.path.endswith(".parquet")
            and not os.path.basename(f.path).startswith((".", "_"))
        )

    def remove_unfinished(self) -> None:
        """Delete the temporary files of parts a kill interrupted."""
        found = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False, allow_not_found=True))
        for f in found:
            if os.path.basename(f.path).startswith(STAGING_PREFIX):
                self.fs.delete_file(f.path)

    def remove_parts(self, prefix: str) -> int:
        """Delete the parts whose names start with `prefix-` (e.g. what an interrupted
        collection of one batch wrote, before it is collected again). Returns how many."""
        doomed = [p for p in self.parts() if os.path.basename(p).startswith(f"{prefix}-")]
        for path in doomed:
            self.fs.delete_file(path)
        return len(doomed)

    def write(self, table: pa.Table, prefix: str = "part") -> str:
        """Save `table` as a new part; readers never see a half-written file. Returns its path."""
        self.fs.create_dir(self.path, recursive=True)
        name = f"{prefix}-{uuid.uuid4().hex[:12]}.parquet"
        final = f"{self.path}/{name}"
        pq.write_table(table, staging_path(self.fs, final), filesystem=self.fs)
        publish(self.fs, final)
        return final

    def batches(self, columns: list[str], filter=None, parts: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The rows of the parts (all, or `parts`), with only `columns`, in batches of about
        `COALESCE_ROWS` rows: a scan yields a batch per part at least, and the parts are as small
        as a batch of requests (64 rows); a caller that keeps something of every batch would hold
        thousands of tiny tables (a few KB each besides their rows: +100 MB at 520k rows)."""
        parts = self.parts() if parts is None else parts
        held, rows = [], 0
        for start in range(0, len(parts), SCAN_PARTS):
            dataset = pds.dataset(parts[start:start + SCAN_PARTS], schema=self.schema, format="parquet",
                                  filesystem=self.fs)
            for batch in dataset.to_batches(columns=columns, filter=filter, batch_size=SCAN_BATCH_ROWS,
                                            fragment_readahead=READAHEAD_PARTS, batch_readahead=READAHEAD_PARTS,
                                            use_threads=False):
                if batch.num_rows:
                    held.append(batch)
                    rows += batch.num_rows
                if rows >= COALESCE_ROWS:
                    yield _one_batch(held)
                    held, rows = [], 0
        if held:
            yield _one_batch(held)

    def read(self) -> pa.Table:
        """Every rated row in memory, one per id, in id order: for small runs and tests."""
        batches = list(self.batches(self.schema.names))
        if not batches:
            return self.schema.empty_table()
        return best_per_id(pa.Table.from_batches(batches, schema=self.schema))

    def values(self, column: str) -> set:
        """The distinct values of a column that holds few (the grader, the dimension)."""
        found = set()
        for batch in self.batches([column]):
            found.update(pc.unique(batch.column(0)).to_pylist())
        return found

    def tokens(self) -> tuple[int, int]:
        """(tokens_in, tokens_out) over every part: the usage the model reported for the rows saved."""
        tokens_in = tokens_out = 0
        for batch in self.batches([C.TOKENS_IN, C.TOKENS_OUT]):
            more_in, more_out = token_sums(batch)
            tokens_in, tokens_out = tokens_in + more_in, tokens_out + more_out
        return tokens_in, tokens_out

    def status_counts(self) -> dict[str, int]:
        """Rows per status over every part."""
        counts = Counter(dict.fromkeys(C.STATUSES, 0))
        for batch in self.batches([C.STATUS]):
            counts.update(value_counts(batch.column(0)))
        return dict(counts)

    def ids_to_ask_again(self, retry_failed: bool, reask: bool) -> list[str]:
        """Ids whose best row is a request failure (with `retry_failed`) or a first unreadable
        reply (with `reask`). Held in memory: they are the failures, not the whole run.

        Rows a finished re-ask already replaced (a kill between its writes and its clean-up
        leaves them) are removed here, so each id has one row again.
        """
        wanted = C.to_ask_again(retry_failed, reask)
        if wanted is None:
            return []
        candidates = {i for b in self.batches([C.ID], wanted) for i in b.column(0).to_pylist()}
        if not candidates:
            return []
        settled = self.batches([C.ID], pc.field(C.ID).isin(list(candidates)) & ~wanted)
        settled = {i for b in settled for i in b.column(0).to_pylist()}
        if settled:
            self.drop_rows(sorted(settled), wanted)
        return sorted(candidates - settled)

    def drop_rows(self, ids: list[str], which: pc.Expression, keep_parts: set[str] = frozenset()) -> int:
        """Remove the rows of `ids` that match `which` from the parts (but `keep_parts`),
        rewriting each part that holds one; a kill half-way leaves a row twice, never none.
        Returns the rows removed."""
        doomed = pc.field(C.ID).isin(ids) & which
        removed = 0
        for part in self.parts():
            if part in keep_parts:
                continue
            hits = sum(b.num_rows for b in self.batches([C.ID], doomed, parts=[part]))
            if hits:
                table = pq.read_table(part, filesystem=self.fs, schema=self.schema)
                self.write(table.filter(~doomed), prefix="data")
                self.fs.delete_file(part)
                removed += hits
        return removed


def _one_batch(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0] if len(batches) > 1 else batches[0]


def best_per_id(table: pa.Table) -> pa.Table:
    """One row per id, the best status first (ok, parse_failed, request_failed, invalid_input),
    then the most attempts; in id order."""
    if table.num_rows == 0:
        return table
    rank = pc.index_in(table[C.STATUS], value_set=pa.array(C.STATUSES))  # STATUSES lists ok first
    table = table.append_column("_rank", rank).sort_by(
        [(C.ID, "ascending"), ("_rank", "ascending"), (C.ATTEMPTS, "descending")]
    )
    ids = table[C.ID].combine_chunks()
    first_of_id = pa.concat_arrays([pa.array([True]), pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))])
    return table.filter(first_of_id).drop_columns(["_rank"])


class PartWriter:
    """A sink for the LLM layer: turns a finished batch into stored rows (`to_stored`) and writes
    it as a part of `uri`, on the worker where it finished. A part is whole or absent (written
    under a temporary name, then renamed; an object store shows an object once it is whole), so
    the parts are their own record of what is done: a rerun skips their ids (`skip_done`)."""

    def __init__(self, uri: str, schema: pa.Schema, to_stored=None, prefix: str = "part"):
        self.uri, self.schema, self.to_stored, self.prefix = uri, schema, to_stored, prefix
        self._store = None

    def __call__(self, batch: pa.Table) -> None:
        if self._store is None:
            self._store = PartStore(self.uri, self.schema)
        if batch.num_rows:
            self._store.write(self.to_stored(batch) if self.to_stored else batch, prefix=self.prefix)


def done_ids(store: PartStore, also: tuple[str, list[str]] | None = None):
    """An ObjectRef to the sorted ids already written in `store` (and in the Parquet files `also`
    = (filesystem URI, paths in it), e.g. rows sent in batches still running), made by a Ray task
    (the ids never reach the driver); None when there are none."""
    import ray

    if not store.parts() and not (also and also[1]):
        return None
    return ray.remote(_sorted_ids).options(num_cpus=0.5).remote(store.uri, store.schema, also)


def _sorted_ids(uri: str, schema: pa.Schema, also: tuple[str, list[str]] | None = None):
    import numpy as np

    chunks = [b.column(0) for b in PartStore(uri, schema).batches([C.ID])]
    if also and also[1]:
        fs, _ = open_filesystem(also[0])
        chunks += [b.column(0) for b in pds.dataset(also[1], format="parquet", filesystem=fs).to_batches(columns=[C.ID])]
    ids = pa.chunked_array(chunks, pa.string()).to_numpy().astype(str) if chunks else np.array([], dtype=str)
    return np.sort(ids)


_DONE_CACHE: dict = {}


def skip_done(batch: pa.Table, done: list) -> pa.Table:
    """`batch` without the rows whose id is in `done[0]` (a ref from `done_ids`; fetched once per
    worker process), by binary search in the sorted ids."""
    import numpy as np
    import ray

    ref = done[0]
    key = ref.hex()
    if key not in _DONE_CACHE:
        _DONE_CACHE.clear()
        _DONE_CACHE[key] = ray.get(ref)
    written = _DONE_CACHE[key]
    if batch.num_rows == 0 or len(written) == 0:
        return batch
    ids = batch[C.ID].to_numpy(zero_copy_only=False).astype(str)
    where = np.minimum(np.searchsorted(written, ids), len(written) - 1)
    return batch.filter(pa.array(written[where] != ids))


def value_counts(values) -> Counter:
    """How many times each value occurs in an Arrow array or column (None counted as a value).

    >>> value_counts(pa.array(["ok", "ok", None, "parse_failed"]))
    Counter({'ok': 2, None: 1, 'parse_failed': 1})
    """
    return Counter({item["values"]: item["counts"] for item in pc.value_counts(values).to_pylist()})


def token_sums(rows: pa.Table | pa.RecordBatch) -> tuple[int, int]:
    """(tokens_in, tokens_out) summed over `rows` (a row without usage counts 0)."""
    return (pc.sum(rows[C.TOKENS_IN]).as_py() or 0, pc.sum(rows[C.TOKENS_OUT]).as_py() or 0)
