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
    small = ["data.limit=40", "train.max_steps=3", "generate.limit=1", "generate.max_tokens=16"]
    env = {**os.environ, "ALPAGASUS_CACHE": str(tmp_path / "cache")}  # the stand-in is built on first use

    def demo(*extra):
        done = subprocess.run([sys.executable, "-m", "alpagasus_ray.cli", "demo", "--run-dir", str(run), *small, *extra],
                              capture_output=True, text=True, timeout=900, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout, done.stderr

    out, err = demo()
    assert out.strip().splitlines()[-1] == str(run / "report.md")
    # The console holds the stages' own lines (about a screen); Ray's, Ray Data's and the workers'
    # messages are in the run's logs, where the engines' vLLM logging is at WARNING unless --verbose.
    console = [line for line in (out + err).splitlines() if line.strip()]
    assert len(console) <= 40, "\n".join(console)
    assert not [line for line in console if "issue_detector" in line or "pid=" in line]
    workers = (run / "logs" / "workers.log").read_text()
    assert "EngineCore" in workers and not re.search(r"\((EngineCore|MainProcess|Worker)[^)]* pid=\d+\) INFO", workers)
    assert "ray.data" in (run / "logs" / "alpagasus.log").read_text()
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

    # A changed report setting reruns the report alone; every stage before it is skipped, unchanged.
    assert "skipped (unchanged)" in demo("report.plots=false")[0]
    again = _finished(run)
    assert {s for s in STAGES if again[s] != finished[s]} == {"report"}

    # A changed train setting reruns training and every stage after it, not the rating or the filter.
    # The retrained model's answers are stale: made anew (the untouched base model's are kept), and
    # the verdicts follow the answers: judged anew exactly when the new answers differ.
    answers = {p.name: p.read_text() for p in (run / "answers" / "demo").glob("*.jsonl")}
    demo("report.plots=false", "train.lr=5.0e-3")
    changed = _finished(run)
    assert {s for s in STAGES if changed[s] != again[s]} == {"train", "generate", "judge", "report"}
    assert json.load(open(run / "answers" / "demo" / "generation.json"))["generated_this_run"] == 4
    assert json.load(open(run / "answers" / "tiny-llama-base" / "generation.json"))["generated_this_run"] == 0
    new_answers = {p.name: p.read_text() for p in (run / "answers" / "demo").glob("*.jsonl")}
    judged = json.load(open(run / "judgments" / "demo_vs_tiny-llama-base" / "judge.json"))["sent_this_run"]
    assert judged == (8 if new_answers != answers else 0)


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


def _rayjob():
    with open(os.path.join(CLUSTER, "kuberay-rayjob.yaml")) as f:
        return yaml.safe_load(f)


def _pods(job):
    cluster = job["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]


def _entrypoint_config(job):
    command = job["spec"]["entrypoint"].split()
    assert command[:3] == ["alpagasus", "run", "--config"]
    return load_config(os.path.join(ROOT, command[3]), [a for a in command[4:] if "=" in a])


def _paths(config):
    """Every file or directory a run of `config` reads or writes, by key."""
    paths = {"run_dir": config.run_dir, "data.path": config.data.path, "train.data": config.train.data,
             "train.storage_path": config.train.storage_path, "filter.rated_from": config.filter.rated_from,
             "filter.k_from": config.filter.k_from, "filter.compare": config.filter.compare,
             **{f"report.runs[{i}]": run for i, run in enumerate(config.report.runs)}}
    for key in ("judge.candidate", "judge.baseline"):  # a name under <run_dir>/answers, or a path
        value = getattr(config.judge, key.split(".")[1])
        if value and "/" in value:
            paths[key] = value
    models = {"train.model": config.train.model, "generate.model": config.generate.model,
              "generate.baseline_model": config.generate.baseline_model}
    models.update({f"{s}.model": getattr(config, s).model for s in ("rate", "judge") if getattr(config, s).backend == "vllm"})
    for key, value in models.items():  # a directory, or a hub id (org/name) or the built-in stand-in
        if value and (value.startswith(("/", ".")) or value.count("/") > 1):
            paths[key] = value
    return {k: v for k, v in paths.items() if v and not v.startswith("builtin:")}


def test_the_kuberay_job_starts_as_kuberay_runs_it():
    """The dashboard is reachable through the head Service and protected by Ray's token auth; every
    path of the entrypoint's config is on the volume every pod mounts, or in object storage; the
    key is required; both pod kinds have /dev/shm."""
    job = _rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob") and job["metadata"]["name"]
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        assert "dashboard-host" not in group["rayStartParams"]  # KubeRay binds it to 0.0.0.0 only when absent
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # KubeRay wants strings
    assert cluster["enableInTreeAutoscaling"] is True
    groups = cluster["workerGroupSpecs"]
    assert all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["minReplicas"] < g["maxReplicas"] for g in groups)

    pods = _pods(job)
    mounted = None
    for pod in pods:
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            assert container["name"] and container["image"]
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert set(mounts.values()) <= set(volumes)
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
            shared = {path for path, name in mounts.items() if "persistentVolumeClaim" in volumes[name]}
            mounted = shared if mounted is None else mounted & shared
            keys = [e for e in container.get("env", []) if "KEY" in e["name"]]
            assert keys and all("value" not in e and not e["valueFrom"]["secretKeyRef"].get("optional") for e in keys)
    assert mounted == {"/mnt/shared"}

    config = _entrypoint_config(job)
    paths = _paths(config)
    assert {"run_dir", "data.path", "train.model", "train.storage_path", "judge.baseline"} <= set(paths)
    outside = {k: v for k, v in paths.items() if not v.startswith(("s3://", "gs://"))
               and not any(v.startswith(m + "/") for m in mounted)}
    assert not outside, f"paths the pods cannot see: {outside}"
    gpu = groups[0]["template"]["spec"]
    assert int(gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= config.train.num_workers // 2
    assert "80GB" in gpu["nodeSelector"]["nvidia.com/gpu.product"]
    text = open(os.path.join(CLUSTER, "aws-a100.yaml")).read()
    assert "p4de.24xlarge" in text  # the launcher's nodes are A100 80GB too


def test_paths_outside_the_volume_are_found():
    """The path check above can fail: the paper config as written reads relative paths."""
    paths = _paths(load_config(os.path.join(ROOT, "configs", "paper_alpagasus_9k.yaml")))
    assert paths["data.path"] == "data/alpaca_data.json" and paths["judge.baseline"].startswith("runs/")
    assert paths["train.model"] == "/models/llama-7b"


def _crd_schema():
    """The RayJob CRD of KubeRay v1.7.0 (ray.io_rayjobs.yaml), from KUBERAY_CRD or the data directory."""
    from testdata import scale_data

    path = os.environ.get("KUBERAY_CRD") or scale_data("kuberay/ray.io_rayjobs.yaml")  # a skip, or a failure in CI
    with open(path) as f:
        crd = yaml.safe_load(f)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def _as_json_schema(node):
    """An OpenAPI v3 CRD schema as JSON Schema: `x-kubernetes-int-or-string` is an int or a string."""
    if isinstance(node, dict):
        out = {k: _as_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
        if node.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return out
    return [_as_json_schema(v) for v in node] if isinstance(node, list) else node


def unknown_keys(value, schema, where="") -> list[str]:
    """Keys the schema does not know (Kubernetes drops them silently), as dotted paths.

    >>> schema = {"properties": {"a": {"properties": {"b": {}}}, "m": {"additionalProperties": {}}}}
    >>> unknown_keys({"a": {"b": 1, "c": 2}, "m": {"any": 1}, "z": 0}, schema)
    ['a.c', 'z']
    """
    found = []
    if isinstance(value, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for key, item in value.items():
            if key in schema["properties"]:
                found += unknown_keys(item, schema["properties"][key], f"{where}{key}.")
            elif "additionalProperties" not in schema:
                found.append(f"{where}{key}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            found += unknown_keys(item, schema["additionalProperties"], f"{where}{key}.")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_keys(item, schema["items"], f"{where}{i}.")
    return sorted(k.rstrip(".") for k in found)


def test_the_kuberay_job_passes_the_rayjob_crd_schema_with_no_unknown_key():
    import jsonschema

    schema = _crd_schema()
    job = _rayjob()
    jsonschema.validate(job, _as_json_schema(schema))
    assert unknown_keys(job, schema) == []


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "paper_*.yaml"))), ids=os.path.basename)
def test_each_paper_config_is_headed_by_the_command_that_runs_it(path):
    first = open(path).readline()
    assert first.startswith(f"# alpagasus run --config configs/{os.path.basename(path)}")
    config = load_config(path)
    assert config.judge.baseline or "--from train" in first  # a comparison, or the baseline it compares with
