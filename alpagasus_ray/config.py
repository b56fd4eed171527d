"""Typed configuration: pydantic models loaded from YAML, with `dotted.key=value` overrides.

Unknown keys are errors that name the key. Every YAML under `configs/` is an instance of `Config`.
Secrets are never part of a config: the API key is read from the environment variable that
`rate.api_key_env` names.
"""

from __future__ import annotations

import logging
import os
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from alpagasus_ray.errors import ConfigError

# The backends, and the sections of a config that name one.
BACKENDS = ("openai", "openai_batch", "anthropic_batch", "vllm", "vllm_batch")
ENDPOINT_SECTIONS = ("rate", "generate", "judge")


def operational(default: Any = ..., **kwargs) -> Any:
    """A field that changes how fast a stage runs, or where it keeps scratch state, not its result:
    left out of the fingerprints that decide whether a stage must run again (`OPERATIONAL`)."""
    return Field(default, json_schema_extra={"operational": True}, **kwargs)


def pool_size(value: int | tuple[int, int]) -> tuple[int, int]:
    """(min, max) actors of a pool: a number is a fixed pool, a pair a range to autoscale in.

    >>> pool_size(4), pool_size((1, 8))
    ((4, 4), (1, 8))
    """
    return (value, value) if isinstance(value, int) else tuple(value)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ColumnsConfig(_Strict):
    """Where a conversation is in a row, for layouts other than `messages` and ShareGPT's own, in
    LLaMA-Factory's names (the `columns` and `tags` of its dataset_info.json, in one mapping)."""

    messages: str | None = Field(None, description="The field holding the list of turns (default: 'messages' for messages, 'conversations' for sharegpt).")
    system: str | None = Field(None, description="A field holding a system prompt, put before the turns as a system turn.")
    role_tag: str | None = Field(None, description="The key of a turn's role (default: 'role' for messages, 'from' for sharegpt).")
    content_tag: str | None = Field(None, description="The key of a turn's text (default: 'content' for messages, 'value' for sharegpt).")
    user_tag: str | list[str] | None = Field(None, description="The role name(s) of the user (default: 'user'; sharegpt also 'human').")
    assistant_tag: str | list[str] | None = Field(None, description="The role name(s) of the assistant (default: 'assistant'; sharegpt also 'gpt').")
    system_tag: str | list[str] | None = Field(None, description="The role name(s) of a system turn (default: 'system').")


class DataConfig(_Strict):
    """Where the instruction-tuning rows come from."""

    path: str = Field(
        "builtin:alpaca_sample",
        description="A file, a directory or a glob of JSON-array, JSONL or Parquet files; local or any "
        "filesystem pyarrow reads (s3://, gs://). 'builtin:alpaca_sample' is the sample shipped with the package.",
    )
    format: Literal["auto", "json", "jsonl", "parquet"] = Field(
        "auto", description="File format; 'auto' goes by the extension and, for .json, by the first character."
    )
    formatting: Literal["auto", "alpaca", "messages", "sharegpt"] = Field(
        "auto",
        description="The shape of a row: alpaca (instruction, input, output), messages (chat turns with role and "
        "content), sharegpt (turns with from and value under conversations); 'auto' decides per file from its first rows.",
    )
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig, description="Where a conversation is in a row (see below).")
    id_field: str = Field("id", description="Input field holding a row id; rows without one get an id from their content.")
    field_map: dict[str, str] = Field(
        default_factory=dict,
        description="Extra renames from input field to instruction/input/output, applied after the Dolly names "
        "(context -> input, response -> output).",
    )
    max_row_chars: int = Field(
        32_000, gt=0, description="Rows longer than this (instruction + input + output, or all turns of a conversation) "
        "are set aside as invalid_input."
    )
    limit: int | None = Field(None, gt=0, description="Use only the first N rows (for trials).")


class _Endpoint(_Strict):
    """The keys every backend has."""

    model: str = Field("gpt-3.5-turbo", description="Model name at the API, or a model directory / hub id for vllm.")
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature.")
    batch_size: int = operational(64, gt=0, description="Rows per batch, the unit saved to disk as it finishes (the API path sends blocks of 4 batches to each worker).")
    retry_failed: bool = operational(False, description="On a rerun, send rows that ended request_failed again.")


class _Body(_Strict):
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra JSON fields of each request body, e.g. {structured_outputs: {choice: [...]}} on a vLLM server.",
    )


