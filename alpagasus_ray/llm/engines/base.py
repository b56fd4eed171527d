"""The interface every engine implements: one pass of rows through a model, into `Results`.

    engine = engine_for(endpoint)        # llm.engines: the backend is chosen there, once
    engine.check("rate")                 # fail before anything is sent (a key, a model directory)
    engine.ask(rows, task, results, attempt=1, round=FIRST, progress=p)

Two kinds share it:
- streaming engines (vllm, openai) map a Ray Dataset through the model on the workers; each
  finished batch is saved by the worker where it finished (`results.writer()`);
- file engines (openai_batch, vllm_batch) write the rows as request files, send them, follow
  their batches and collect each one that ends into `results`; a killed or detached run is taken
  up again from their records (`in_flight`, `detach`, `cancel`).
The driver (`llm.driver`) calls `ask` once per pass: the first over the new rows, then a retry of
the request failures and a re-ask of the unreadable replies.
"""

from __future__ import annotations

from alpagasus_ray import columns as C
from alpagasus_ray.config import ConfigError
from alpagasus_ray.errors import CapReached
from alpagasus_ray.llm.context import Context
from alpagasus_ray.llm.task import FIRST, LLMTask, Results, Sink
from alpagasus_ray.rules.budget import SharedSpending, usd


class Engine:
    """What the driver and the stages may ask of a backend. Subclasses override `ask`; the rest
    has the defaults of a streaming engine that costs nothing."""

    # Honours `Request.constraint` (structured outputs): tasks constrain replies only then.
    constrains = False
    # Sends request files, which a run can leave running (`detach`) and `cancel`.
    sends_files = False

    def __init__(self, endpoint, workdir: str | None = None):
        self.cfg = endpoint
        self.workdir = workdir
        self.spending = None  # a `SharedSpending` actor under the endpoint's max_cost_usd (`cap_spending`)
        self.section = None

    @property
    def name(self) -> str:
        """backend:model, as recorded beside every result."""
        return f"{self.cfg.backend}:{self.cfg.model}"

    def check(self, section: str) -> None:
        """Raise ConfigError (or InputError) when the engine cannot run, before anything is sent."""

    def context(self) -> Context | None:
        """The model's context, which no request may exceed; None when not known."""
        return None

    def price_factor(self) -> float | None:
        """The fraction of the configured prices this engine pays; None when it is not paid."""
        return None

    def cost(self, tokens_in: int, tokens_out: int, *, full_price: bool = False) -> float | None:
        """USD for these tokens at the endpoint's prices (`full_price`: without a batch discount);
        None when not priced or not paid.

        >>> from alpagasus_ray.config import OpenAIBatchEndpoint
        >>> class Paid(Engine):
        ...     def price_factor(self): return 0.5
        >>> paid = Paid(OpenAIBatchEndpoint(price_input_per_million=2.0, price_output_per_million=8.0))
        >>> paid.cost(10**6, 10**6), paid.cost(10**6, 10**6, full_price=True)
        (5.0, 10.0)
        """
        factor = self.price_factor()
        if factor is not None and full_price:
            factor = 1.0
        cfg = self.cfg
        if factor is None or cfg.price_input_per_million is None or cfg.price_output_per_million is None:
            return None
        return round(usd(tokens_in, tokens_out, cfg.price_input_per_million, cfg.price_output_per_million, factor), 6)

    def cap_spending(self, stores, section: str) -> None:
        """Hold the requests of this engine under `<section>.max_cost_usd`, the usage saved in
        `stores` (the stage's results, of earlier runs too) counted as spent. Without a cap, nothing."""
        import ray

        cap = getattr(self.cfg, "max_cost_usd", None)
        if cap is None or self.spending is not None:
            return
        tokens_in = tokens_out = 0
        for store in stores:
            more_in, more_out = store.tokens()
            tokens_in, tokens_out = tokens_in + more_in, tokens_out + more_out
        spent = self.cost(tokens_in, tokens_out) or 0.0
        self.section = section
        self.spending = ray.remote(SharedSpending).options(num_cpus=0, max_concurrency=1).remote(cap, spent)

    def stop_at_cap(self) -> None:
        """Raise CapReached when the spending cap has refused a request: the end of the stage."""
        import ray

        if self.spending is None:
            return
        state = ray.get(self.spending.state.remote())
        if state["stopped"]:
            raise CapReached(
                f"{self.section}.max_cost_usd is ${state['cap_usd']:,.4g}; spent ${state['spent_usd']:,.4f} (the usage the "
                f"API reported, priced, earlier runs included); {state['refused']:,} requests were not sent, since the "
                f"next could have passed the cap. What came back is saved: raise {self.section}.max_cost_usd and run "
                "the same command again, it goes on from here and sends nothing twice.")

    def ask(self, rows, task: LLMTask, results: Results, *, attempt: int = 1, round: str = FIRST, progress=None,
            detach: bool = False) -> list:
        """Ask every row of `rows` (a Ray Dataset; None for none) and save the results to `results`;
        `attempt` is the ask this is for each row (2 for a re-ask). Returns what is still running
        (only with `detach`, for an engine that sends files)."""
        raise NotImplementedError

    def in_flight(self) -> tuple[str, list[str]] | None:
        """(filesystem URI, Parquet files) of rows sent but not yet collected, which a rerun must
        not send again; None when there are none."""
        return None

    def cancel(self, task: LLMTask, results: Results) -> dict:
        raise ConfigError(f"--cancel is for the backends that send request files, not backend={self.cfg.backend}")

    def summary(self) -> dict | None:
        """What the stage's summary records of the engine's own work (request files, batches)."""
        return None


