"""The whole method in one command: rate -> filter -> train -> generate -> judge -> report.

    alpagasus run --config configs/paper_alpagasus_9k.yaml [dotted.key=value ...] [--from STAGE | --only STAGE]

Each finished stage records what it ran with in `<run_dir>/stages/<stage>.json`: a fingerprint
of its settings and of the stage before it, with its summary and time. On a rerun a stage whose
fingerprint is unchanged is skipped; a changed one runs again, and so does every stage after it
(their fingerprints include its). Keys that change how fast a stage runs but not what it produces
(concurrency, workers, retries, checkpoint cadence, ...) are not part of a fingerprint. A failure
names the stage and leaves what the earlier stages wrote as it was; the stage itself resumes on
the next run (rating and judging never re-send finished rows, training continues from its last
checkpoint).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import time
from typing import Callable

from alpagasus_ray.config import OPERATIONAL, Config, ConfigError, config_for_record
from alpagasus_ray.errors import CapReached
from alpagasus_ray.store.layout import RunDir, read_json, trained_model_dir, write_json
from alpagasus_ray.store.records import content_digest

log = logging.getLogger(__name__)

STAGES = ("rate", "filter", "train", "generate", "judge", "report")


class StageFailed(RuntimeError):
    """A stage raised; the message names it. Earlier stages' outputs are untouched."""


def run_pipeline(config: Config, first: str | None = None, only: str | None = None) -> dict:
    """Run the stages of `config` in order into `config.run_dir`; returns {stage: record}.

    `first` starts at that stage (earlier ones must have run, here or by hand); `only` runs one
    stage, and runs it even when its fingerprint is unchanged.
    """
    for name, value in (("--from", first), ("--only", only)):
        if value is not None and value not in STAGES:
            raise ConfigError(f"{name} {value}: not a stage; the stages are {', '.join(STAGES)}")
    selected = [only] if only else list(STAGES[STAGES.index(first):] if first else STAGES)
    if "train" in selected or ("generate" in selected and not config.generate.model):
        trained_model_dir(config.run_dir, config.train.model_dir)  # on an object store it must be given: say so now
    write_json(RunDir(config.run_dir).run_config, config_for_record(config))
    previous = _recorded(config.run_dir, STAGES[STAGES.index(selected[0]) - 1]) if selected[0] != STAGES[0] else None
    previous_fp = previous["fingerprint"] if previous else "start"
    results, rerun_rest, started = {}, False, time.time()
    for stage in selected:
        fp = fingerprint(stage, config, previous_fp)
        done = _recorded(config.run_dir, stage)
        if done and done["fingerprint"] == fp and not rerun_rest and only is None:
            log.info("== %s: unchanged since %s, skipped", stage, done["finished"])
            results[stage] = {**done, "skipped": True}
            previous_fp = fp
            continue
        rerun_rest = True
        reason = _nothing_to_do(stage, config)
        if reason:
            log.info("== %s: not run: %s", stage, reason)
            results[stage] = {"stage": stage, "fingerprint": fp, "skipped": True, "reason": reason}
            previous_fp = fp
            continue
        log.info("== %s: started", stage)
        t0 = time.time()
        try:
            summary = RUNNERS[stage](config)
        except CapReached:
            raise  # not a failure: the stage stopped at its cap, and a rerun goes on
        except Exception as e:
            log.error("== %s: failed after %.1f s: %s", stage, time.time() - t0, e)
            raise StageFailed(f"stage {stage} failed: {e}") from e
        record = {"stage": stage, "fingerprint": fp, "seconds": round(time.time() - t0, 1),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "summary": summary}
        _record(config.run_dir, stage, record)
        log.info("== %s: done in %.1f s: %s", stage, record["seconds"], _one_line(summary))
        results[stage] = {**record, "skipped": False}
        previous_fp = fp
    log.info("== all stages done in %.1f s", time.time() - started)
    return results


