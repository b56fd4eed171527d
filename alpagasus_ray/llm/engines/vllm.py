"""The `vllm` engine: a model served by vLLM engines inside Ray Data (`ray.data.llm`).

One engine per GPU (or per tensor-parallel group), `num_engines` of them; prefix caching on, since
the prompts of a stage share their instructions. Replies can be constrained to a set of choices or
a regular expression (structured outputs). A reply that cannot be read is asked again by the
driver's re-ask pass, since an engine's batch cannot wait for one row.
"""

from __future__ import annotations

import json
import math

import pyarrow as pa

from alpagasus_ray.config import pool_size
from alpagasus_ray.llm.context import engine_context
from alpagasus_ray.llm.engines.base import StreamingEngine
from alpagasus_ray.llm.task import (
    LENGTH,
    STOP,
    Reply,
    failed,
    reply_result,
    temperature,
    with_results,
)
from alpagasus_ray.ray_runtime import worker_log_level
from alpagasus_ray.tiny_model import resolve_model

_ROW = "__row__"  # the input row, carried through the vLLM stages as one JSON string


class VllmEngine(StreamingEngine):
    """vLLM engines as a Ray Data LLM processor."""

    constrains = True

    def check(self, section: str) -> None:
        from alpagasus_ray.tiny_model import check_model_dir

        check_model_dir(self.cfg.model)

    def context(self):
        return engine_context(self.cfg)

    def map(self, rows, task, *, attempt: int = 1, sink=None, progress=None):
        endpoint = self.cfg
        sampled = temperature(attempt, endpoint.temperature)

        def preprocess(row: dict) -> dict:
            request = task.request(row)
            sampling = {"temperature": sampled, "max_tokens": request.max_tokens}
            if request.top_logprobs:
                sampling["logprobs"] = request.top_logprobs
            if request.constraint:
                sampling["structured_outputs"] = request.constraint
            text = {"messages": request.messages} if task.chat else {"prompt": request.prompt}
            return {_ROW: json.dumps(row, ensure_ascii=False), **text, "sampling_params": sampling,
                    "_max_tokens": request.max_tokens}

        processor = engine_processor(endpoint, preprocess, chat=task.chat)

        def postprocess(batch: pa.Table) -> pa.Table:
            outputs = batch.to_pylist()
            inputs = [json.loads(o[_ROW]) for o in outputs]
            results = [_result(task, row, out, attempt, endpoint.max_model_len) for row, out in zip(inputs, outputs)]
            return with_results(pa.Table.from_pylist(inputs), task, results, progress, sink)

        # In blocks of a few batches, not a read's (a whole file, up to 128 MiB): every engine gets
        # some, and one that dies holds only a few, which Ray Data runs again on its replacement
        # (see BATCHES_PER_BLOCK). Ray Data LLM runs 8 blocks at once on an engine and queues 8 more.
        return processor(self.in_blocks(rows)).map_batches(postprocess, batch_format="pyarrow", batch_size=None, **light_stage(endpoint))


def _result(task, row: dict, out: dict, attempts: int, max_model_len: int) -> dict:
    tokens_in, tokens_out = int(out.get("num_input_tokens") or 0), int(out.get("num_generated_tokens") or 0)
    error = inference_error(out)
    if error:
        return failed(task, attempts, error, tokens_in, tokens_out)
    # The engine stops at the end-of-sequence token or at a length limit only.
    at_limit = tokens_out >= int(out.get("_max_tokens") or 0) or tokens_in + tokens_out >= max_model_len
    reply = Reply(out.get("generated_text") or "", positions(out.get("logprobs"), out.get("generated_tokens")),
                  LENGTH if at_limit else STOP)
    return reply_result(task, row, reply, attempts, tokens_in, tokens_out)


def light_stage(endpoint) -> dict:
    """Ray resources of the light stages around the engine (templates, tokenizer, parsing).

    On a CPU-only node at their default of one CPU each they can hold every core while the engine
    actor waits for one.
    """
    return {} if endpoint.use_gpu else {"num_cpus": 0.1}


def engine_processor(endpoint, preprocess, *, chat: bool = True):
    """A Ray Data LLM processor with `endpoint.num_engines` vLLM engines on `endpoint.model`.

    `preprocess` turns a row into `messages` (chat: the model's chat template applies) or a plain
    `prompt`, plus `sampling_params`. A row the engine refuses (e.g. longer than max_model_len)
    comes out with `__inference_error__` set instead of ending the job. Logprobs are taken after
    the structured-output mask (`processed_logprobs`): a distribution over the allowed replies.
    """
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    kwargs = {
        "max_model_len": endpoint.max_model_len,
        "enable_prefix_caching": True,
        "tensor_parallel_size": endpoint.tensor_parallel_size,
        "logprobs_mode": "processed_logprobs",
    }
    if not endpoint.use_gpu:
        kwargs.update(dtype="float32", enforce_eager=True)
    kwargs.update(endpoint.engine_kwargs)
    light = light_stage(endpoint)
    config = vLLMEngineProcessorConfig(
        model_source=resolve_model(endpoint.model),
        engine_kwargs=kwargs,
        concurrency=pool_size(endpoint.num_engines),  # a number is a fixed pool: Ray Data would autoscale 1..n
        batch_size=endpoint.batch_size,
        accelerator_type=endpoint.accelerator_type if endpoint.use_gpu else None,
        should_continue_on_error=True,
        # On a CPU node an engine counts as half a CPU (its threads use every core anyway), so that
        # the re-blocking (a task of a whole CPU) and the stages around it fit beside it on two cores.
        placement_group_config=None if endpoint.use_gpu else {"bundles": [{"CPU": 0.5}]},
        runtime_env={"env_vars": engine_env(endpoint)},
        chat_template_stage={"enabled": chat, **light},
        tokenize_stage={"enabled": True, **light},
        detokenize_stage={"enabled": True, **light},
    )
    return build_processor(config, preprocess=preprocess, preprocess_map_kwargs=light)


def engine_env(endpoint) -> dict[str, str]:
    """The environment of the engine workers. They do not see the driver's environment under a
    running cluster, so what they need travels with them: vLLM's log level, and on CPU the KV
    cache size.

    >>> from alpagasus_ray.config import RateVllm
    >>> engine_env(RateVllm(use_gpu=False, cpu_kv_cache_gib=2))
    {'VLLM_LOGGING_LEVEL': 'WARNING', 'VLLM_CPU_KVCACHE_SPACE': '2'}
    """
    env = {"VLLM_LOGGING_LEVEL": worker_log_level()}
    if not endpoint.use_gpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(endpoint.cpu_kv_cache_gib)
    return env


def inference_error(row: dict) -> str | None:
    """The engine's error for a row it refused, as one line; None for a row it answered."""
    error = row.get("__inference_error__")  # "" on rows that succeeded
    return str(error).splitlines()[0][:300] if error else None


def positions(logprobs, chosen_ids) -> list[list[tuple[str, float]]]:
    """Ray Data LLM's logprobs (per token: {token_id: {logprob, rank, decoded_token}}) as lists of
    (token, logprob), the generated token first, then the alternatives by rank."""
    positions = []
    for entry, chosen in zip(logprobs or [], list(chosen_ids) if chosen_ids is not None else []):
        entry = {int(k): v for k, v in (entry or {}).items()}
        first = [entry.pop(int(chosen))] if int(chosen) in entry else []
        rest = sorted(entry.values(), key=lambda v: v.get("rank") or math.inf)
        positions.append([(v.get("decoded_token") or "", float(v["logprob"])) for v in first + rest])
    return positions
