"""One way to map rows through an LLM, shared by every stage that asks one (rate, generate, judge).

    results = llm_map(rows, task, endpoint)   # a lazy Ray Dataset: each row beside its result

In the spirit of `ray.data.llm.build_processor(config, preprocess, postprocess)`: a stage supplies
an `LLMTask`, which says what request a row makes (`request`) and how a reply is read (`read`); the
endpoint config says where it goes. Either backend serves it: vLLM engines through `ray.data.llm`,
or the API actor pool of `backends.openai_api` under the endpoint's concurrency and limits. The
batch backends (`backends.batches`: the OpenAI Batch API, vLLM's batch runner) send request files
instead of a stream of requests; they read replies with the same task and give the same columns.

Every result row holds the input row's columns, the task's `fields`, and the layer's own columns:
`status` (ok, parse_failed, request_failed), `attempts`, `error`, `tokens_in`, `tokens_out`. A reply
the task cannot read is asked once more: inside the request on an API; on vLLM engines, whose
batches cannot wait for one row, by a second pass over the rows that `needs_reask` marks, with
`reask=True` (then sampled, since a greedy re-ask would repeat the reply word for word).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from alpagasus_ray import columns as C
from alpagasus_ray.config import BATCH_BACKENDS, EndpointConfig

# Asks per row: a reply that cannot be read is asked once more, then kept as parse_failed.
MAX_ASKS = 2
# The one re-ask of an unreadable reply on vLLM samples instead of repeating the greedy reply.
REASK_TEMPERATURE = 0.7
# The layer's own result columns, after the task's fields.
STATUS_FIELDS = pa.schema([
    (C.STATUS, pa.string()), (C.ATTEMPTS, pa.int32()), (C.ERROR, pa.string()),
    (C.TOKENS_IN, pa.int64()), (C.TOKENS_OUT, pa.int64()),
])
STOP, LENGTH = "stop", "length"
_ROW = "__row__"  # the input row, carried through the vLLM stages as one JSON string
# The API path's object-store budget and read block size (see `llm_map`). Ray Data gives each
# stage a share of the budget; at 64 MB the actor pool's share was too small to keep its tasks
# running (-40% rows/s), at 256 MB the batches waiting for it stay near 22 MB.
API_OBJECT_STORE_BYTES = 256 * 2**20
API_READ_BLOCK_BYTES = 4 * 2**20
# Batches per block on the API path. An async actor runs up to 4 batches of a block at once (Ray
# Data's RAY_DATA_DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY), and each block is a task that the
# driver's core worker follows: it kept about 15 KB of native memory for each task it had run
# (+120 MB over a 520k-row rating in blocks of one batch; flat in blocks of four).
API_BATCHES_PER_BLOCK = 4


@dataclass(frozen=True)
class Request:
    """What one row asks: chat `messages` or a plain `prompt` (no chat template)."""

    messages: list[dict] | None = None
    prompt: str | None = None
    max_tokens: int = 256
    top_logprobs: int = 0  # alternatives per generated token to return; 0 for none
    constraint: dict | None = None  # vLLM structured outputs, e.g. {"choice": [...]} or {"regex": ...}


@dataclass
class Reply:
    """What came back: the text, the top logprobs per generated token (the chosen token first),
    and why generation stopped (`stop` or `length`)."""

    text: str
    positions: list[list[tuple[str, float]]] = field(default_factory=list)
    finish_reason: str | None = None


class LLMTask(Protocol):
    """What a stage supplies to the layer."""

    fields: pa.Schema  # the columns `read` fills; null when the request failed
    chat: bool  # messages through the model's chat template, or a plain prompt
    engine_kwargs: dict  # extra vLLM engine arguments the task needs

    def request(self, row: dict) -> Request:
        """The request `row` makes."""
        ...

    def read(self, row: dict, reply: Reply) -> tuple[dict[str, Any], str | None]:
        """The task's fields from a reply, and a problem when the reply cannot be used (it is
        then asked once more, and kept as parse_failed if it still cannot)."""
        ...


def result_schema(task: LLMTask) -> pa.Schema:
    """The columns the layer adds to each row."""
    return pa.schema([*task.fields, *STATUS_FIELDS])


def llm_map(rows, task: LLMTask, endpoint: EndpointConfig, *, reask: bool = False, progress=None, sink=None):
    """`rows` (a Ray Dataset) with each row's result beside it (see the module docstring).

    `progress`: what `progress.watch` yields; told of every finished batch.
    `sink`: called on the worker with each finished batch (rows and results) before the batch is
    let go, e.g. to write it where it belongs; the Dataset then holds one row of counts per batch.
    Saving where the batch finishes, rather than in a later Ray Data stage, is what bounds what a
    kill loses to the batches partly done.
    """
    if endpoint.backend in BATCH_BACKENDS:  # request files, not a stream of requests
        raise ValueError(f"backend {endpoint.backend} sends request files: use backends.batches, not llm_map")
    if endpoint.backend == "openai":
        from alpagasus_ray.backends.openai_api import map_with_api

        # Ray keeps an object under 100 KB (a block of a few batches) in the memory of the process
        # that owns it, the driver: blocks read ahead of a slow API piled up there (+110 MB after 94k of
        # 520k rows), and a read block (up to 128 MiB by default) is cut into batches all at
        # once (4,067 at 520k rows). A capped object-store budget and small read blocks bound
        # them. The context is the whole pipeline's, the read included.
        context = rows.context
        limits = context.execution_options.resource_limits
        context.execution_options.resource_limits = limits.copy(
            object_store_memory=min(limits.object_store_memory, API_OBJECT_STORE_BYTES))
        small_blocks(rows)
        return map_with_api(rows, task, endpoint, progress=progress, sink=sink, reask=reask)
    return _map_with_vllm(rows, task, endpoint, reask=reask, progress=progress, sink=sink)


def small_blocks(rows) -> None:
    """Cap the blocks of `rows`'s whole pipeline, the read included, at `API_READ_BLOCK_BYTES`
    (Ray Data's default is 128 MiB: a driver that takes the blocks in would hold that much)."""
    context = rows.context
    context.target_max_block_size = min(context.target_max_block_size or API_READ_BLOCK_BYTES, API_READ_BLOCK_BYTES)


def run_to_end(results) -> None:
    """Run a Dataset whose work is done on the workers (the `sink` of `llm_map` writes each batch),
    without fetching its rows of counts to the driver: it only follows the blocks' references."""
    for _ in results.iter_internal_ref_bundles():
        pass


def needs_reask(results: pa.Table) -> pa.ChunkedArray:
    """Rows whose reply could not be read on the first ask (vLLM's second pass takes them)."""
    return pc.and_(pc.equal(results[C.STATUS], C.PARSE_FAILED), pc.less(results[C.ATTEMPTS], MAX_ASKS))


def result_row(task: LLMTask, fields: dict | None, status: str, attempts: int, error: str | None,
               tokens_in: int, tokens_out: int) -> dict:
    """The result columns of one row, in the order of `result_schema`."""
    fields = fields or {}
    return {**{f.name: fields.get(f.name) for f in task.fields}, C.STATUS: status, C.ATTEMPTS: attempts,
            C.ERROR: error, C.TOKENS_IN: tokens_in, C.TOKENS_OUT: tokens_out}


def read_reply(task: LLMTask, row: dict, reply: Reply, attempts: int, tokens_in: int, tokens_out: int) -> dict:
    """The result of a reply that came back: ok, or parse_failed with the task's reason."""
    fields, problem = task.read(row, reply)
    status = C.OK if problem is None else C.PARSE_FAILED
    return result_row(task, fields, status, attempts, problem, tokens_in, tokens_out)


def with_results(batch: pa.Table, task: LLMTask, results: list[dict], progress=None, sink=None) -> pa.Table:
    """`batch` with the result columns appended (results are in the batch's row order), handed to
    `sink` when there is one (then only the batch's counts are returned)."""
    table = pa.Table.from_pylist(results, schema=result_schema(task))
    for name in table.column_names:
        if name in batch.column_names:
            batch = batch.drop_columns([name])
        batch = batch.append_column(table.schema.field(name), table[name])
    if sink is not None:
        sink(batch)  # counted below only once it is saved
    if progress is not None:
        progress.add(table)
    return batch if sink is None else pa.table({"rows": [batch.num_rows]})


def _map_with_vllm(rows, task: LLMTask, endpoint: EndpointConfig, *, reask: bool, progress, sink):
    from alpagasus_ray.backends.vllm_engine import engine_processor, light_stage

    temperature = REASK_TEMPERATURE if reask else endpoint.temperature

    def preprocess(row: dict) -> dict:
        request = task.request(row)
        sampling = {"temperature": temperature, "max_tokens": request.max_tokens}
        if request.top_logprobs:
            sampling["logprobs"] = request.top_logprobs
        if request.constraint:
            sampling["structured_outputs"] = request.constraint
        text = {"messages": request.messages} if task.chat else {"prompt": request.prompt}
        return {_ROW: json.dumps(row, ensure_ascii=False), **text, "sampling_params": sampling,
                "_max_tokens": request.max_tokens}

    processor = engine_processor(endpoint, preprocess, chat=task.chat, engine_kwargs=task.engine_kwargs)
    attempts = 2 if reask else 1

    def postprocess(batch: pa.Table) -> pa.Table:
        outputs = batch.to_pylist()
        inputs = [json.loads(o[_ROW]) for o in outputs]
        results = [_engine_result(task, row, out, attempts, endpoint.max_model_len) for row, out in zip(inputs, outputs)]
        return with_results(pa.Table.from_pylist(inputs), task, results, progress, sink)

    return processor(rows).map_batches(postprocess, batch_format="pyarrow", batch_size=None, **light_stage(endpoint))


def _engine_result(task: LLMTask, row: dict, out: dict, attempts: int, max_model_len: int) -> dict:
    from alpagasus_ray.backends.vllm_engine import inference_error, positions

    tokens_in, tokens_out = int(out.get("num_input_tokens") or 0), int(out.get("num_generated_tokens") or 0)
    error = inference_error(out)
    if error:
        return result_row(task, None, C.REQUEST_FAILED, attempts, error, tokens_in, tokens_out)
    # The engine stops at the end-of-sequence token or at a length limit only.
    at_limit = tokens_out >= int(out.get("_max_tokens") or 0) or tokens_in + tokens_out >= max_model_len
    reply = Reply(out.get("generated_text") or "", positions(out.get("logprobs"), out.get("generated_tokens")),
                  LENGTH if at_limit else STOP)
    return read_reply(task, row, reply, attempts, tokens_in, tokens_out)


def ask_all(rows: list[dict], task: LLMTask, endpoint: EndpointConfig, save, progress=None,
            batch_dir: str | None = None) -> None:
    """For small stages (hundreds of rows, as generate and judge have): ask every row through the
    layer and hand each finished batch to `save` (a list of rows, each with its result) as it
    arrives, so a killed job keeps what was saved. Rows whose reply could not be read are asked
    once more (the vLLM second pass; an API has asked again already). A batch backend writes
    its request files and their records under `batch_dir`, and the rows need a unique `key`."""
    import ray

    if endpoint.backend in BATCH_BACKENDS:
        from alpagasus_ray.backends.batches import BatchStore, ask_in_batches

        if batch_dir is None:
            raise ValueError(f"backend {endpoint.backend} needs a directory for its request files")
        return ask_in_batches(rows, task, endpoint, BatchStore(batch_dir), save, progress)

    names = list(rows[0]) if rows else []
    for reask in (False, True):
        if not rows:
            return
        table = pa.Table.from_pylist(rows)
        blocks = [table.slice(i, endpoint.batch_size) for i in range(0, table.num_rows, endpoint.batch_size)]
        results = llm_map(ray.data.from_arrow(blocks), task, endpoint, reask=reask, progress=progress)
        again = []
        for batch in results.iter_batches(batch_size=None, batch_format="pyarrow"):
            save(batch.to_pylist())
            if not reask:
                again += batch.filter(needs_reask(batch)).select(names).to_pylist()
        rows = again