def fingerprint(stage: str, config: Config, previous: str) -> str:
    """What a stage's result depends on: its settings (less the operational ones), its input
    files, and the fingerprint of the stage before it.

    >>> from alpagasus_ray.config import load_config
    >>> a = fingerprint("filter", load_config(None, []), "x")
    >>> a == fingerprint("filter", load_config(None, ["rate.concurrency=64"]), "x")
    True
    >>> a == fingerprint("filter", load_config(None, ["filter.threshold=4"]), "x")
    False
    """
    settings = {
        "rate": lambda: {"data": config.data.model_dump(mode="json"), "rate": config.rate.model_dump(mode="json"),
                         "files": _file_stamps(config.data.path)},
        "filter": lambda: {**config.filter.model_dump(mode="json"),
                           "files": _file_stamps(RunDir(config.filter.rated_from).rated) if config.filter.rated_from else []},
        "train": lambda: {**config.train.model_dump(mode="json"), "files": _file_stamps(config.train.data)},
        "generate": lambda: config.generate.model_dump(mode="json"),
        "judge": lambda: {**config.judge.model_dump(mode="json"),
                          "answers": _answers_digest(config.judge.baseline), "candidate": _answers_digest(config.judge.candidate)},
        "report": lambda: {**config.report.model_dump(mode="json"), "runs": [_file_stamps(r) for r in config.report.runs]},
    }[stage]()
    text = json.dumps({"stage": stage, "settings": _strip(settings), "previous": previous}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _nothing_to_do(stage: str, config: Config) -> str | None:
    """Why a stage has nothing to do in this run's config (None when it has work)."""
    if stage == "rate" and config.filter.rated_from:
        return f"the selection reads the ratings of {config.filter.rated_from}"
    if stage in ("judge", "report") and not (config.judge.baseline or config.generate.baseline_model):
        return "nothing to compare against (set judge.baseline or generate.baseline_model)"
    return None


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in OPERATIONAL}
    return value


def _file_stamps(path: str | None) -> list:
    """(path, size, mtime) of the local files a path or glob names; remote paths stand for themselves."""
    if not path or "://" in path or path.startswith("builtin:"):
        return [path]
    names = sorted(glob.glob(os.path.join(path, "**"), recursive=True) if os.path.isdir(path) else glob.glob(path))
    return [(n, os.path.getsize(n), os.path.getmtime(n)) for n in names if os.path.isfile(n)]


def _answers_digest(path: str | None) -> str | None:
    """The content of answers made outside this run (another run's), so new answers there rerun the judge."""
    files = glob.glob(os.path.join(path, "*.jsonl")) if path and os.path.isdir(path) else []
    return content_digest(files) if files else path


def _recorded(run_dir: str, stage: str) -> dict | None:
    return read_json(RunDir(run_dir).stage_record(stage))


def _record(run_dir: str, stage: str, record: dict) -> None:
    write_json(RunDir(run_dir).stage_record(stage), record)


def _one_line(summary) -> str:
    text = json.dumps(summary, default=str)
    return text if len(text) < 400 else text[:400] + "..."


def _rate(config: Config) -> dict:
    from alpagasus_ray.stages.rate import run_rate

    s = run_rate(config)
    return {k: s[k] for k in ("rows_in", "rows_out", "by_status", "tokens_in", "tokens_out", "cost_usd",
                              "rows_sent_this_run", "wall_seconds")}


def _filter(config: Config) -> dict:
    from alpagasus_ray.stages.filter import run_filter

    r = run_filter(config)
    return {"mode": r["mode"], "selected": r["selected"], "pool": r["pool"]}


def _train(config: Config) -> dict:
    from alpagasus_ray.stages.train import run_train

    metrics = run_train(config)
    return {k: metrics.get(k) for k in ("step", "loss", "epoch", "tokens") if k in metrics}


def _generate(config: Config) -> dict:
    from alpagasus_ray.stages.generate import run_generate

    return {r["name"]: {k: r[k] for k in ("prompts", "by_finish_reason", "tokens_in", "tokens_out", "generated_this_run")}
            for r in run_generate(config)}


def _judge(config: Config) -> dict:
    from alpagasus_ray.stages.judge import run_judge

    r = run_judge(config)
    return {k: r[k] for k in ("candidate", "baseline", "judge", "judgments_by_status", "sent_this_run", "tokens_in",
                              "tokens_out", "cost_usd")}


def _report(config: Config) -> dict:
    from alpagasus_ray.stages.report import ALL, run_report

    report = run_report(config)
    return {"report": RunDir(config.run_dir).report_md,
            **{pair: {k: entry[ALL][k] for k in ("win", "tie", "lose", "n", "winning_score")} for pair, entry in report.items()}}


RUNNERS: dict[str, Callable[[Config], dict]] = {
    "rate": _rate, "filter": _filter, "train": _train, "generate": _generate, "judge": _judge, "report": _report,
}
