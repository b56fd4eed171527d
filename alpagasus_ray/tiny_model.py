"""A tiny Llama built locally, for tests and the demo: no hub, no download.

    python -m alpagasus_ray.tiny_model /tmp/tiny-llama

Its outputs carry no meaning; it exists so that every stage can run end to end on a CPU with the
real engines (vLLM, DeepSpeed). The shape respects vLLM's CPU kernels (head_dim 64).
"""

from __future__ import annotations

import json
import os
import sys

from alpagasus_ray.errors import InputError

# A chat template in the Llama-2 spirit, short enough for a 256-token model window.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>"
    "{% elif m['role'] == 'user' %}[INST]{{ m['content'] }}[/INST]"
    "{% else %}{{ m['content'] }}</s>{% endif %}"
    "{% endfor %}"
)

_CORPUS = [
    "Give three tips for staying healthy. Eat a balanced diet and get enough sleep.",
    "What is the capital of France? The capital of France is Paris.",
    "Score: 4.5 The response is accurate and helpful. 0 0.5 1 1.5 2 2.5 3 3.5 4 4.5 5",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Input: ### Response: Assistant 1 2 3 4 5 6 7 8 9 10",
    "def add(a, b): return a + b  # Python, Java, C++, C#",
]


def build_tiny_model(out_dir: str, vocab_size: int = 512, seed: int = 0, hidden_size: int = 128, num_layers: int = 2) -> str:
    """Build and save a ~0.4M-parameter Llama and its byte-level BPE tokenizer in `out_dir`.

    Idempotent: returns at once when `out_dir` already holds a model built by this function.

    Args:
        out_dir: directory to write (created if missing).
        vocab_size: tokenizer vocabulary size.
        seed: torch seed for the random weights, so two builds are identical.
        hidden_size: model width (a multiple of 64: vLLM's CPU attention needs head_dim 64).
        num_layers: decoder layers.

    Returns:
        `out_dir`, a Hugging Face model directory that transformers and vLLM load.
    """
    marker = os.path.join(out_dir, MARKER_FILE)
    if os.path.exists(marker):
        return out_dir
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    os.makedirs(out_dir, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=hidden_size // 64,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard bar says nothing on the demo's console
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    with open(marker, "w") as f:
        json.dump({"built_by": "alpagasus_ray.tiny_model", "seed": seed, "note": "smoke-scale stand-in"}, f)
    return out_dir


BUILTIN_MODEL = "builtin:tiny-llama"
MARKER_FILE = "tiny_model.json"


def is_stand_in(model: str | None) -> bool:
    """Whether `model` is the tiny stand-in, or a model fine-tuned from it (training copies the
    marker), so that reports can say its scores carry no meaning.

    >>> is_stand_in("builtin:tiny-llama"), is_stand_in("/models/llama-7b")
    (True, False)
    """
    return model == BUILTIN_MODEL or (model is not None and os.path.exists(os.path.join(model, MARKER_FILE)))


def resolve_model(name: str) -> str:
    """A model path for engines: `builtin:tiny-llama` is built once into the user's cache.

    >>> resolve_model("/models/llama-7b")
    '/models/llama-7b'
    """
    if name != BUILTIN_MODEL:
        return name
    cache = os.environ.get("ALPAGASUS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "alpagasus_ray"))
    return build_tiny_model(os.path.join(cache, "tiny-llama-v1"))


def check_model_dir(model: str) -> None:
    """Fail early, naming the directory, when a local model does not load (config and tokenizer).
    A name that is not a local path (a hub id such as org/name) is left to the engine."""
    if model == BUILTIN_MODEL:
        return
    looks_local = os.path.exists(model) or model.startswith(("/", ".", "~")) or model.count("/") > 1
    if not looks_local:
        return
    if not os.path.isdir(model):
        raise InputError(f"{model}: no such model directory (train first, or set generate.model)")
    if os.path.isfile(os.path.join(model, "adapter_config.json")) and not os.path.isfile(os.path.join(model, "config.json")):
        raise InputError(f"{model}: holds a LoRA adapter, not a whole model: export the model with the adapter merged "
                         "(train.merge=true) to serve it, or load the adapter with peft over train.model")
    from transformers import AutoConfig, AutoTokenizer

    try:
        AutoConfig.from_pretrained(model)
        AutoTokenizer.from_pretrained(model)
    except Exception as e:  # transformers raises many kinds for a broken directory
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise InputError(f"{model}: the model directory does not load: {first}") from None


if __name__ == "__main__":
    print(build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "tiny-llama"))
