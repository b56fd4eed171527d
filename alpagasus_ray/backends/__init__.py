"""The two ways to call a model, behind the LLM layer (`alpagasus_ray.llm_map`) that every stage uses.

`openai_api` holds the Ray Data actors that call an OpenAI-compatible API (slots, the shared
RPM/TPM limiter, Retry-After pauses, the ask-again loop); `vllm_engine` builds the Ray Data LLM
processors on vLLM engines. Heavy imports (vllm, openai) stay inside these modules.
"""
