"""The Alpaca recipe with a real tokenizer and model: the loss mask token by token, and packing
that changes nothing about what the model sees."""

import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alpagasus_ray.config import TrainConfig
from alpagasus_ray.rules.recipe import (IGNORE, alpaca_prompt, block_causal_mask, collate, encode, micro_batches, pack,
                                  plan_epoch, real_token_fraction)
from alpagasus_ray.stages.train import describe_plan, plan_steps
from testdata import alpaca_rows



@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def _encode(tokenizer, row, max_length=4096):
    prompt = tokenizer(alpaca_prompt(row["instruction"], row["input"])).input_ids
    response = tokenizer(row["output"], add_special_tokens=False).input_ids
    return encode(prompt, response, tokenizer.eos_token_id, max_length)


def test_only_the_response_and_eos_are_learned_token_by_token(tokenizer):
    rows = alpaca_rows(50)
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
    rows = alpaca_rows(112)[100:]
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
    rows = alpaca_rows(2000)
    lengths = [len(e.input_ids) for e in (_encode(tokenizer, r, max_length=512) for r in rows) if e is not None]
    packed = real_token_fraction(lengths, plan_epoch(lengths, 128, 512, packing=True, seed=0), world=2, micro_batch=4)
    unpacked = real_token_fraction(lengths, plan_epoch(lengths, 128, 512, packing=False, seed=0), world=2, micro_batch=4)
    assert packed >= 0.98 and packed > unpacked  # unpacked rows are grouped by length within a step


def _alpaca_like_lengths(n, seed=0):
    """Token counts shaped like Alpaca's (about 110 on average, a long tail cut at 512)."""
    rng = random.Random(seed)
    return [min(512, 20 + int(rng.lognormvariate(4.3, 0.6))) for _ in range(n)]


@pytest.mark.parametrize("packing", [True, False])
def test_the_9k_plan_takes_the_papers_steps_of_128_examples(packing):
    """Table 5 on 9,229 examples: 3 epochs of steps of 128 examples, about 216 steps, packed or not."""
    lengths = _alpaca_like_lengths(9229)
    t = TrainConfig(epochs=3, global_batch_size=128, max_length=512, packing=packing, num_workers=4, micro_batch_size=4)
    plan = plan_steps(lengths, t)
    assert abs(len(plan) - 216) <= 3
    per_epoch = math.ceil(9229 / 128)
    assert len(plan) == 3 * per_epoch
    for epoch in range(3):
        steps = plan[epoch * per_epoch:(epoch + 1) * per_epoch]
        assert [sum(len(row) for row in step) for step in steps] == [128] * (per_epoch - 1) + [9229 - 128 * (per_epoch - 1)]
        assert sorted(i for step in steps for row in step for i in row) == list(range(9229))  # each example once
    assert all(sum(lengths[i] for i in row) <= 512 for step in plan for row in step)
    assert plan[0] != plan[per_epoch]  # each epoch in its own order
    summary = describe_plan(lengths, plan, t)
    assert summary["steps"] == len(plan) and summary["warmup_steps"] == math.ceil(0.03 * len(plan))
    if packing:
        assert summary["rows_per_step"] < 40 and summary["real_token_fraction"] > 0.9
    else:
        assert summary["rows_per_step"] == pytest.approx(9229 / len(plan) * 3, rel=0.01)


def test_every_worker_runs_as_many_micro_batches_and_every_row_runs_once():
    lengths = _alpaca_like_lengths(1000, seed=1)
    for step in plan_epoch(lengths, 128, 512, packing=True, seed=3):
        for world, micro in [(1, 4), (2, 4), (4, 4), (8, 2), (64, 1)]:
            batches = [micro_batches(step, rank, world, micro) for rank in range(world)]
            assert len({len(b) for b in batches}) == 1  # the same count on every worker
            ran = [tuple(row) for worker in batches for batch in worker for row in batch]
            assert sorted(ran) == sorted(tuple(row) for row in step) and all(len(b) <= micro for w in batches for b in w)


def test_a_plan_is_the_same_on_every_run_and_fractional_epochs_cut_the_last():
    lengths = _alpaca_like_lengths(1000, seed=2)
    t = TrainConfig(epochs=1.5, global_batch_size=100, max_length=512)
    assert plan_steps(lengths, t) == plan_steps(lengths, t)
    assert len(plan_steps(lengths, t)) == 10 + 5
    assert len(plan_steps(lengths, t.model_copy(update={"max_steps": 7}))) == 7
