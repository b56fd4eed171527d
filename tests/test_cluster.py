"""A rating on a two-node Ray cluster, as a job on a real cluster runs it: the driver joins the
cluster through RAY_ADDRESS, the API workers run on the second node (the only one offering the
custom resource `rater`) and write their parts there, and the driver finds and counts them."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from fake_openai_server import serve, stats

ROOT = os.path.join(os.path.dirname(__file__), "..")

# Run in a process joined to the cluster after the rating: which node each rating actor ran on.
PROBE = """
import json, sys
import ray
from ray._private import state
ray.init(address=sys.argv[1])
nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
actors = [{"class": a["ActorClassName"], "node_resources": nodes.get(a["Address"]["NodeID"], {})}
          for a in state.actors().values()]
print(json.dumps(actors))
"""


@pytest.fixture
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=2, resources={"rater": 2})
    cluster.wait_for_nodes()
    try:
        yield cluster.address
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_rating_actors_run_on_the_second_node_and_their_parts_are_counted(tmp_path, two_nodes):
    rows = [{"instruction": f"ROW-{i:03d} Say hello.", "input": "", "output": "Hello."} for i in range(40)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": two_nodes}
    with serve({"replies": ["4.5\nGood.", "3\nVague."]}) as url:
        done = subprocess.run(
            [sys.executable, "-m", "alpagasus_ray.cli", "rate", "--config", "configs/rate_openai_compatible.yaml",
             f"rate.base_url={url}", f"data.path={data}", f"run_dir={run_dir}", "rate.num_workers=2",
             "rate.concurrency=4", "rate.batch_size=8", "rate.worker_resources={rater: 1}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )
        requests = stats(url)["requests"]
    assert done.returncode == 0, done.stderr[-3000:]

    probe = subprocess.run([sys.executable, "-c", PROBE, two_nodes], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-3000:]
    mappers = [a for a in json.loads(probe.stdout.strip().splitlines()[-1]) if "ApiMapper" in a["class"]]
    assert len(mappers) == 2
    assert all(a["node_resources"].get("rater") == 2 for a in mappers)  # the second node, not the head

    rated = pq.read_table(run_dir / "rated")
    summary = json.loads((run_dir / "rated_summary.json").read_text())
    assert rated.num_rows == 40 == summary["rows_out"] == requests
    assert sorted(rated["instruction"].to_pylist()) == sorted(r["instruction"] for r in rows)
    assert summary["by_status"]["ok"] == 40
    assert sum(summary["score_histogram"].values()) == 40 and set(summary["score_histogram"]) == {"4.5", "3"}