class _Api(_Body):
    """The keys of an HTTP API."""

    base_url: str | None = Field(None, description="OpenAI-compatible endpoint, e.g. http://host:8000/v1; None means OpenAI's.")
    api_key_env: str = operational("OPENAI_API_KEY", description="Environment variable holding the API key (never the key itself).")
    max_retries: int = operational(5, ge=0, description="Retries of a failed request (429, 5xx, timeouts) by the openai client, honouring Retry-After.")
    request_timeout: float = operational(120.0, gt=0, description="Seconds before a request is abandoned (then retried).")
    context_tokens: int | None = Field(
        None, gt=0, description="The model's context window in tokens. A rating request estimated to need more (4 characters a "
        "token, plus max_tokens) is set aside too_long before sending; None: not checked.")
    price_input_per_million: float | None = operational(None, ge=0, description="USD per million prompt tokens, for the cost estimate.")
    price_output_per_million: float | None = operational(None, ge=0, description="USD per million completion tokens, for the cost estimate.")
    max_cost_usd: float | None = operational(
        None, gt=0, description="A spending cap in USD for the stage, earlier runs included: the usage the API reported, "
        "priced, plus the worst case of the requests in flight never passes it. At the cap the stage stops sending, "
        "saves what came back and exits with code 4; rerun with a higher cap to go on. Needs both prices.")

    @model_validator(mode="after")
    def _cap_needs_prices(self):
        if self.max_cost_usd is not None and (self.price_input_per_million is None or self.price_output_per_million is None):
            raise ValueError("max_cost_usd needs price_input_per_million and price_output_per_million (USD per million "
                             "tokens at the API) to count what is spent")
        return self


class _Pool(_Strict):
    """The keys of the pool of Ray actors that call an API."""

    concurrency: int = operational(16, gt=0, description="Requests in flight at once, across all workers together.")
    num_workers: int | tuple[int, int] = operational(
        1, description="Ray actors sending requests: a number, or a range [min, max] for an autoscaling pool. The "
        "concurrency is split among the most there can be.")
    worker_resources: dict[str, float] = operational(
        default_factory=dict, description="Ray resources each worker needs besides its half CPU, e.g. {rater: 1} to "
        "run the workers only on nodes started with the custom resource `rater`.")
    requests_per_minute: int | None = operational(None, gt=0, description="Account limit on requests per minute, across all workers.")
    tokens_per_minute: int | None = operational(None, gt=0, description="Account limit on tokens per minute (prompt estimate + max_tokens), across all workers.")

    @model_validator(mode="after")
    def _check_pool(self):
        _check_range(self, "num_workers")
        most = pool_size(self.num_workers)[1]
        if self.concurrency < most:
            raise ValueError(f"concurrency ({self.concurrency}) must be at least num_workers ({most})")
        return self


class _Files(_Strict):
    """The keys of request files."""

    batch_max_requests: int = operational(50_000, gt=0, description="Requests per request file (the Batch API's limit: 50,000).")
    batch_max_bytes: int = operational(200_000_000, gt=0, description="Bytes per request file (the Batch API's limit: 200 MB).")


class _BatchApi(_Files):
    """The keys of a Batch API."""

    batch_completion_window: str = Field("24h", description="The batches' completion window.")
    batch_poll_seconds: float = operational(10.0, gt=0, description="Seconds between the first polls of the batches' states.")
    batch_poll_max_seconds: float = operational(300.0, gt=0, description="The polls back off (x1.5 each) up to this many seconds apart.")
    batch_price_factor: float = operational(0.5, ge=0, description="The batch price as a fraction of the prices above (OpenAI: 0.5).")
    batch_enqueued_token_limit: int | None = operational(
        None, gt=0, description="The input tokens the account may have enqueued for this model across its open batches "
        "(the limits page; e.g. 2,000,000 for gpt-4o-mini at one tier). Request files are sent as the queue has room "
        "(their tokens estimated at 4 characters a token) and cut to fit it; None: all are sent at once.")
    reask: Literal["batch", "sync"] = Field(
        "batch", description="Re-ask a reply with no readable result once, in a small follow-up batch, or through "
        "the synchronous API (sync: the same base_url, model and pool keys).")


