"""The engines of the LLM layer, one module per backend, all behind `base.Engine`.

`engine_for` is the one place that reads an endpoint's `backend`: a new provider is a new module
here and a line in `ENGINES`. Heavy imports (vllm, openai, ray.data.llm) stay inside the engine
modules, which are imported only when their backend is chosen.
"""

from __future__ import annotations

import importlib

from alpagasus_ray.llm.engines.base import Engine

# backend -> module:class of its engine.
ENGINES = {
    "vllm": "alpagasus_ray.llm.engines.vllm:VllmEngine",
    "openai": "alpagasus_ray.llm.engines.api:ApiEngine",
    "openai_batch": "alpagasus_ray.llm.engines.openai_batch:OpenAIBatchEngine",
    "anthropic_batch": "alpagasus_ray.llm.engines.anthropic_batch:AnthropicBatchEngine",
    "vllm_batch": "alpagasus_ray.llm.engines.vllm_batch:VllmBatchEngine",
}


def engine_for(endpoint, workdir: str | None = None) -> Engine:
    """The engine that serves `endpoint` (a config with `backend`). `workdir` is where an engine
    that sends request files keeps them and their records (e.g. `<run_dir>/batches`)."""
    module, _, name = ENGINES[endpoint.backend].partition(":")
    return getattr(importlib.import_module(module), name)(endpoint, workdir)
