"""The rated rows of a run: Parquet parts under `<run_dir>/rated/` (see `parts`), one row per input
row with its rating or the reason it was set aside."""

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
    (C.SOURCE, pa.string()),
])


class RatedStore(PartStore):
    """`<run_dir>/rated/`: the rated rows of a run."""

    def __init__(self, run_dir: str):
        super().__init__(RunDir(run_dir).rated, RATED_SCHEMA)
        self.run_dir = run_dir