class _Engines(_Strict):
    """The keys of vLLM engines."""

    num_engines: int | tuple[int, int] = operational(
        1, description="Engine replicas (one per GPU, or per tensor-parallel group): a number, or a range [min, max] "
        "for an autoscaling pool that a cluster autoscaler can add GPU nodes for.")
    tensor_parallel_size: int = Field(1, gt=0, description="GPUs per engine.")
    use_gpu: bool = Field(True, description="Give each engine GPUs; false runs on CPU (tests, demo), each engine counted as half a CPU by Ray.")
    accelerator_type: str | None = operational(None, description="Ray accelerator type for the engines, e.g. A100.")
    max_model_len: int = Field(4096, gt=0, description="Context length of the engine.")
    cpu_kv_cache_gib: int = operational(
        1, gt=0, description="On CPU (use_gpu=false): GiB of KV cache per engine. It reaches the engine workers in "
        "their runtime_env as VLLM_CPU_KVCACHE_SPACE, on a local Ray or a running cluster alike.")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vllm.LLM engine arguments.")

    @model_validator(mode="after")
    def _check_engines(self):
        _check_range(self, "num_engines")
        return self


def _check_range(model, key: str) -> None:
    low, high = pool_size(getattr(model, key))
    if not 1 <= low <= high:
        raise ValueError(f"{key} must be a number >= 1 or a range [min, max] with 1 <= min <= max, got {getattr(model, key)}")


class OpenAIEndpoint(_Pool, _Api, _Endpoint):
    """Any OpenAI-compatible API, called by a pool of Ray actors under concurrency and rate limits."""

    backend: Literal["openai"] = Field("openai", description="openai: any OpenAI-compatible API.")


class OpenAIBatchEndpoint(_BatchApi, _Pool, _Api, _Endpoint):
    """OpenAI's Batch API (or a provider's that speaks it): request files at the batch price."""

    backend: Literal["openai_batch"] = Field("openai_batch", description="openai_batch: OpenAI's Batch API (or a provider's), at its batch price.")


class AnthropicBatchEndpoint(_BatchApi, _Api, _Endpoint):
    """Anthropic's Message Batches API, through the `anthropic` SDK: half the synchronous price."""

    backend: Literal["anthropic_batch"] = Field(
        "anthropic_batch", description="anthropic_batch: Anthropic's Message Batches API, at its batch price.")
    api_key_env: str = operational("ANTHROPIC_API_KEY", description="Environment variable holding the API key (never the key itself).")

    @model_validator(mode="after")
    def _reask_in_batches(self):
        if self.reask != "batch":
            raise ValueError("anthropic_batch asks an unreadable reply again in a follow-up batch only (reask: batch)")
        return self


class VllmEndpoint(_Engines, _Endpoint):
    """vLLM engines inside Ray Data (`ray.data.llm`), on GPUs or CPU."""

    backend: Literal["vllm"] = Field("vllm", description="vllm: Ray Data LLM engines on GPUs (or CPU).")


class VllmBatchEndpoint(_Files, _Body, _Engines, _Endpoint):
    """Request files run by vLLM's batch runner (`vllm run_batch`) on this machine."""

    backend: Literal["vllm_batch"] = Field("vllm_batch", description="vllm_batch: request files run by vLLM's batch runner on this machine.")


EndpointConfig = OpenAIEndpoint | OpenAIBatchEndpoint | AnthropicBatchEndpoint | VllmEndpoint | VllmBatchEndpoint


def _by_backend(*members: type[BaseModel], default: str) -> Any:
    """A section that is one of `members`, chosen by its `backend` key (`default` when absent)."""

    def tag(value: Any) -> str | None:
        return value.get("backend", default) if isinstance(value, dict) else getattr(value, "backend", None)

    tagged = tuple(Annotated[m, Tag(m.model_fields["backend"].default)] for m in members)
    return Annotated[Union[tagged], Discriminator(tag)]


class _Rating(_Strict):
    """The keys of the rating stage."""

    dimension: str = Field("accuracy", min_length=1, description="The property the grader rates: accuracy (paper default), helpfulness, ...")
    max_tokens: int = Field(256, gt=0, description="Reply length cap: the score line plus the explanation.")
    logprobs: bool = Field(True, description="Ask for top logprobs and record the probability-weighted score_expected.")
    top_logprobs: int = Field(5, ge=1, le=20, description="How many alternatives per token to ask for.")
    unit: Literal["turn", "conversation"] = Field(
        "turn", description="For conversations: rate each assistant turn with the conversation before it as context "
        "(one request per assistant turn), or the whole conversation in one request.")
    aggregate: Literal["min", "mean", "last"] = Field(
        "min", description="With unit=turn, a conversation's score from its turns' scores: min (as good as its weakest "
        "answer), mean, or last.")
    fence: bool = Field(
        True, description="Put each field of a row (each turn of a conversation) between the tags of a fence the row "
        "cannot close, and tell the grader the fenced text is data, not instructions; the Fig. 4 wording is unchanged. "
        "false: the paper's prompt byte for byte.")


