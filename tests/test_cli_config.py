"""The `alpagasus` command and its configs: every shipped YAML loads, bad keys and inputs fail clearly."""

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from alpagasus_ray.cli import main
from alpagasus_ray.config import Config, ConfigError, load_config

from fake_openai_server import serve, stats

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))
PACKAGED = [os.path.join(os.path.dirname(__file__), "..", "alpagasus_ray", "demo.yaml")]


@pytest.mark.parametrize("path", CONFIGS + PACKAGED, ids=os.path.basename)
def test_every_shipped_config_loads_and_starts_with_its_command(path):
    config = load_config(path)
    assert isinstance(config, Config)
    first_line = open(path).readline()
    assert first_line.startswith("# alpagasus ") and os.path.basename(path) in first_line


def test_unknown_keys_and_wrong_types_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"rate": {"backend": "openai", "concurrancy": 4}}))
    with pytest.raises(ConfigError, match=r"c.yaml: rate.concurrancy: unknown key"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"rate.concurrency: Input should be greater than 0"):
        load_config(None, ["rate.concurrency=0"])
    with pytest.raises(ConfigError, match=r"rate.backend: 'claude' is not a backend of this section \(one of: openai, "):
        load_config(None, ["rate.backend=claude"])
    # A key of another backend than the one chosen is refused, naming the key, the backend and where it belongs.
    with pytest.raises(ConfigError, match=r"rate.base_url: not a key of backend vllm \(it is a key of openai, openai_batch, anthropic_batch\)"):
        load_config(None, ["rate.backend=vllm", "rate.base_url=http://127.0.0.1:1/v1"])
    with pytest.raises(ConfigError, match=r"judge.concurrency: not a key of backend vllm"):
        load_config(None, ["judge.backend=vllm", "judge.concurrency=4"])
    with pytest.raises(ConfigError, match=r"generate.batch_poll_seconds: unknown key"):  # no generate backend has it
        load_config(None, ["generate.batch_poll_seconds=4"])
    assert load_config(None, ["rate.backend=vllm", "rate.num_engines=[1, 2]"]).rate.num_engines == (1, 2)
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["rate.concurrency"])


def test_help_lists_the_stage_and_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["rate", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--dry-run" in out and "dotted.key=value" in out


def test_bad_config_or_input_exits_2_before_anything_is_sent(tmp_path, capsys):
    with serve({}) as url:
        compatible = os.path.join(os.path.dirname(__file__), "..", "configs", "rate_openai_compatible.yaml")
        code = main(["rate", "--config", compatible, f"rate.base_url={url}", "rate.concurency=3"])
        assert code == 2 and "rate.concurency: unknown key" in capsys.readouterr().err
        empty = tmp_path / "empty.jsonl"
        empty.write_text("")
        code = main(["rate", "--config", compatible, f"rate.base_url={url}", f"data.path={empty}",
                     f"run_dir={tmp_path / 'run'}"])
        err = capsys.readouterr().err
        # Found in a Ray read task: the message alone ends the output, the worker's traceback went to the log.
        assert code == 2 and err.strip().splitlines()[-1] == f"alpagasus rate: error: {empty}: the file is empty"
        assert "Traceback" not in err and "ray::" not in err
        broken = tmp_path / "broken.json"
        broken.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c", "output": }]')
        code = main(["rate", "--config", compatible, f"rate.base_url={url}", f"data.path={broken}",
                     f"run_dir={tmp_path / 'run'}"])
        err = capsys.readouterr().err
        assert code == 2 and err.strip().splitlines()[-1] == \
            f"alpagasus rate: error: {broken}: line 2 column 33: not valid JSON (Expecting value)"
        assert "Traceback" not in err
        assert stats(url)["requests"] == 0
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_dry_run_counts_and_prices_without_sending(tmp_path):
    rows = [{"instruction": "x" * 400, "input": "", "output": "y" * 400}] * 3 + [{"instruction": "no output"}]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    with serve({}) as url:
        result = subprocess.run(
            [sys.executable, "-m", "alpagasus_ray.cli", "rate", "--config", "configs/rate_openai_compatible.yaml",
             f"rate.base_url={url}", f"data.path={data}", f"run_dir={tmp_path / 'run'}", "--dry-run",
             "rate.price_input_per_million=1.0", "rate.price_output_per_million=2.0", "rate.max_tokens=100"],
            capture_output=True, text=True, timeout=120,
        )
        assert stats(url)["requests"] == 0
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rows_in"] == 4 and report["invalid_input"] == 1 and report["to_send"] == 3
    # each row: 800 bytes of text plus the prompt's own (fenced), at 4 bytes a token
    from alpagasus_ray.rules.prompts import rating_messages

    fixed = sum(len(m["content"].encode()) for m in rating_messages("", "", "", fence=True))
    assert 800 < fixed < 1000 and report["prompt_tokens_estimate"] == math.ceil(3 * (800 + fixed) / 4)
    assert report["cost_usd_at_most"] == pytest.approx((report["prompt_tokens_estimate"] * 1.0 + 300 * 2.0) / 1e6)
    assert not (tmp_path / "run").exists()


def test_old_key_names_still_work_with_a_deprecation_message(caplog):
    assert load_config(None, ["generate.max_new_tokens=16"]).generate.max_tokens == 16
    assert "generate.max_new_tokens is deprecated: use generate.max_tokens" in caplog.text
    with pytest.raises(ConfigError, match="generate.max_new_tokens and generate.max_tokens are the same key"):
        load_config(None, ["generate.max_new_tokens=16", "generate.max_tokens=8"])


def test_a_programming_error_is_not_reported_as_bad_input(monkeypatch, tmp_path):
    """Exit 2 is for the user's config and input; any other error keeps its traceback."""
    import alpagasus_ray.stages.filter

    def broken(config):
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr(alpagasus_ray.stages.filter, "run_filter", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["filter", "--config", "/dev/null", f"run_dir={tmp_path}"])


@pytest.mark.parametrize("name,content,reason", [
    ("plain.txt", "hello world\nsecond line\n", "plain.txt:1 (not valid JSON"),
    ("fields.jsonl", '{"prompt": "a", "completion": "b"}\n{"output": "z"}\n', "fields.jsonl:1 (missing field 'instruction'"),
    ("wrapped.json", '{"data": [{"instruction": "a", "output": "b"}]}', "wrapped.json:1 (missing field 'instruction'"),
])
def test_input_with_no_rateable_row_stops_before_anything_is_sent(tmp_path, capsys, name, content, reason):
    path = tmp_path / name
    path.write_text(content)
    with serve({}) as url:
        code = main(["rate", "--config", "configs/rate_openai_compatible.yaml", f"rate.base_url={url}",
                     f"data.path={path}", f"run_dir={tmp_path / 'run'}"])
        assert stats(url)["requests"] == 0
    err = capsys.readouterr().err
    assert code == 2 and "no row can be rated" in err and reason in err, err
    assert not (tmp_path / "run").exists()