# Batches in each block a streaming engine's workers take. A block is one Ray task: an async
# worker runs its batches at once (Ray Data's RAY_DATA_DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY is
# 4), a worker that dies has its blocks run again by its replacement (what a block's finished
# batches answered is asked again, never saved twice), and the driver's core worker kept about
# 15 KB for each task it had run (+120 MB over a 520k-row API rating in blocks of one batch; flat
# in blocks of four). A read yields one block per input file, up to 128 MiB.
BATCHES_PER_BLOCK = 4


class StreamingEngine(Engine):
    """An engine that maps a Ray Dataset through the model on the workers (`map`)."""

    @property
    def block_rows(self) -> int:
        """Rows in each block the workers take: `BATCHES_PER_BLOCK` batches."""
        return self.cfg.batch_size * BATCHES_PER_BLOCK

    def in_blocks(self, rows):
        """`rows` in blocks of `block_rows` rows (the last ones fewer)."""
        return rows.repartition(target_num_rows_per_block=self.block_rows)

    def map(self, rows, task: LLMTask, *, attempt: int = 1, sink: Sink | None = None, progress=None):
        """`rows` with each row's result beside it, a lazy Dataset; with `sink`, each finished batch
        is handed to it on the worker and the Dataset holds one row of counts per batch."""
        raise NotImplementedError

    def ask(self, rows, task: LLMTask, results: Results, *, attempt: int = 1, round: str = FIRST, progress=None,
            detach: bool = False) -> list:
        if rows is None:
            return []
        ids = None
        if round != FIRST:  # the rows of an ask again are few: the failures
            ids = [i for b in rows.select_columns([C.ID]).iter_batches(batch_format="pyarrow")
                   for i in b[C.ID].to_pylist()]
        before = set(results.parts()) if ids else set()
        run_to_end(self.map(rows, task, attempt=attempt, sink=results.writer(), progress=progress))
        # Before the rows asked again replace theirs: a row the cap kept from being sent keeps its old one.
        self.stop_at_cap()
        if ids:
            results.replace(ids, round, keep_parts=set(results.parts()) - before)
        return []


def run_to_end(dataset) -> None:
    """Run a Dataset whose work is done on the workers (a sink writes each batch), without
    fetching its rows of counts to the driver: it only follows the blocks' references."""
    for _ in dataset.iter_internal_ref_bundles():
        pass