class RateOpenAI(_Rating, OpenAIEndpoint):
    """The grader at an OpenAI-compatible API."""


class RateOpenAIBatch(_Rating, OpenAIBatchEndpoint):
    """The grader through a Batch API."""


class RateAnthropicBatch(_Rating, AnthropicBatchEndpoint):
    """The grader through Anthropic's Message Batches API."""


class RateVllm(_Rating, VllmEndpoint):
    """The grader on vLLM engines."""

    constrained: bool = Field(True, description="Constrain the reply to the valid scores 0, 0.5, ..., 5 (no explanation then).")


class RateVllmBatch(_Rating, VllmBatchEndpoint):
    """The grader on vLLM's batch runner."""


RateConfig = _by_backend(RateOpenAI, RateOpenAIBatch, RateAnthropicBatch, RateVllm, RateVllmBatch, default="openai")


# The paper's App. E keyword set for coding rows.
CODING_KEYWORDS = ["Java", "java", "C++", "c++", "C#", "c#", "Python", "python"]


class FilterConfig(_Strict):
    """How the training subset is chosen from the rated rows."""

    mode: Literal["threshold", "top_k", "random_k", "subsample", "balanced"] = Field(
        "threshold",
        description="threshold: score >= threshold; top_k: the k best; random_k: k at random (the paper's "
        "random control); subsample: k at random from those >= threshold; balanced: threshold plus a "
        "per-category floor/quota.",
    )
    threshold: float = Field(4.5, description="tau: keep rows scoring at least this (threshold, subsample, balanced).")
    k: int | None = Field(None, gt=0, description="Rows to keep (top_k, random_k, subsample).")
    k_from: str | None = Field(
        None, description="Take k from another selection: its selection.json or selected.json (e.g. random_k of the same size)."
    )
    rated_from: str | None = Field(
        None, description="Select from the ratings of another run directory (e.g. a control selection of the same "
        "rated data), so nothing is rated, or paid for, twice; default this run's own."
    )
    seed: int = Field(0, description="Seed of every random choice, recorded in selection.json.")
    score: Literal["score", "score_expected"] = Field(
        "score", description="Which score to select on: the discrete one or the logprob-weighted one."
    )
    category_field: str | None = Field(
        None, description="An input field holding each row's category (e.g. Dolly's 'category'), read from data.path."
    )
    category_keywords: dict[str, list[str]] = Field(
        default_factory=lambda: {"coding": list(CODING_KEYWORDS)},
        description="Keyword rules when there is no category field: a row whose instruction, input or output "
        "contains one of a category's keywords belongs to it (first match in order); the rest are 'other'.",
    )
    category_floor: float = Field(
        0.0, ge=0.0, le=1.0, description="balanced: keep at least this fraction of each category's rated rows."
    )
    category_quota: dict[str, int] = Field(
        default_factory=dict, description="balanced: keep at least this many rows of the named categories."
    )
    compare: str | None = Field(
        None, description="Another selection of the same data (Alpaca-format JSON/JSONL) to report overlap with."
    )
    drop_suspect: bool = Field(
        False, description="Leave out the rows the rating flagged as talking to the grader (suspect_injection: an "
        "instruction aimed at a grader, or a score written into the response).")
    plots: bool = Field(True, description="Write the PNG plots under <run_dir>/plots/.")


class LoraConfig(_Strict):
    """A LoRA adapter (peft) in place of full fine-tuning: low-rank updates of the chosen modules,
    the base model's weights frozen."""

    rank: int = Field(16, gt=0, description="The rank of each update (peft's r).")
    alpha: float = Field(32, gt=0, description="The updates' scale numerator (peft's lora_alpha): updates scale by alpha / rank.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get an adapter: names such as [q_proj, v_proj], or all-linear (every "
        "linear layer but the output head).")


