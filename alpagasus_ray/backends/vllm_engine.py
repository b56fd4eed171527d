"""The `vllm` backend of the LLM layer: a model served by vLLM engines inside Ray Data (`ray.data.llm`).

One engine per GPU (or per tensor-parallel group), `num_engines` of them; prefix caching on, since
the prompts of a stage share their instructions.
"""

from __future__ import annotations

import math

from alpagasus_ray.config import EndpointConfig, pool_size
from alpagasus_ray.ray_runtime import worker_log_level
from alpagasus_ray.tiny_model import resolve_model


def light_stage(endpoint: EndpointConfig) -> dict:
    """Ray resources of the light stages around the engine (templates, tokenizer, parsing).

    On a CPU-only node at their default of one CPU each they can hold every core while the engine
    actor waits for one.
    """
    return {} if endpoint.use_gpu else {"num_cpus": 0.1}


def engine_processor(endpoint: EndpointConfig, preprocess, *, chat: bool = True, engine_kwargs: dict | None = None):
    """A Ray Data LLM processor with `endpoint.num_engines` vLLM engines on `endpoint.model`.

    `preprocess` turns a row into `messages` (chat: the model's chat template applies) or a plain
    `prompt`, plus `sampling_params`. A row the engine refuses (e.g. longer than max_model_len)
    comes out with `__inference_error__` set instead of ending the job.
    """
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    kwargs = {
        "max_model_len": endpoint.max_model_len,
        "enable_prefix_caching": True,
        "tensor_parallel_size": endpoint.tensor_parallel_size,
        **(engine_kwargs or {}),
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
        placement_group_config=None if endpoint.use_gpu else {"bundles": [{"CPU": 1}]},
        runtime_env={"env_vars": engine_env(endpoint)},
        chat_template_stage={"enabled": chat, **light},
        tokenize_stage={"enabled": True, **light},
        detokenize_stage={"enabled": True, **light},
    )
    return build_processor(config, preprocess=preprocess, preprocess_map_kwargs=light)


def engine_env(endpoint: EndpointConfig) -> dict[str, str]:
    """The environment of the engine workers. They do not see the driver's environment under a
    running cluster, so what they need travels with them: vLLM's log level, and on CPU the KV
    cache size.

    >>> from alpagasus_ray.config import RateConfig
    >>> engine_env(RateConfig(use_gpu=False, cpu_kv_cache_gib=2))
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
