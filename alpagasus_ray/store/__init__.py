"""Where data lives: the input files (`inputs`), the run directory's layout and its one way to write a
file whole (`layout`), Parquet parts of rows with results (`parts`, `rated`), and JSONL records
(`records`). Every path may be on a local disk, a shared mount or an object store."""