class TrainConfig(_Strict):
    """Fine-tuning with the Stanford Alpaca recipe on Ray Train + DeepSpeed (the paper's Table 5)."""

    data: str | None = Field(None, description="Rows to train on (alpaca rows or conversations, read as data.formatting and data.columns say); default <run_dir>/selected.json.")
    template: Literal["auto", "alpaca", "chat"] = Field(
        "auto", description="alpaca: the paper's Alpaca prompt, the loss on the response; chat: rows rendered with the "
        "tokenizer's chat template, the loss on the assistant's turns; auto: alpaca for alpaca rows, chat for conversations.")
    train_on: Literal["all", "last"] = Field("all", description="With the chat template: the loss on every assistant turn, or on the last only.")
    chat_template: str | None = Field(None, description="A Jinja chat template (the text, or a file holding it) for a tokenizer that has none, or to replace its own.")
    model: str = Field("builtin:tiny-llama", description="Base model: a local Hugging Face directory or a hub id.")
    adapter: Literal["none", "lora"] = Field(
        "none", description="none: every weight is trained (the paper's recipe); lora: a LoRA adapter on the frozen "
        "base model (train.lora).")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="The adapter, with train.adapter=lora (see below).")
    merge: bool = Field(
        True, description="With adapter=lora: export the model with the adapter merged into it (it loads wherever a "
        "model does, vLLM included); false writes the adapter alone (PEFT format) for use with train.model.")
    num_workers: int = Field(2, gt=0, description="Ray Train workers (one per GPU on a cluster).")
    use_gpu: bool = Field(False, description="Train on GPUs (bf16) or CPUs (fp32, gloo).")
    resources_per_worker: dict[str, float] = operational(default_factory=dict, description="Ray resources per worker, e.g. {CPU: 8, GPU: 1}.")
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    offload: bool = Field(False, description="ZeRO CPU offload of optimizer state (and parameters with stage 3).")
    epochs: float = Field(3, gt=0, description="Passes over the data (Table 5: 3 for 7B, 5 for 13B).")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate (Table 5: 2e-5 for 7B, 1e-5 for 13B).")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Schedule after warmup.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of the steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    global_batch_size: int = Field(128, gt=0, description="Examples per optimizer step across all workers, packed or not "
                                   "(Table 5: 128); the last step of an epoch may hold fewer.")
    micro_batch_size: int = Field(4, gt=0, description="Rows per worker per forward pass; with packing a row holds "
                                  "several examples, so a step takes as many micro-batches as its rows need.")
    max_length: int = Field(512, gt=8, description="Tokens per example (and per packed row).")
    packing: bool = Field(True, description="Pack several examples per row, so few computed tokens are padding.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (a cap for trials).")
    seed: int = Field(42, description="Seed of shuffling and initialisation.")
    checkpoint_every: int = operational(50, gt=0, description="Optimizer steps between checkpoints (and one at the end).")
    keep_checkpoints: int = operational(2, gt=0, description="Checkpoints kept (the latest ones).")
    model_dir: str | None = Field(None, description="Where the fine-tuned model is written (a Hugging Face directory every node that generates can load from: a local path on one machine, a shared mount on a cluster); default <run_dir>/model. Required when run_dir is on an object store.")
    storage_path: str | None = operational(None, description="Checkpoint storage shared by all nodes (path or s3://); default <run_dir>/checkpoints.")
    max_failures: int = operational(3, ge=0, description="Worker failures Ray Train recovers from by resuming the last checkpoint.")
    tensorboard: bool = operational(False, description="Also write metrics for TensorBoard under <run_dir>/tensorboard (a path the first worker can write).")


# The paper's four test sets, shipped in the package (alpagasus_ray/testsets/).
TEST_SETS = ("koala", "vicuna", "wizardlm", "sinstruct")


