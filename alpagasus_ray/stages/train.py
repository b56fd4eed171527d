"""The training stage: fine-tune on the selected rows with Ray Train + DeepSpeed, the Alpaca recipe.

    alpagasus train --config configs/train_llama_7b.yaml run_dir=runs/alpaca-chatgpt train.model=/models/llama-7b

The driver checks the data, the model and the batch arithmetic, tokenizes every row once and
plans every optimizer step (packed rows, in a seeded order) before any worker starts. Workers run
DeepSpeed (ZeRO-2/3) with the configured optimizer and learning-rate schedule, report metrics each
step and a checkpoint every `train.checkpoint_every` steps; a worker that dies resumes from the
last checkpoint, and rerunning the same command after the whole job died continues from it too.
The final model lands in `<run_dir>/model/` as a Hugging Face directory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time

from alpagasus_ray.config import OPERATIONAL, Config, DataConfig, TrainConfig
from alpagasus_ray.errors import InputError
from alpagasus_ray.progress import watch_steps
from alpagasus_ray.rules.recipe import (
    IGNORE,
    Example,
    alpaca_prompt,
    block_causal_mask,
    chat_segments,
    collate,
    encode,
    encode_segments,
    micro_batches,
    plan_epoch,
    real_token_fraction,
)
from alpagasus_ray.store.layout import RunDir, is_local, open_filesystem, trained_model_dir
from alpagasus_ray.store.records import write_jsonl
from alpagasus_ray.tiny_model import MARKER_FILE, is_stand_in

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"  # in each checkpoint: the step and the metrics of every step so far
HF_SUBDIR = "hf"
# Bump when plan_steps changes how steps are made (v2: steps of global_batch_size examples, packed within).
PLAN_VERSION = "plan-v2"


def run_train(config: Config) -> dict:
    """Fine-tune `train.model` on `train.data`; returns the final metrics."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = config.train
    run = RunDir(config.run_dir)
    out = trained_model_dir(config.run_dir, t.model_dir)  # before any work: on an object store it must be given
    data_path = t.data or run.selected_json
    model_path = _check_model(t.model)
    examples, dropped = _tokenize(data_path, model_path, t, config.data)
    lengths = [len(e.input_ids) for e in examples]
    plan = plan_steps(lengths, t)
    summary = describe_plan(lengths, plan, t)
    log.info("train: %s examples (%d cut to nothing); %d examples a step (%s rows%s), %d steps an epoch, %d steps "
             "in all, %d warming up; %s micro-batches of up to %d rows per worker per step on %d workers; "
             "real tokens %.1f%% of computed", f"{len(examples):,}", dropped, t.global_batch_size,
             summary["rows_per_step"], " packed" if t.packing else "", summary["steps_per_epoch"], summary["steps"],
             summary["warmup_steps"], summary["micro_batches_per_worker"], t.micro_batch_size, t.num_workers,
             100 * summary["real_token_fraction"])
    from alpagasus_ray.ray_runtime import ensure_ray

    ensure_ray()  # also hands ray.train's loggers, imported above, to console.py
    storage = t.storage_path or (os.path.abspath(run.checkpoints) if is_local(run.checkpoints) else run.checkpoints)
    with watch_steps("train", total=summary["steps"]) as progress:  # a bar fed by the first worker
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={"train": t.model_dump(), "model": model_path, "plan": plan,
                               "tensorboard_dir": os.path.abspath(run.tensorboard), "progress": progress,
                               "examples": ray.put([(e.input_ids, e.labels) for e in examples])},
            scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                         resources_per_worker=t.resources_per_worker or None),
            torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
            run_config=RunConfig(
                name=_run_name(config, data_path), storage_path=storage,
                checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                failure_config=FailureConfig(max_failures=t.max_failures),
            ),
        )
        result = trainer.fit()
    with result.checkpoint.as_directory() as directory:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".model-", dir=os.path.dirname(os.path.abspath(out)))
        shutil.copytree(os.path.join(directory, HF_SUBDIR), tmp, dirs_exist_ok=True)
        if is_stand_in(model_path):  # a model fine-tuned from the stand-in is still one
            shutil.copy(os.path.join(model_path, MARKER_FILE), tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        with open(os.path.join(directory, STATE_FILE)) as f:
            history = json.load(f)["history"]
    write_jsonl(run.train_log, history)
    return dict(result.metrics)


def plan_steps(lengths: list[int], t: TrainConfig) -> list[list[list[int]]]:
    """Every optimizer step as its rows (each a list of example indices), in training order.

    A step holds `train.global_batch_size` examples, packed or not (the last step of an epoch may
    hold fewer), so the step count and the learning-rate schedule are those of the paper's
    unpacked recipe; packing only changes how many rows a step needs. Epochs are shuffled with
    seed + epoch; a fractional epoch count takes the first part of the last epoch. The plan is the
    same on every run, which is what lets a resumed run skip exactly the steps it already took.
    """
    if len(lengths) < t.global_batch_size:
        raise InputError(f"{len(lengths)} training examples are fewer than one step of "
                         f"train.global_batch_size={t.global_batch_size}")
    steps: list[list[list[int]]] = []
    for epoch in range(math.ceil(t.epochs)):
        epoch_steps = plan_epoch(lengths, t.global_batch_size, t.max_length, t.packing, t.seed + epoch)
        if epoch + 1 > t.epochs:  # the fractional tail
            epoch_steps = epoch_steps[: max(1, round(len(epoch_steps) * (t.epochs - epoch)))]
        steps += epoch_steps
    return steps[: t.max_steps] if t.max_steps else steps


def describe_plan(lengths: list[int], plan: list[list[list[int]]], t: TrainConfig) -> dict:
    """What the plan does, for the log before training: examples per step, steps per epoch, total
    and warmup steps, micro-batches per worker, and the share of computed tokens that are real."""
    examples = [sum(len(row) for row in step) for step in plan]
    micro = [len(micro_batches(step, 0, t.num_workers, t.micro_batch_size)) for step in plan]
    return {
        "examples": len(lengths), "examples_per_step": t.global_batch_size,
        "smallest_step": min(examples), "steps_per_epoch": math.ceil(len(lengths) / t.global_batch_size),
        "steps": len(plan), "warmup_steps": math.ceil(t.warmup_ratio * len(plan)),
        "rows_per_step": round(sum(len(step) for step in plan) / len(plan), 1),
        "micro_batches_per_worker": f"{min(micro)}-{max(micro)}" if min(micro) != max(micro) else str(micro[0]),
        "real_token_fraction": real_token_fraction(lengths, plan, t.num_workers, t.micro_batch_size),
    }


def lr_multiplier(step: int, total: int, warmup: int, schedule: str) -> float:
    """The configured schedule: linear warmup, then cosine/linear decay to 0, or constant.

    >>> [round(lr_multiplier(s, 10, 2, "cosine"), 3) for s in (0, 1, 2, 6, 10)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    >>> lr_multiplier(5, 10, 0, "constant")
    1.0
    """
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress)


