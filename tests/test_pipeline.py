"""`alpagasus run` / `alpagasus demo`: every stage end to end on CPU, reruns skip what is done,
a change reruns its stage and those after it; and the cluster files are valid."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from alpagasus_ray.cli import main
from alpagasus_ray.config import load_config
from alpagasus_ray.pipeline import STAGES

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _finished(run_dir):
    return {s: json.load(open(os.path.join(run_dir, "stages", f"{s}.json")))["finished"] for s in STAGES}


@pytest.mark.slow
def test_the_demo_runs_every_stage_and_a_rerun_skips_them(tmp_path):
    run = tmp_path / "demo"
    small = ["data.limit=40", "train.max_steps=3", "generate.limit=1", "generate.max_new_tokens=16"]
    env = {**os.environ, "ALPAGASUS_CACHE": str(tmp_path / "cache")}  # the stand-in is built on first use

    def demo(*extra):
        done = subprocess.run([sys.executable, "-m", "alpagasus_ray.cli", "demo", "--run-dir", str(run), *small, *extra],
                              capture_output=True, text=True, timeout=900, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    out = demo()
    assert out.strip().splitlines()[-1] == str(run / "report.md")
    assert os.path.isfile(tmp_path / "cache" / "tiny-llama-v1" / "model.safetensors")
    for artifact in ("rated_summary.json", "selection.json", "plots/score_histogram.png", "model/config.json",
                     "model/tiny_model.json", "train_log.jsonl", "answers/demo/koala.jsonl",
                     "answers/tiny-llama-base/wizardlm.jsonl", "judgments/demo_vs_tiny-llama-base/vicuna.jsonl",
                     "report.json", "report.md", "plots/demo_vs_tiny-llama-base_win_tie_lose.png"):
        assert (run / artifact).exists(), artifact
    assert json.load(open(run / "rated_summary.json"))["by_status"]["ok"] == 40
    report = json.loads((run / "report.json").read_text())["demo_vs_tiny-llama-base"]
    # One prompt per test set, judged in both orders; the constrained stand-in always gives a verdict.
    assert all(report[ts]["n"] == 1 and report[ts]["parse_failed"] == 0 for ts in ("koala", "vicuna", "wizardlm", "sinstruct"))
    md = (run / "report.md").read_text()
    assert "carry no meaning" in md and "`answers/demo/koala.jsonl`" in md and "`model/`" in md
    finished = _finished(run)

    assert "skipped (unchanged)" in demo()
    assert _finished(run) == finished  # no stage ran again

    # A changed report setting reruns the report alone; everything before it is unchanged.
    demo("report.plots=false")
    again = _finished(run)
    assert {s for s in STAGES if again[s] != finished[s]} == {"report"}


def test_a_failing_stage_is_named_and_earlier_outputs_stay(tmp_path, capsys):
    run = tmp_path / "run"
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"q{i}", "input": "", "output": "a"}) + "\n" for i in range(3)))
    # No ratings anywhere: filter is the first stage and fails; nothing is written for it.
    code = main(["run", "--config", "/dev/null", f"run_dir={run}", f"data.path={rows}", "--from", "filter"])
    assert code == 1
    err = capsys.readouterr().err
    assert "stage filter failed" in err and str(run) in err
    assert not (run / "stages" / "filter.json").exists()
    assert main(["run", "--config", "/dev/null", f"run_dir={run}", "--only", "judging"]) == 2
    assert "--only judging: not a stage" in capsys.readouterr().err


CLUSTER = os.path.join(ROOT, "cluster")


def test_the_launcher_config_passes_rays_own_validation():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    with open(os.path.join(CLUSTER, "aws-a100.yaml")) as f:
        config = yaml.safe_load(f)
    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        jsonschema.validate(config, json.load(f))  # the file as written, against Ray's launcher schema
    validate_config(prepare_config(config))  # and as `ray up` sees it, with Ray's defaults filled in
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["GPU"] == 0 and head["max_workers"] == 0
    gpu = config["available_node_types"]["gpu-a100"]
    assert gpu["min_workers"] < gpu["max_workers"]  # an autoscaling group
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    text = open(os.path.join(CLUSTER, "aws-a100.yaml")).read()
    assert not re.search(r"sk-[A-Za-z0-9_-]{16,}", text)  # no key in the file
    assert re.findall(r"OPENAI_API_KEY=(\S{2})", text) == ["\"$", "\"$"]  # only read from a secret, on each node


def test_the_kuberay_job_is_well_formed_and_keeps_the_key_in_a_secret():
    with open(os.path.join(CLUSTER, "kuberay-rayjob.yaml")) as f:
        job = yaml.safe_load(f)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob") and job["metadata"]["name"]
    command = job["spec"]["entrypoint"].split()
    assert command[:4] == ["alpagasus", "run", "--config", command[3]]
    load_config(os.path.join(ROOT, command[3]), [a for a in command[4:] if "=" in a])  # the config it runs loads
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"] == {"num-gpus": "0", "dashboard-host": "127.0.0.1"}
    groups = cluster["workerGroupSpecs"]
    assert all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["minReplicas"] < g["maxReplicas"] for g in groups)
    pods = [head["template"]["spec"], *(g["template"]["spec"] for g in groups)]
    for pod in pods:
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            assert container["name"] and container["image"]
            assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes
            for env in container.get("env", []):
                if "KEY" in env["name"]:
                    assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"]
    for group in (head, *groups):
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # KubeRay wants strings
    limits = groups[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) > 0


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "paper_*.yaml"))), ids=os.path.basename)
def test_each_paper_config_is_headed_by_the_command_that_runs_it(path):
    first = open(path).readline()
    assert first.startswith(f"# alpagasus run --config configs/{os.path.basename(path)}")
    config = load_config(path)
    assert config.judge.baseline or "--from train" in first  # a comparison, or the baseline it compares with
