"""The rating stage on real vLLM (CPU build) with a tiny model built in the test: Ray Data LLM
engines, and vLLM's own OpenAI-compatible server behind the openai backend."""

import json

import pyarrow.parquet as pq
import pytest

from alpagasus_ray.config import load_config
from alpagasus_ray.rules.prompts import SCORE_CHOICES
from alpagasus_ray.stages.rate import run_rate

pytestmark = pytest.mark.slow


def _data(tmp_path, n, too_long=False, most_chars=None):
    rows = json.load(open("alpagasus_ray/sample/alpaca_sample.json"))
    if most_chars is not None:  # rows whose rating prompt fits a small context
        rows = [r for r in rows if len(r["instruction"]) + len(r["input"]) + len(r["output"]) <= most_chars]
    rows = rows[:n]
    if too_long:
        rows.append({"id": "too-long", "instruction": "Summarize.", "input": "", "output": "word " * 3000})
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    return path


def _vllm_config(tmp_path, model, data, *extra):
    return load_config(None, [
        f"run_dir={tmp_path / 'run'}", f"data.path={data}", "rate.backend=vllm", f"rate.model={model}",
        "rate.use_gpu=false", "rate.max_model_len=2048", "rate.batch_size=8", *extra,
    ])


def test_vllm_engine_scores_constrained_with_expected_score(tmp_path, tiny_model, ray_local):
    data = _data(tmp_path, 12, too_long=True)
    summary = run_rate(_vllm_config(tmp_path, tiny_model, data))
    rated = {r["id"]: r for r in pq.read_table(tmp_path / "run" / "rated").to_pylist()}
    assert summary["rows_in"] == summary["rows_out"] == len(rated) == 13
    # The row longer than the engine's context is counted with its tokenizer and never sent.
    assert summary["by_status"] == {"ok": 12, "parse_failed": 0, "request_failed": 0, "invalid_input": 0, "too_long": 1}
    assert summary["context"] == {"tokens": 2048, "key": "rate.max_model_len",
                                  "counted_by": "the grader's tokenizer and chat template"}
    failed = rated.pop("too-long")
    assert failed["status"] == "too_long" and failed["score"] is None and failed["tokens_in"] == 0
    assert "more than the grader's context of 2,048 (rate.max_model_len" in failed["error"]
    for row in rated.values():
        assert f"{row['score']:g}" in SCORE_CHOICES  # structured outputs: only valid scores
        assert 0.0 <= row["score_expected"] <= 5.0
        assert row["grader"] == f"vllm:{tiny_model}" and row["attempts"] == 1
        assert row["tokens_in"] > 100 and 1 <= row["tokens_out"] <= 4
    # the logprob-weighted score is finer than the 0.5 steps of the discrete one
    assert any(row["score_expected"] * 2 != round(row["score_expected"] * 2) for row in rated.values())


def test_unparseable_replies_are_asked_once_more_then_kept(tmp_path, tiny_model, ray_local):
    """Unconstrained, the random tiny model writes no score: every row is asked twice and kept."""
    data = _data(tmp_path, 4)
    summary = run_rate(_vllm_config(tmp_path, tiny_model, data, "rate.constrained=false", "rate.max_tokens=8"))
    rated = pq.read_table(tmp_path / "run" / "rated").to_pylist()
    assert summary["by_status"]["parse_failed"] == 4 and len(rated) == 4
    assert all(r["attempts"] == 2 and r["score"] is None and r["error"] for r in rated)
    # A rerun sends nothing: parse_failed after two asks is final.
    assert run_rate(_vllm_config(tmp_path, tiny_model, data, "rate.constrained=false"))["rows_sent_this_run"] == 0


def test_openai_backend_against_vllm_openai_server(tmp_path, vllm_server, tiny_model, ray_local):
    data = _data(tmp_path, 6, most_chars=400)  # the server's context is 1,024 tokens of the tiny tokenizer
    base = [f"run_dir={tmp_path / 'run'}", f"data.path={data}", "rate.backend=openai", f"rate.base_url={vllm_server}",
            f"rate.model={tiny_model}", "rate.max_tokens=8", "rate.concurrency=4"]
    choices = json.dumps({"structured_outputs": {"choice": list(SCORE_CHOICES)}})
    summary = run_rate(load_config(None, [*base, f"rate.extra_body={choices}"]))
    rated = pq.read_table(tmp_path / "run" / "rated").to_pylist()
    assert summary["rows_out"] == 6 and summary["by_status"]["ok"] == 6
    for row in rated:
        assert f"{row['score']:g}" in SCORE_CHOICES and 0.0 <= row["score_expected"] <= 5.0
        assert row["tokens_in"] > 100 and row["tokens_out"] > 0
    assert summary["tokens_in"] == sum(r["tokens_in"] for r in rated)

    # Unconstrained, the random model writes no score: each row is asked twice, then kept.
    summary = run_rate(load_config(None, [*base, f"run_dir={tmp_path / 'free'}"]))
    rated = pq.read_table(tmp_path / "free" / "rated").to_pylist()
    assert summary["by_status"]["parse_failed"] == 6 and all(r["attempts"] == 2 for r in rated)
