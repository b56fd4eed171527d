"""The Alpaca recipe with a real tokenizer and model: the loss mask token by token, and packing
that changes nothing about what the model sees."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alpagasus_ray.recipe import IGNORE, alpaca_prompt, block_causal_mask, collate, encode, pack, real_token_fraction

ALPACA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "alpaca_52k_reconstructed.json")


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def _encode(tokenizer, row, max_length=4096):
    prompt = tokenizer(alpaca_prompt(row["instruction"], row["input"])).input_ids
    response = tokenizer(row["output"], add_special_tokens=False).input_ids
    return encode(prompt, response, tokenizer.eos_token_id, max_length)


def test_only_the_response_and_eos_are_learned_token_by_token(tokenizer):
    rows = json.load(open(ALPACA))[:50]
    for row in rows:
        example = _encode(tokenizer, row)
        target = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]
        masked = [t for t, label in zip(example.input_ids, example.labels) if label == IGNORE]
        assert all(label in (IGNORE, token) for token, label in zip(example.input_ids, example.labels))
        assert tokenizer.decode(target) == row["output"] + tokenizer.eos_token
        assert tokenizer.decode(masked, skip_special_tokens=True) == alpaca_prompt(row["instruction"], row["input"])
        # the mask is one block: prompt first, then target to the end
        first_target = example.labels.index(target[0])
        assert all(label == IGNORE for label in example.labels[:first_target])
        assert all(label != IGNORE for label in example.labels[first_target:])


def test_long_rows_are_cut_and_rows_with_no_target_left_are_dropped(tokenizer):
    row = {"instruction": "Write at length.", "input": "", "output": "word " * 400}
    example = _encode(tokenizer, row, max_length=64)
    assert len(example.input_ids) == 64 and example.labels[-1] != IGNORE
    assert _encode(tokenizer, {"instruction": "x " * 200, "input": "", "output": "y"}, max_length=64) is None


def test_packed_examples_see_exactly_what_they_see_alone(tokenizer, tiny_model):
    """Per-token logits of each example inside a packed row equal its logits run alone; without
    the block mask they would not (transformers attends across restarted positions)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()
    rows = json.load(open(ALPACA))[100:112]
    examples = [_encode(tokenizer, r, max_length=256) for r in rows]
    lengths = [len(e.input_ids) for e in examples]
    packed_rows = pack(lengths, max_length=512)
    assert sorted(i for r in packed_rows for i in r) == list(range(len(examples)))
    assert len(packed_rows) < len(examples)
    batch = {k: torch.tensor(v) for k, v in collate([[examples[i] for i in r] for r in packed_rows], 0).items()}
    with torch.no_grad():
        masked = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=block_causal_mask(batch["segment_ids"])).logits
        unmasked = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        worst_masked = worst_unmasked = 0.0
        for row, indices in enumerate(packed_rows):
            offset = 0
            for i in indices:
                alone = model(input_ids=torch.tensor([examples[i].input_ids])).logits[0]
                span = slice(offset, offset + lengths[i])
                worst_masked = max(worst_masked, (masked[row, span] - alone).abs().max().item())
                worst_unmasked = max(worst_unmasked, (unmasked[row, span] - alone).abs().max().item())
                offset += lengths[i]
    assert worst_masked < 1e-4
    assert worst_unmasked > 1e-2  # the check can tell: without the mask, examples see each other


def test_packing_leaves_little_padding_on_real_rows(tokenizer):
    rows = json.load(open(ALPACA))[:2000]
    lengths = [len(e.input_ids) for e in (_encode(tokenizer, r, max_length=512) for r in rows) if e is not None]
    packed = real_token_fraction(lengths, pack(lengths, 512), micro_batch=4)
    unpacked = real_token_fraction(lengths, [[i] for i in range(len(lengths))], micro_batch=4)
    assert packed >= 0.95 > unpacked