def _check_model(name: str) -> str:
    from alpagasus_ray.tiny_model import resolve_model

    path = os.path.expanduser(resolve_model(name))
    hub_id = not path.startswith(("/", ".")) and path.count("/") == 1
    if not os.path.isdir(path) and not hub_id:
        raise InputError(f"train.model={name}: no such model directory (nor an org/name hub id)")
    return path


def _tokenize(data_path: str, model_path: str, t: TrainConfig, data: DataConfig | None = None
              ) -> tuple[list[Example], int]:
    """Every training row as an `Example`, and how many rows were dropped (nothing learned left
    within train.max_length). `data` says how to read conversations (data.formatting, data.columns)."""
    from transformers import AutoTokenizer

    from alpagasus_ray import columns as C
    from alpagasus_ray.store.inputs import INVALID_REASON, read_rows

    reading = (data or DataConfig()).model_copy(update={"path": data_path, "max_row_chars": 10**9, "limit": None})
    rows = read_rows(reading).table
    bad = rows.filter(rows[INVALID_REASON].is_valid())
    if bad.num_rows:
        first = bad.slice(0, 3).to_pylist()
        raise InputError(f"train.data={data_path}: {bad.num_rows} rows cannot be trained on, e.g. "
                         + "; ".join(f"{r[C.SOURCE]}: {r[INVALID_REASON]}" for r in first))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    conversations = rows[C.FORMATTING][0].as_py() != "alpaca"
    chat = t.template == "chat" or (t.template == "auto" and conversations)
    if conversations and not chat:
        raise InputError(f"train.data={data_path} holds conversations: train them with train.template=chat (or auto)")
    if chat:
        render = _chat_renderer(tokenizer, t, model_path)
        if conversations:
            dialogs = rows[C.MESSAGES].to_pylist()
        else:  # an alpaca row in chat form: one user turn, one assistant turn
            dialogs = [[{"role": "user", "content": r[C.INSTRUCTION] + (f"\n\n{r[C.INPUT]}" if r[C.INPUT].strip() else "")},
                        {"role": "assistant", "content": r[C.OUTPUT]}]
                       for r in rows.select([C.INSTRUCTION, C.INPUT, C.OUTPUT]).to_pylist()]
        made = (_chat_example(tokenizer, render, d, t) for d in dialogs)
    else:
        eos = tokenizer.eos_token_id
        made = (encode(tokenizer(alpaca_prompt(r[C.INSTRUCTION], r[C.INPUT])).input_ids,
                       tokenizer(r[C.OUTPUT], add_special_tokens=False).input_ids, eos, t.max_length)
                for r in rows.select([C.INSTRUCTION, C.INPUT, C.OUTPUT]).to_pylist())
    examples, dropped = [], 0
    for example in made:
        if example is None:
            dropped += 1
        else:
            examples.append(example)
    if not examples:
        raise InputError(f"train.data={data_path}: no row keeps any target token within train.max_length={t.max_length}")
    return examples, dropped


