"""The Stanford Alpaca fine-tuning recipe as pure functions: prompt, loss mask, packing; and the
chat form of it, a conversation rendered with the model's chat template, the loss on the
assistant's turns (`chat_segments`, `encode_segments`).

The model learns the response and EOS only: prompt tokens get the label IGNORE. Prompt and
response are tokenized apart and joined, so the mask boundary is exact token by token. Packing
places whole examples into rows of `max_length` tokens; each example's positions restart at 0 and
`block_causal_mask` keeps every token from attending outside its own example (position ids alone
do not: transformers 5.x still attends across them). Every example starts with masked prompt
tokens, so no loss crosses a boundary either.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

IGNORE = -100  # the label torch's cross-entropy skips

# The two templates of the Stanford Alpaca recipe (with and without an input). Generation in the
# evaluation stage must use the same text.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for a row: the template with an input when the row has one.

    >>> alpaca_prompt("Add 2 and 2.").endswith("### Instruction:\\nAdd 2 and 2.\\n\\n### Response:")
    True
    >>> "### Input:\\n7" in alpaca_prompt("Double it.", "7")
    True
    """
    if input and input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def alpaca_follow_up(instruction: str) -> str:
    """A later user turn in the Alpaca template, after the answer to the one before.

    >>> text = alpaca_prompt("Name a colour.") + "Red." + alpaca_follow_up("Another?")
    >>> text.endswith("### Response:Red.\\n\\n### Instruction:\\nAnother?\\n\\n### Response:")
    True
    """
    return f"\n\n### Instruction:\n{instruction}\n\n### Response:"


@dataclass(frozen=True)
class Example:
    """One tokenized training row: `labels` is IGNORE on the prompt, the token id on the target."""

    input_ids: list[int]
    labels: list[int]


def encode(prompt_ids: Sequence[int], response_ids: Sequence[int], eos_id: int, max_length: int) -> Example | None:
    """Join prompt and response + EOS, mask the prompt, cut at `max_length`.

    Returns None when nothing of the target survives the cut (the row would teach nothing).

    >>> encode([1, 5, 6], [7, 8], eos_id=2, max_length=16)
    Example(input_ids=[1, 5, 6, 7, 8, 2], labels=[-100, -100, -100, 7, 8, 2])
    >>> encode([1, 5, 6], [7, 8], eos_id=2, max_length=4)
    Example(input_ids=[1, 5, 6, 7], labels=[-100, -100, -100, 7])
    >>> encode([1, 5, 6], [7, 8], eos_id=2, max_length=3) is None
    True
    """
    target = [*response_ids, eos_id]
    input_ids = [*prompt_ids, *target][:max_length]
    labels = ([IGNORE] * len(prompt_ids) + target)[:max_length]
    if all(label == IGNORE for label in labels):
        return None
    return Example(input_ids, labels)


def chat_segments(render: Callable[[list[dict], bool], str], messages: list[dict], train_on: str = "all"
                  ) -> list[tuple[str, bool]]:
    """A conversation as the model's chat template renders it, cut into (text, learned) segments:
    each assistant turn's text (up to the next turn: its end-of-turn marker included) is learned,
    with `train_on="all"` every assistant turn, with `"last"` only the last; the rest is context.
    `render(messages, add_generation_prompt)` is the template. A user turn after the last
    assistant turn teaches nothing and is left out.

    The assistant turn's text is what rendering the conversation up to it adds to rendering the
    turns before it with the generation prompt, so the boundary is the template's own; a template
    that does not render a conversation as that prefix plus the turn raises ValueError.

    >>> def render(ms, gen):  # a template whose assistant header comes with the generation prompt
    ...     return "".join(f"<{m['role']}>{m['content']}</>" for m in ms) + ("<assistant>" if gen else "")
    >>> chat_segments(render, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    [('<user>hi</><assistant>', False), ('yo</>', True)]
    """
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    messages = messages[: last + 1]
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        whole = render(messages[: i + 1], False)
        if not prompt.startswith(done) or not whole.startswith(prompt):
            raise ValueError(f"the chat template does not render turn {i + 1} as the turns before it plus the turn "
                             "(it rewrites earlier turns)")
        segments.append((prompt[len(done):], False))
        segments.append((whole[len(prompt):], train_on == "all" or i == last))
        done = whole
    return [(text, learned) for text, learned in segments if text]


def encode_segments(segment_ids: Sequence[Sequence[int]], learned: Sequence[bool], max_length: int) -> Example | None:
    """Join tokenized segments, the learned ones labelled with their tokens and the others IGNORE,
    cut at `max_length`; None when nothing learned survives the cut.

    >>> encode_segments([[1, 5], [7, 2], [6], [8, 2]], [False, True, False, True], max_length=16)
    Example(input_ids=[1, 5, 7, 2, 6, 8, 2], labels=[-100, -100, 7, 2, -100, 8, 2])
    >>> encode_segments([[1, 5], [7, 2]], [False, True], max_length=2) is None
    True
    """
    input_ids = [t for ids in segment_ids for t in ids][:max_length]
    labels = [t if learn else IGNORE for ids, learn in zip(segment_ids, learned) for t in ids][:max_length]
    if all(label == IGNORE for label in labels):
        return None
    return Example(input_ids, labels)


