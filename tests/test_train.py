"""The training stage on real parts: Ray Train with 2 CPU workers on gloo, DeepSpeed ZeRO-2/3, a tiny
Llama built in the test; checkpoints, resume after a killed worker and after a dead driver, export."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alpagasus_ray.config import load_config
from alpagasus_ray.errors import InputError
from alpagasus_ray.stages.rate import run_rate
from alpagasus_ray.rules.recipe import IGNORE, alpaca_prompt, micro_batches
from alpagasus_ray.store.layout import RunDir
from alpagasus_ray.stages.train import _tokenize, plan_steps, run_train
from testdata import alpaca_rows



def _data(tmp_path, n=48, rows=None):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(rows if rows is not None else alpaca_rows(n)))
    return path


def _overrides(tmp_path, data, model, *extra):
    return [f"run_dir={tmp_path / 'run'}", f"train.data={data}", f"train.model={model}", "train.num_workers=2",
            "train.global_batch_size=8", "train.micro_batch_size=2", "train.max_length=256", *extra]


def _storage(tmp_path):
    """The training's checkpoint directory (named after the run, its data and recipe), once it exists."""
    found = sorted((tmp_path / "run" / "checkpoints").glob("train-run-*"))
    return found[0] if found else tmp_path / "run" / "checkpoints" / "not-yet"


def _log(tmp_path):
    return [json.loads(line) for line in open(RunDir(str(tmp_path / "run")).train_log)]


def test_bad_input_fails_before_any_worker_starts(tmp_path, tiny_model):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(InputError, match="empty.json: the file is empty"):
        run_train(load_config(None, _overrides(tmp_path, empty, tiny_model)))
    broken = _data(tmp_path, rows=[{"instruction": "a", "output": "b"}, {"instruction": "no output"}])
    with pytest.raises(InputError, match=r"1 rows cannot be trained on, e.g. .*train.json\[1\]: missing field 'output'"):
        run_train(load_config(None, _overrides(tmp_path, broken, tiny_model)))
    with pytest.raises(InputError, match="train.model=/nowhere/llama: no such model directory"):
        run_train(load_config(None, _overrides(tmp_path, _data(tmp_path, 8), "/nowhere/llama")))
    with pytest.raises(InputError, match="fewer than one step of train.global_batch_size=8"):
        run_train(load_config(None, _overrides(tmp_path, _data(tmp_path, 3), tiny_model, "train.packing=false", "train.epochs=1")))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_zero2_trains_checkpoints_and_exports_a_model_that_generates(tmp_path, tiny_model, ray_local):
    config = load_config(None, _overrides(
        tmp_path, _data(tmp_path, 96), tiny_model, "train.zero_stage=2", "train.lr=3e-3", "train.lr_scheduler=constant",
        "train.warmup_ratio=0", "train.max_steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=2",
        "train.packing=false", "train.tensorboard=true",
    ))
    metrics = run_train(config)
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "run" / "tensorboard"))
    log = _log(tmp_path)
    assert [m["step"] for m in log] == [1, 2, 3, 4, 5, 6] and metrics["step"] == 6
    assert log[-1]["loss"] < log[0]["loss"] - 0.05  # the loss falls
    assert all(m["lr"] == pytest.approx(3e-3) for m in log)  # the configured (constant) schedule, not DeepSpeed's
    assert all(0 < m["real_token_fraction"] <= 1 and m["tokens_per_s"] > 0 for m in log)
    storage = _storage(tmp_path)
    checkpoints = [d for d in storage.iterdir() if d.is_dir() and d.name.startswith("checkpoint_")]
    assert len(checkpoints) == 2  # keep-last-K
    model_dir = RunDir(str(tmp_path / "run")).model
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)  # the export holds the trained weights
    prompt = tokenizer(alpaca_prompt("Say hello."), return_tensors="pt").input_ids
    assert model.generate(prompt, max_new_tokens=4, do_sample=False).shape[1] == prompt.shape[1] + 4
    # (vLLM serves such an export: the demos generate with it, the LoRA test rates with one.)


@pytest.mark.slow
def test_zero3_with_packing_takes_steps_of_examples_and_exports_the_whole_model(tmp_path, tiny_model, ray_local):
    """Packed steps of 8 examples over 2 workers with a varying number of micro-batches (one worker
    idle for one of them): the step's loss is the mean over its examples' target tokens, as one
    unpacked batch would give."""
    config = load_config(None, _overrides(tmp_path, _data(tmp_path, 96), tiny_model, "train.zero_stage=3",
                                          "train.max_steps=2", "train.packing=true", "train.micro_batch_size=1"))
    examples, _ = _tokenize(str(tmp_path / "train.json"), tiny_model, config.train)
    plan = plan_steps([len(e.input_ids) for e in examples], config.train)
    per_worker = [[len(b) for b in micro_batches(plan[0], rank, 2, 1)] for rank in (0, 1)]
    assert any(0 in sizes for sizes in per_worker), per_worker  # a worker idles through one micro-batch
    run_train(config)
    log = _log(tmp_path)
    assert all(m["real_token_fraction"] > 0.9 and m["examples"] == 8 for m in log)
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    total = targets = 0.0
    with torch.no_grad():
        for i in (i for row in plan[0] for i in row):
            logits = base(input_ids=torch.tensor([examples[i].input_ids])).logits[0, :-1]
            labels = torch.tensor(examples[i].labels[1:])
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum").item()
            targets += (labels != IGNORE).sum().item()
    assert log[0]["loss"] == pytest.approx(total / targets, rel=1e-4)
    trained = AutoModelForCausalLM.from_pretrained(RunDir(str(tmp_path / "run")).model).state_dict()
    base = base.state_dict()
    assert trained.keys() == base.keys() and all(trained[k].shape == base[k].shape for k in base)