def _chat_renderer(tokenizer, t: TrainConfig, model_path: str):
    """`render(messages, add_generation_prompt)` with the tokenizer's chat template, or
    `train.chat_template` (a Jinja text, or a file holding one)."""
    template = t.chat_template
    if template is not None and "{" not in template and os.path.isfile(os.path.expanduser(template)):
        with open(os.path.expanduser(template), encoding="utf-8") as f:
            template = f.read()
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise InputError(f"the tokenizer of {model_path} has no chat template: set train.chat_template to a Jinja "
                         "template (its text or a file), or train.template=alpaca")

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    return render


def _chat_example(tokenizer, render, messages: list[dict], t: TrainConfig) -> Example | None:
    try:
        segments = chat_segments(render, messages, t.train_on)
    except ValueError as e:
        raise InputError(f"train.template=chat: {e}; set train.chat_template to one that does not") from None
    ids = [tokenizer(text, add_special_tokens=False).input_ids for text, _ in segments]
    return encode_segments(ids, [learned for _, learned in segments], t.max_length)


def _run_name(config: Config, data_path: str) -> str:
    """One name per run directory, data and recipe: rerunning the same command finds its
    checkpoints, and other data or another recipe starts afresh instead of resuming them."""
    digest = hashlib.sha256()
    fs, path = open_filesystem(data_path)
    with fs.open_input_stream(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    recipe = {k: v for k, v in config.train.model_dump(mode="json").items()
              if k not in OPERATIONAL and k not in ("data", "model_dir")}
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    digest.update(PLAN_VERSION.encode())  # checkpoints of another planning never resume this one
    return f"train-{os.path.basename(os.path.abspath(config.run_dir))}-{digest.hexdigest()[:8]}"


def _train_loop(loop_config: dict) -> None:
    """Ray Train worker: DeepSpeed over this worker's share of every planned step."""
    import deepspeed
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = TrainConfig(**loop_config["train"])
    plan = loop_config["plan"]
    examples = [Example(ids, labels) for ids, labels in ray.get(loop_config["examples"])]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(t.seed)

    tokenizer = AutoTokenizer.from_pretrained(loop_config["model"])
    dtype = torch.bfloat16 if t.use_gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(loop_config["model"], torch_dtype=dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        model.resize_token_embeddings(len(tokenizer))
    if t.adapter == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, peft_config(t))
    total, warmup = len(plan), math.ceil(t.warmup_ratio * len(plan))
    zero = {"stage": t.zero_stage}
    if t.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if t.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    # Steps hold a varying number of micro-batches: we mark the boundary of each step ourselves. The
    # accumulation count DeepSpeed is told is the largest one, so that its offload keeps an
    # accumulation buffer whenever a step has more than one micro-batch.
    most = max(len(micro_batches(step, 0, world, t.micro_batch_size)) for step in plan)
    ds_config = {
        "train_batch_size": t.micro_batch_size * most * world,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": most,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": t.use_gpu},
        "steps_per_print": 10**9,
        # No "scheduler" and no "optimizer" section: ours are passed in, so DeepSpeed cannot swap them.
    }
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
        optimizer=lambda params: torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999)),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_multiplier(s, total, warmup, t.lr_scheduler)),
        dist_init_required=False,
    )

    start, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            engine.load_checkpoint(directory, tag="ds")
            with open(os.path.join(directory, STATE_FILE)) as f:
                state = json.load(f)
        start, history = state["step"], state["history"]
        print(f"[alpagasus train] resuming after step {start} of {total}", flush=True)

    writer = None
    if t.tensorboard and rank == 0:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(loop_config["tensorboard_dir"])
    pad = tokenizer.pad_token_id
    idle = [[Example([pad, pad], [IGNORE, IGNORE])]]  # a micro-batch for a worker with no rows left in a step
    target_tokens = [sum(label != IGNORE for label in e.labels) for e in examples]
    for step in range(start, total):
        began = time.perf_counter()
        # The step's loss is the mean over every target token of its examples, on all workers: each
        # micro-batch contributes its summed token losses over that count. DeepSpeed averages the
        # gradients over the workers, hence the factor `world`.
        targets = sum(target_tokens[i] for row in plan[step] for i in row)
        batches = micro_batches(plan[step], rank, world, t.micro_batch_size)
        loss_sum, real_tokens, computed = 0.0, 0, 0
        for m, rows in enumerate(batches):
            batch = {k: torch.tensor(v, device=device)
                     for k, v in collate([[examples[i] for i in row] for row in rows] or idle, pad).items()}
            engine.set_gradient_accumulation_boundary(m == len(batches) - 1)
            logits = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                            attention_mask=block_causal_mask(batch["segment_ids"], dtype)).logits
            token_loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE,
                reduction="sum")
            engine.backward(token_loss * world / targets, scale_wrt_gas=False)
            loss_sum += token_loss.item()
            if rows:
                real_tokens += sum(len(examples[i].input_ids) for row in rows for i in row)
                computed += batch["input_ids"].numel()
        engine.step()
        stats = torch.tensor([loss_sum, real_tokens, computed], dtype=torch.float64)
        dist.all_reduce(stats)
        seconds = time.perf_counter() - began
        metrics = {
            "step": step + 1, "steps": total, "loss": stats[0].item() / targets,
            "examples": sum(len(row) for row in plan[step]),
            "lr": scheduler.get_last_lr()[0], "tokens_per_s": stats[1].item() / seconds,
            "real_token_fraction": stats[1].item() / stats[2].item(),
        }
        if step == start and start:  # the first step after a restart says where it took up again
            metrics["resumed_after"] = start
        history.append(metrics)
        if writer is not None:
            for name in ("loss", "lr", "tokens_per_s", "real_token_fraction"):
                writer.add_scalar(f"train/{name}", metrics[name], metrics["step"])
            writer.flush()
        if rank == 0:
            loop_config["progress"].step(metrics)
            print("[alpagasus train] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in metrics.items()), flush=True)
        last = step + 1 == total
        if (step + 1) % t.checkpoint_every == 0 or last:
            export = functools.partial(_export, t=t, model_path=loop_config["model"], dtype=dtype) if last else None
            _report_checkpoint(engine, tokenizer, history, rank, export=export, zero_stage=t.zero_stage)
        else:
            ray.train.report(metrics)


def peft_config(t: TrainConfig):
    """peft's LoraConfig of `train.lora`."""
    from peft import LoraConfig

    lora = t.lora
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                      task_type="CAUSAL_LM")


