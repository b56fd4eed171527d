"""A spending cap that holds (`max_cost_usd`), against real local servers that bill their usage:
the synchronous API and the Batch API. The cap stops a stage within it, by the usage the server
reported; a rerun with a higher cap sends only what was not sent."""

import json

import pyarrow.parquet as pq
import pytest

import fake_batch_server
import fake_openai_server
from alpagasus_ray.cli import main
from alpagasus_ray.config import load_config
from alpagasus_ray.errors import EXIT_CAP_REACHED, CapReached
from alpagasus_ray.rules.budget import usd, worst_case_tokens
from alpagasus_ray.rules.prompts import rating_messages
from alpagasus_ray.stages.rate import run_rate

PRICE_IN, PRICE_OUT = 2.0, 8.0  # USD per million tokens
ROWS = 40


def _rows(path):
    rows = [{"instruction": f"ROW-{i:03d} Say hello.", "input": "", "output": "Hello."} for i in range(ROWS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(tmp_path, url, backend, cap, *extra):
    return [f"run_dir={tmp_path / 'run'}", f"data.path={_rows(tmp_path / 'rows.jsonl')}", f"rate.backend={backend}",
            f"rate.base_url={url}", "rate.model=fake", f"rate.price_input_per_million={PRICE_IN}",
            f"rate.price_output_per_million={PRICE_OUT}", f"rate.max_cost_usd={cap}", *extra]


def _billed(server_stats, factor=1.0):
    """What the server's usage comes to."""
    usage = server_stats["usage"]
    return usd(usage["prompt_tokens"], usage["completion_tokens"], PRICE_IN, PRICE_OUT, factor)


def _saved(tmp_path):
    rated = pq.read_table(tmp_path / "run" / "rated").to_pylist()
    return rated, {r["id"] for r in rated}


def _worst_request_usd(factor=1.0):
    """The worst case the cap books for one rating request of these rows (all the same size)."""
    texts = [m["content"] for m in rating_messages("ROW-000 Say hello.", "", "Hello.", fence=True)]
    return usd(*worst_case_tokens(texts, 256), PRICE_IN, PRICE_OUT, factor)


def test_the_api_stops_within_the_cap_and_a_rerun_with_a_higher_cap_sends_only_the_rest(tmp_path, ray_local):
    cap, concurrency = 0.01, 2
    worst = _worst_request_usd()
    with fake_openai_server.serve({}) as url:
        pool = [f"rate.concurrency={concurrency}", "rate.batch_size=4"]
        args = _args(tmp_path, url, "openai", cap, *pool)
        dry = run_rate(load_config(None, args), dry_run=True)
        assert main(["rate", "--config", "/dev/null", *args]) == EXIT_CAP_REACHED
        first = fake_openai_server.stats(url)
        rated, ids = _saved(tmp_path)
        fake_openai_server.reset(url)
        summary = run_rate(load_config(None, _args(tmp_path, url, "openai", 1.0, *pool)))
        second = fake_openai_server.stats(url)
    assert dry["budget"]["covers"] is False and dry["budget"]["worst_case_usd"] == pytest.approx(ROWS * worst, rel=1e-3)
    # Stopped within the cap, by the server's own bill, and not needlessly early: with `concurrency`
    # requests booked at their worst, the next could have passed it.
    billed = _billed(first)
    assert 0 < len(ids) < ROWS and first["requests"] == len(rated) == len(ids)
    assert billed <= cap < billed + (concurrency + 1) * worst
    # Every request answered was saved with the usage the server reported.
    assert sum(r["tokens_in"] for r in rated) == first["usage"]["prompt_tokens"]
    assert sum(r["tokens_out"] for r in rated) == first["usage"]["completion_tokens"]
    # The rerun sends exactly the rows the cap kept back, and the summary's cost is both bills.
    assert second["requests"] == ROWS - len(ids)
    assert summary["rows_out"] == ROWS and summary["by_status"]["ok"] == ROWS
    assert summary["cost_usd"] == pytest.approx(billed + _billed(second), abs=1e-6)


def test_the_batch_api_sends_only_request_files_whose_worst_case_fits(tmp_path, ray_local):
    worst = _worst_request_usd(factor=0.5)
    cap = 25.5 * worst  # room for 25 rows' worst case: files of 10, 10 and a third cut to 5
    poll = ["rate.batch_max_requests=10", "rate.batch_poll_seconds=0.1", "rate.batch_poll_max_seconds=0.3"]
    with fake_batch_server.serve({"batch_seconds": 0.2}) as url:
        args = _args(tmp_path, url, "openai_batch", cap, *poll)
        dry = run_rate(load_config(None, args), dry_run=True)
        with pytest.raises(CapReached, match=r"rate\.max_cost_usd is .* 15 requests were not sent") as stop:
            run_rate(load_config(None, args))
        first = fake_batch_server.stats(url)
        rated, ids = _saved(tmp_path)
        summary = run_rate(load_config(None, _args(tmp_path, url, "openai_batch", ROWS * worst * 1.01, *poll)))
        second = fake_batch_server.stats(url)
    assert dry["budget"]["covers"] is False
    assert first["batch_lines"] == len(rated) == 25 and _billed(first, 0.5) <= cap
    assert f"spent ${_billed(first, 0.5):,.4f}" in str(stop.value)
    assert summary["rows_out"] == ROWS and summary["by_status"]["ok"] == ROWS
    assert second["batch_lines"] == ROWS  # the 15 rows cut, sent once, in the rerun
