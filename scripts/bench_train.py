"""P3: padding and throughput of the training stage.

    python scripts/bench_train.py [--steps 12]

1. The plan of the paper's 9k run on the paper's 9,229-row random subset (3 epochs, steps of 128
   examples, 4 workers x micro-batch 4, max length 512), with and without packing: steps, rows a
   step and real tokens / computed tokens. Llama's tokenizer cannot be downloaded here, so a
   32k-token BPE (Llama's vocabulary size) is trained on the Alpaca text to get realistic lengths.
2. Tokens/s of the Ray Train + DeepSpeed loop (1 and 2 CPU workers, ZeRO-2, the `alpagasus train` stage)
   against a plain single-process PyTorch loop (AdamW, same model, same packed micro-batches, one
   thread, as each Ray worker has one CPU), both after their first step: the per-worker ratio is
   (Ray tokens/s / workers) / plain tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared", "data")


def bpe_lengths(rows: list[dict], max_length: int) -> list[int]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from alpagasus_ray.rules.recipe import alpaca_prompt

    texts = [alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in rows]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=32_000, special_tokens=["<unk>", "</s>"]))
    return [min(max_length, len(bpe.encode(t).ids) + 2) for t in texts]  # + BOS and EOS


def padding_report(max_length: int = 512, micro_batch: int = 4, workers: int = 4) -> dict:
    """The plan of the paper's 9k run (Table 5: 3 epochs, 128 examples a step, 4 workers x micro-batch 4)
    on the released 9,229-row subset: steps, rows per step and real/computed tokens, packed and not."""
    from alpagasus_ray.config import TrainConfig
    from alpagasus_ray.stages.train import describe_plan, plan_steps

    rows = json.load(open(os.path.join(SHARED, "alpagasus_release", "random_9k.json")))
    lengths = bpe_lengths(rows, max_length)
    report = {"rows": len(rows), "mean_tokens_per_row": round(statistics.mean(lengths), 1)}
    for packing in (True, False):
        t = TrainConfig(epochs=3, global_batch_size=128, max_length=max_length, packing=packing,
                        num_workers=workers, micro_batch_size=micro_batch)
        plan = describe_plan(lengths, plan_steps(lengths, t), t)
        key = "packing" if packing else "no_packing"
        report[f"steps_{key}"] = plan["steps"]
        report[f"rows_per_step_{key}"] = plan["rows_per_step"]
        report[f"micro_batches_per_worker_{key}"] = plan["micro_batches_per_worker"]
        report[f"real_fraction_{key}"] = plan["real_token_fraction"]
    return report


def plain_loop_tokens_per_s(model_dir: str, examples, plan, micro_batch: int, lr: float) -> float:
    """Single process, one thread, no Ray, no DeepSpeed: the same micro-batches and AdamW."""
    import torch
    from transformers import AutoModelForCausalLM

    from alpagasus_ray.rules.recipe import block_causal_mask, collate

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rates = []
    for step in plan:
        began, tokens = time.perf_counter(), 0
        for m in range(0, len(step), micro_batch):
            rows = [[examples[i] for i in row] for row in step[m:m + micro_batch]]
            batch = {k: torch.tensor(v) for k, v in collate(rows, 0).items()}
            loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         attention_mask=block_causal_mask(batch["segment_ids"]), labels=batch["labels"]).loss
            loss.backward()
            tokens += sum(len(examples[i].input_ids) for row in step[m:m + micro_batch] for i in row)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        rates.append(tokens / (time.perf_counter() - began))
    return statistics.mean(rates[1:])


def throughput_report(steps: int, workers: int) -> dict:
    from alpagasus_ray.config import load_config
    from alpagasus_ray.store.layout import RunDir
    from alpagasus_ray.stages.train import _tokenize, plan_steps, run_train
    from alpagasus_ray.tiny_model import resolve_model

    model = resolve_model("builtin:tiny-llama")
    with tempfile.TemporaryDirectory() as run_dir:
        data = os.path.join(run_dir, "rows.json")
        with open(data, "w") as f:
            json.dump(json.load(open(os.path.join(SHARED, "alpagasus_release", "random_9k.json")))[:2000], f)
        config = load_config(None, [f"run_dir={run_dir}", f"train.data={data}", f"train.model={model}",
                                    f"train.num_workers={workers}", "train.global_batch_size=32", "train.micro_batch_size=4",
                                    "train.max_length=512", f"train.max_steps={steps}", "train.checkpoint_every=1000"])
        run_train(config)
        log = [json.loads(line) for line in open(RunDir(run_dir).train_log)]
        ray_rate = statistics.mean(m["tokens_per_s"] for m in log[1:])
        examples, _ = _tokenize(data, model, config.train)
        plan = plan_steps([len(e.input_ids) for e in examples], config.train)
    plain = plain_loop_tokens_per_s(model, examples, plan, config.train.micro_batch_size, config.train.lr)
    workers = config.train.num_workers
    return {"ray_deepspeed_tokens_per_s": round(ray_rate), "workers": workers,
            "plain_pytorch_tokens_per_s_one_thread": round(plain),
            "per_worker_ratio": round(ray_rate / workers / plain, 3),
            "real_token_fraction_in_run": round(statistics.mean(m["real_token_fraction"] for m in log), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray Train worker counts to measure")
    args = parser.parse_args()
    padding = padding_report()
    print(json.dumps(padding, indent=2), flush=True)
    ratios = []
    for workers in args.workers:
        speed = throughput_report(args.steps, workers)
        print(json.dumps(speed, indent=2), flush=True)
        ratios.append(f"{workers} worker(s): {speed['per_worker_ratio']:.2f}")
    print(f"P3: the 9k plan takes {padding['steps_packing']} steps of 128 examples packed into "
          f"{padding['rows_per_step_packing']} rows ({padding['steps_no_packing']} steps of "
          f"{padding['rows_per_step_no_packing']} rows unpacked); real/computed tokens "
          f"{padding['real_fraction_packing']:.3f} with packing, {padding['real_fraction_no_packing']:.3f} without; Ray Train + DeepSpeed tokens/s per worker over a "
          f"plain PyTorch loop: {', '.join(ratios)}")


if __name__ == "__main__":
    sys.exit(main())