def pack(lengths: Sequence[int], max_length: int, seed: int = 0) -> list[list[int]]:
    """Group example indices into rows of at most `max_length` tokens, first-fit decreasing,
    then shuffle the rows with `seed`. Every index appears exactly once.

    >>> rows = pack([5, 3, 4, 2, 6], max_length=8)
    >>> sorted(sorted(r) for r in rows)
    [[0, 1], [2], [3, 4]]
    >>> sorted(i for r in pack([9, 1], max_length=8) for i in r)  # longer than a row: alone
    [0, 1]
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_length - lengths[i])
    random.Random(seed).shuffle(rows)
    return rows


def plan_epoch(lengths: Sequence[int], examples_per_step: int, max_length: int, packing: bool,
               seed: int) -> list[list[list[int]]]:
    """One epoch as optimizer steps, each a list of rows of example indices.

    The examples are shuffled with `seed` and cut into steps of `examples_per_step` (the last step
    of the epoch may be short), exactly as unpacked training would take them. Packing then works
    within a step: its examples go first-fit decreasing into rows of `max_length` tokens, so a step
    needs fewer rows but still holds the same examples. Rows are ordered longest first, so the
    micro-batches cut from neighbouring rows carry little padding.

    >>> steps = plan_epoch([5, 3, 4, 2, 6], examples_per_step=2, max_length=8, packing=True, seed=0)
    >>> [sum(len(row) for row in step) for step in steps]  # examples per step
    [2, 2, 1]
    >>> sorted(i for step in steps for row in step for i in row)
    [0, 1, 2, 3, 4]
    >>> plan_epoch([5, 3, 4, 2], examples_per_step=4, max_length=8, packing=False, seed=0)
    [[[0], [2], [1], [3]]]
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    steps = []
    for start in range(0, len(order), examples_per_step):
        chosen = order[start:start + examples_per_step]
        if packing:
            rows = [[chosen[i] for i in row] for row in pack([lengths[i] for i in chosen], max_length, seed)]
        else:
            rows = [[i] for i in chosen]
        rows.sort(key=lambda row: (-sum(lengths[i] for i in row), row))
        steps.append(rows)
    return steps


def micro_batches(rows: Sequence[Sequence[int]], rank: int, world: int, micro_batch: int) -> list[list[Sequence[int]]]:
    """This worker's micro-batches of one step's rows. Rows are dealt to the workers in turn, and
    every worker gets the same number of micro-batches (ZeRO's collectives run once per micro-batch
    on every worker), so a worker short of rows gets empty micro-batches at the end.

    >>> [micro_batches([[0, 1], [2], [3], [4]], rank, world=2, micro_batch=1) for rank in (0, 1)]
    [[[[0, 1]], [[3]]], [[[2]], [[4]]]]
    >>> micro_batches([[0], [1], [2]], rank=1, world=2, micro_batch=2)
    [[[1]]]
    >>> micro_batches([[0]], rank=1, world=2, micro_batch=4)
    [[]]
    """
    count = max(1, math.ceil(math.ceil(len(rows) / world) / micro_batch))
    mine = list(rows[rank::world])
    return [mine[m * micro_batch:(m + 1) * micro_batch] for m in range(count)]


def collate(examples: Sequence[Sequence[Example]], pad_id: int) -> dict[str, list[list[int]]]:
    """Batch rows, each a list of examples placed one after another (one example when not
    packing), padded to the longest row. Positions restart at 0 for each example and for the
    padding; pad tokens have label IGNORE; `segment_ids` number the examples of a row (padding
    last) for `block_causal_mask`.

    >>> a, b = Example([1, 5, 7], [-100, -100, 7]), Example([1, 6], [-100, 6])
    >>> batch = collate([[a, b], [b]], pad_id=0)
    >>> batch["input_ids"], batch["position_ids"]
    ([[1, 5, 7, 1, 6], [1, 6, 0, 0, 0]], [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
    >>> batch["segment_ids"]
    [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]
    >>> batch["labels"][1]
    [-100, 6, -100, -100, -100]
    """
    width = max(sum(len(e.input_ids) for e in row) for row in examples)
    batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": [], "segment_ids": []}
    for row in examples:
        ids = [t for e in row for t in e.input_ids]
        labels = [t for e in row for t in e.labels]
        positions = [p for e in row for p in range(len(e.input_ids))]
        segments = [n for n, e in enumerate(row) for _ in e.input_ids]
        pad = width - len(ids)
        batch["input_ids"].append(ids + [pad_id] * pad)
        batch["labels"].append(labels + [IGNORE] * pad)
        batch["position_ids"].append(positions + list(range(pad)))
        batch["segment_ids"].append(segments + [len(row)] * pad)
    return batch


def block_causal_mask(segment_ids, dtype=None):
    """The additive attention mask (batch, 1, length, length) that lets a token see only earlier
    tokens of its own example: 0 where allowed, the dtype's minimum elsewhere.

    >>> import torch
    >>> (block_causal_mask(torch.tensor([[0, 0, 1]])) == 0).int()[0, 0].tolist()
    [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    """
    import torch

    dtype = dtype or torch.float32
    length = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (same & causal)[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device).masked_fill(~allowed, torch.finfo(dtype).min)


def real_token_fraction(lengths: Sequence[int], steps: Sequence[Sequence[Sequence[int]]], world: int,
                        micro_batch: int) -> float:
    """Real tokens over computed tokens when `steps` run as `micro_batches` on `world` workers,
    each micro-batch padded to its longest row.

    >>> real_token_fraction([4, 4, 2], steps=[[[0], [1], [2]]], world=1, micro_batch=3)  # 10 real of 12
    0.8333
    >>> real_token_fraction([4, 4, 2], steps=[[[0], [1, 2]]], world=2, micro_batch=1)  # a row a worker: no padding
    1.0
    """
    real = computed = 0
    for rows in steps:
        for rank in range(world):
            for batch in micro_batches(rows, rank, world, micro_batch):
                sizes = [sum(lengths[i] for i in row) for row in batch]
                real += sum(sizes)
                computed += max(sizes, default=0) * len(sizes)
    return round(real / computed, 4) if computed else 0.0