class _Generating(_Strict):
    """The keys of the generation stage."""

    model: str | None = Field(None, description="Model directory or hub id (vllm), or model name at the API; default <run_dir>/model, what train wrote.")
    name: str | None = Field(None, description="What the model is called in outputs (answers/<name>/); default the model directory's name.")
    test_sets: list[str] = Field(default_factory=lambda: list(TEST_SETS), min_length=1, description="Shipped test sets by name (koala, vicuna, wizardlm, sinstruct) or JSONL / Parquet files of prompts, MT-Bench turns or conversations (multi-turn prompts are answered turn by turn).")
    limit: int | None = Field(None, gt=0, description="Only the first N prompts of each test set (for trials).")
    max_tokens: int = Field(1024, gt=0, description="Answer length cap in tokens (the paper: 1024). Formerly max_new_tokens.")
    template: Literal["alpaca", "chat"] = Field("alpaca", description="alpaca: the Alpaca prompt the model was trained on, as a plain completion; chat: the instruction (and input) as a chat message, for chat models and APIs.")
    baseline_model: str | None = Field(None, description="A second model answered the same way, to judge against (e.g. the base model before fine-tuning); vllm backend: a model directory or hub id.")
    baseline_name: str | None = Field(None, description="What the baseline model is called in outputs; default its directory's name.")

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        return _renamed(data, "generate", {"max_new_tokens": "max_tokens"})


class GenerateVllm(_Generating, VllmEndpoint):
    """A model directory answering on vLLM engines."""


class GenerateOpenAI(_Generating, OpenAIEndpoint):
    """A reference system at an OpenAI-compatible API."""

    @model_validator(mode="after")
    def _needs_model(self) -> "GenerateOpenAI":
        if self.model is None:
            raise ValueError("generate.backend=openai needs generate.model, the model's name at the API")
        return self


GenerateConfig = _by_backend(GenerateVllm, GenerateOpenAI, default="vllm")


class _Judging(_Strict):
    """The keys of the judging stage."""

    model: str = Field("gpt-4", description="The judge: model name at the API, or a model directory / hub id for vllm.")
    candidate: str | None = Field(None, description="Answers to judge: a name under <run_dir>/answers/ or a path to an answers directory; default the answers of generate.model.")
    baseline: str | None = Field(None, description="Answers to compare against: a name under <run_dir>/answers/ or a path to an answers directory (e.g. runs/alpaca-52k/answers/alpaca-52k); default the answers of generate.baseline_model.")
    prompt: Literal["vicuna", "pair"] = Field("vicuna", description="vicuna: the paper's App. C prompt, two scores 1-10; pair: the FastChat pair prompt, verdict [[A]]/[[B]]/[[C]] (Table 3).")
    test_sets: list[str] | None = Field(None, description="Test sets to judge; default every set answered by both models.")
    max_tokens: int = Field(512, gt=0, description="Judge reply cap: the scores line plus the explanation.")


class JudgeOpenAI(_Judging, OpenAIEndpoint):
    """The judge at an OpenAI-compatible API."""


class JudgeOpenAIBatch(_Judging, OpenAIBatchEndpoint):
    """The judge through a Batch API."""


class JudgeAnthropicBatch(_Judging, AnthropicBatchEndpoint):
    """The judge through Anthropic's Message Batches API."""


class JudgeVllm(_Judging, VllmEndpoint):
    """The judge on vLLM engines."""

    constrained: bool = Field(False, description="Constrain the reply to the verdict alone (two scores 1-10, or [[A]]/[[B]]/[[C]]), with no explanation; for small judges.")


class JudgeVllmBatch(_Judging, VllmBatchEndpoint):
    """The judge on vLLM's batch runner."""


JudgeConfig = _by_backend(JudgeOpenAI, JudgeOpenAIBatch, JudgeAnthropicBatch, JudgeVllm, JudgeVllmBatch,
                          default="openai")