@pytest.mark.slow
def test_a_killed_lora_worker_resumes_from_the_last_checkpoint_and_exports_a_merged_model(tmp_path, tiny_model, ray_local):
    """A LoRA adapter on ZeRO-3: a worker killed after a checkpoint, the group restarted from it,
    and the adapter merged into the exported model, which a vLLM engine serves."""
    import ray
    from ray._private.state import actors  # from the GCS: the session's Ray runs without a dashboard

    config = load_config(None, _overrides(tmp_path, _data(tmp_path, 96), tiny_model, "train.max_steps=8",
                                          "train.checkpoint_every=2", "train.max_failures=1", "train.packing=false",
                                          "train.zero_stage=3", "train.adapter=lora", "train.lr=1e-2",
                                          "train.lora={rank: 4, alpha: 8, target_modules: [q_proj, v_proj]}"))
    job = ray.get_runtime_context().get_job_id()
    killed = []

    def kill_one_of_this_runs_workers_after_a_checkpoint():
        while not killed:
            if _registered_checkpoint(_storage(tmp_path)):  # what the restarted group takes up from
                workers = [a["Pid"] for a in actors().values() if "RayTrainWorker" in a["ActorClassName"]
                           and a["JobID"] == job and a["State"] == "ALIVE" and a["Pid"]]
                if workers:
                    os.kill(workers[-1], signal.SIGKILL)
                    killed.append(workers[-1])
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_one_of_this_runs_workers_after_a_checkpoint, daemon=True)
    watcher.start()
    metrics = run_train(config)
    assert killed, "no worker was killed"
    # The group was restarted from a checkpoint taken before the end, not merely killed after it.
    log = _log(tmp_path)
    resumed = [m["resumed_after"] for m in log if "resumed_after" in m]
    assert len(resumed) == 1 and resumed[0] % 2 == 0 and 2 <= resumed[0] < 8
    assert metrics["step"] == 8 and [m["step"] for m in log] == list(range(1, 9))
    # Merged: a plain model whose adapted weights moved and whose other weights are the base's.
    model_dir = RunDir(str(tmp_path / "run")).model
    assert "adapter_config.json" not in os.listdir(model_dir)
    trained = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert trained.keys() == base.keys()
    moved = {k for k in base if not torch.equal(trained[k], base[k])}
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved), sorted(moved)[:5]
    rows = tmp_path / "rate.json"
    rows.write_text(json.dumps(alpaca_rows(4)))
    summary = run_rate(load_config(None, [f"run_dir={tmp_path / 'graded'}", f"data.path={rows}", "rate.backend=vllm",
                                          f"rate.model={model_dir}", "rate.use_gpu=false", "rate.max_model_len=2048"]))
    assert summary["by_status"]["ok"] == 4


@pytest.mark.slow
def test_lora_on_zero2_without_merging_keeps_the_adapter_beside_the_base_model(tmp_path, tiny_model, ray_local):
    from peft import PeftModel

    from alpagasus_ray.tiny_model import check_model_dir

    config = load_config(None, _overrides(tmp_path, _data(tmp_path, 48), tiny_model, "train.max_steps=2",
                                          "train.zero_stage=2", "train.adapter=lora", "train.merge=false",
                                          "train.lr=1e-2", "train.packing=false"))
    run_train(config)
    model_dir = RunDir(str(tmp_path / "run")).model
    files = set(os.listdir(model_dir))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    adapter = json.loads((tmp_path / "run" / "model" / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["base_model_name_or_path"] == tiny_model
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, model_dir).merge_and_unload().state_dict()
    assert any(not torch.equal(merged[k], before[k]) for k in before)  # the adapter was trained
    with pytest.raises(InputError, match="holds a LoRA adapter, not a whole model"):
        check_model_dir(str(model_dir))


@pytest.mark.slow
def test_rerunning_after_the_driver_died_continues_from_the_checkpoint(tmp_path, tiny_model, reap_ray_orphans):
    data = _data(tmp_path, 96)
    command = [sys.executable, "-m", "alpagasus_ray.cli", "train", "--config", "configs/demo.yaml",
               *_overrides(tmp_path, data, tiny_model, "train.max_steps=6", "train.checkpoint_every=2", "train.packing=false")]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not _registered_checkpoint(_storage(tmp_path)):
        assert driver.poll() is None, "the first run ended before its first checkpoint"
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    again = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    # The workers' messages are in the run's logs, the console shows the bar's steps.
    assert "resuming after step" in (tmp_path / "run" / "logs" / "workers.log").read_text()
    assert "train: 6 of 6 steps" in again.stderr
    assert [m["step"] for m in _log(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert [m["resumed_after"] for m in _log(tmp_path) if "resumed_after" in m] in ([2], [4])


def _registered_checkpoint(storage) -> bool:
    """Ray Train has recorded a checkpoint in its snapshot (what a new run restores from)."""
    try:
        return json.load(open(storage / "checkpoint_manager_snapshot.json"))["latest_checkpoint_result"] is not None
    except (OSError, ValueError, KeyError):
        return False