def _export(module, state: dict, directory: str, t: TrainConfig, model_path: str, dtype) -> None:
    """The trained model as a Hugging Face directory. With a LoRA adapter the weights are loaded
    into a fresh copy of the base model on the CPU (under ZeRO-3 the module's own are shards), then
    merged into it (`train.merge`) or saved alone as a PEFT adapter."""
    if t.adapter != "lora":
        module.save_pretrained(directory, state_dict=state, safe_serialization=True)
        return
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=dtype)
    embeddings = base.get_input_embeddings().weight
    name = next(n for n, p in base.named_parameters() if p is embeddings)
    trained = state.get(f"base_model.model.{name}")
    if trained is not None and trained.shape[0] != embeddings.shape[0]:
        base.resize_token_embeddings(trained.shape[0])  # the pad token added for training
    adapted = get_peft_model(base, peft_config(t))
    missing, unexpected = adapted.load_state_dict(state, strict=False)
    if unexpected or any("lora_" in name for name in missing):
        raise RuntimeError(f"the trained adapter does not fit the base model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if t.merge:
        adapted.merge_and_unload().save_pretrained(directory, safe_serialization=True)
    else:
        adapted.save_pretrained(directory)


def _report_checkpoint(engine, tokenizer, history: list[dict], rank: int, export, zero_stage: int) -> None:
    """Save DeepSpeed state (every rank its shard), the step, and at the end (`export`: a function
    of the module, its whole state and the directory) the HF model."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(directory, tag="ds")
        if export:
            # Under ZeRO-3 every rank holds a shard of each weight: all take part in gathering them.
            state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else engine.module.state_dict()
            if rank == 0:
                export(engine.module, state, os.path.join(directory, HF_SUBDIR))
                tokenizer.save_pretrained(os.path.join(directory, HF_SUBDIR))
        if rank == 0:
            with open(os.path.join(directory, STATE_FILE), "w") as f:
                json.dump({"step": history[-1]["step"], "history": history}, f)
        ray.train.report(history[-1], checkpoint=Checkpoint.from_directory(directory))