def _renamed(data: Any, section: str, renames: dict[str, str]) -> Any:
    """Old key names still work, with a deprecation message naming the new one."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for old, new in renames.items():
        if old in data:
            if new in data:
                raise ValueError(f"{section}.{old} and {section}.{new} are the same key (the first is its old name): give one")
            logging.getLogger(__name__).warning("%s.%s is deprecated: use %s.%s", section, old, section, new)
            data[new] = data.pop(old)
    return data


class ReportConfig(_Strict):
    """What the report covers."""

    runs: list[str] = Field(default_factory=list, description="Other run directories to plot winning score against training size (the paper's Fig. 2); this run is included.")
    plots: bool = Field(True, description="Write the PNG plots under <run_dir>/plots/.")


class PilotConfig(_Strict):
    """`alpagasus rate --pilot N`: graders compared on a sample before the full rating."""

    graders: list[RateConfig] = Field(
        default_factory=list, description="The graders to compare, each a full endpoint as under rate (backend, model, "
        "dimension, prices, ...). The rate endpoint itself comes first unless it is listed.")
    size: int = Field(500, gt=0, description="Rows in the sample (--pilot N sets it): drawn at random over the whole "
                      "input, the same rows for every grader.")
    seed: int = Field(0, description="Seed of the sample.")
    thresholds: list[float] = Field(
        default_factory=lambda: [4.0, 4.5], description="Thresholds the share kept is given at, besides filter.threshold.")


class Config(_Strict):
    """One run: the run directory and the settings of each stage."""

    run_dir: str = Field("runs/default", description="Where every stage writes its artifacts.")
    data: DataConfig = Field(default_factory=DataConfig)
    rate: RateConfig = Field(default_factory=RateOpenAI)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generate: GenerateConfig = Field(default_factory=GenerateVllm)
    judge: JudgeConfig = Field(default_factory=JudgeOpenAI)
    report: ReportConfig = Field(default_factory=ReportConfig)
    pilot: PilotConfig = Field(default_factory=PilotConfig)


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config and apply `dotted.key=value` overrides (values parsed as YAML).

    >>> load_config(None, ["rate.concurrency=8", "run_dir=/tmp/r"]).rate.concurrency
    8
    >>> load_config(None, ["rate.concurency=8"])
    Traceback (most recent call last):
    ...
    alpagasus_ray.errors.ConfigError: <overrides>: rate.concurency: unknown key
    """
    raw: dict[str, Any] = {}
    source = "<overrides>"
    if path is not None:
        source = path
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config is a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value else "")
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(source, e)) from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    tree[leaf] = value


def _describe(source: str, error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        loc = list(item["loc"])
        backend = None
        if len(loc) >= 2 and loc[0] in ENDPOINT_SECTIONS and loc[1] in BACKENDS:
            backend = loc.pop(1)  # the union's tag: the backend the section was read as
        key = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            message = _not_a_key(str(loc[0]), str(loc[-1]), backend)
        elif item["type"] == "union_tag_invalid":
            key = f"{key}.backend"
            tags = item["ctx"]["expected_tags"].replace("'", "")
            message = f"{item['ctx']['tag']!r} is not a backend of this section (one of: {tags})"
        elif item["type"] == "value_error":
            message = str(item["ctx"]["error"])
        else:
            message = item["msg"]
        problems.append(f"{source}: {key}: {message}")
    return "\n".join(problems)


def _not_a_key(section: str, key: str, backend: str | None) -> str:
    """Why a key is refused: unknown everywhere, or a key of other backends than the one chosen."""
    if backend is None:
        return "unknown key"
    members = [m for m in _members(Config.model_fields[section].annotation) if key in m.model_fields]
    if not members:
        return "unknown key"
    others = ", ".join(m.model_fields["backend"].default for m in members)
    return f"not a key of backend {backend} (it is a key of {others})"


def _members(annotation: Any) -> list[type[BaseModel]]:
    """The models a section may be: the members of a union, or the model itself."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in get_args(annotation):
        found += _members(arg)
    return found


def _all_models(model: type[BaseModel] | None = None, seen: set | None = None) -> set:
    """Every config model reachable from `Config`."""
    model = model or Config
    seen = set() if seen is None else seen
    if model in seen:
        return seen
    seen.add(model)
    for field in model.model_fields.values():
        for member in _members(field.annotation):
            _all_models(member, seen)
    return seen


def config_for_record(config: Config) -> dict[str, Any]:
    """The config as written into the run directory: plain data, and by construction no secret in it."""
    return config.model_dump(mode="json")


def api_key(endpoint: EndpointConfig) -> str:
    """The API key from the environment; a local server without auth accepts any placeholder."""
    return os.environ.get(endpoint.api_key_env) or "EMPTY"


# Keys that change how fast a stage runs, or where it keeps scratch state, not its result: marked
# `operational(...)` where they are defined, and left out of the fingerprints of `alpagasus run`.
OPERATIONAL = frozenset(
    name for model in _all_models() for name, field in model.model_fields.items()
    if (field.json_schema_extra or {}).get("operational")
)


def result_settings(section: BaseModel) -> dict[str, Any]:
    """A section's settings that its results depend on: all but the operational keys.

    >>> a = result_settings(load_config(None, ["rate.concurrency=64"]).rate)
    >>> a == result_settings(load_config(None, []).rate), a == result_settings(load_config(None, ["rate.model=m"]).rate)
    (True, False)
    """
    return {k: v for k, v in section.model_dump(mode="json").items() if k not in OPERATIONAL}
