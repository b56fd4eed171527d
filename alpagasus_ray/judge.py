"""The judging stage: an LLM judge compares two models' answers, each prompt in both orders.

    alpagasus judge --config configs/paper_alpagasus_9k.yaml judge.candidate=alpagasus-9k judge.baseline=runs/alpaca-52k/answers/alpaca-52k

For every prompt answered by both models the judge is asked twice, candidate first and then
baseline first, with the paper's App. C prompt (`judge.prompt=vicuna`: two scores 1-10) or the
FastChat pair prompt (`pair`: a verdict [[A]]/[[B]]/[[C]]). A reply that cannot be read is asked
once more, then kept as parse_failed: it is never a score. The judge runs on the same backends as
rating (an OpenAI-compatible API under concurrency and rate limits, or vLLM engines on Ray Data).

Writes `<run_dir>/judgments/<candidate>_vs_<baseline>/<test_set>.jsonl`, one line per judgment
(two per prompt), each from the candidate's side: id, test_set, category, order, status, outcome,
score_candidate, score_baseline, review, attempts, error, tokens, judge, prompt. Judgments are
saved as they arrive; a rerun asks only for the missing ones.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter

import pyarrow as pa

from alpagasus_ray import columns as C
from alpagasus_ray.backends.openai_api import require_key
from alpagasus_ray.config import Config, ConfigError, JudgeConfig, config_for_record
from alpagasus_ray.data import InputError
from alpagasus_ray.generate import answers_names, question, read_answers
from alpagasus_ray.judging import PARSERS, flip, judge_messages
from alpagasus_ray.layout import GENERATION_FILE, JUDGE_FILE, RunDir
from alpagasus_ray.llm_map import MAX_ASKS, Reply, Request, ask_all
from alpagasus_ray.progress import watch
from alpagasus_ray.ray_runtime import ensure_ray
from alpagasus_ray.records import RecordFile, append_by_test_set, content_digest, read_json, start_outputs

log = logging.getLogger(__name__)

CANDIDATE_FIRST, BASELINE_FIRST = "candidate_first", "baseline_first"
NO_ANSWER = "no_answer"  # a model has no answer to the prompt (its generation failed): not sent


def pair_name(candidate: str, baseline: str) -> str:
    return f"{candidate}_vs_{baseline}"


def run_judge(config: Config) -> dict:
    """Judge `judge.candidate` against `judge.baseline` on every common test set; returns the record.

    Raises:
        ConfigError: candidate or baseline missing, or the directory holds another judge's verdicts.
        InputError: an answers file cannot be read, or the two models answered different prompts.
    """
    started = time.time()
    cfg = config.judge
    default_candidate, default_baseline = answers_names(config)
    candidate, baseline = cfg.candidate or default_candidate, cfg.baseline or default_baseline
    if not baseline:
        raise ConfigError("judge.baseline must name answers (under <run_dir>/answers/ or a path), "
                          "or generate.baseline_model a model to answer")
    cand_dir, cand = _answers_dir(config.run_dir, candidate, "judge.candidate")
    base_dir, base = _answers_dir(config.run_dir, baseline, "judge.baseline")
    if cand == base:
        raise ConfigError(f"judge.candidate and judge.baseline are both called {cand!r}; give them different names")
    require_key(cfg, "judge")
    judge = f"{cfg.backend}:{cfg.model}"
    test_sets = cfg.test_sets or sorted(_answered_sets(cand_dir) & _answered_sets(base_dir))
    if not test_sets:
        raise InputError(f"{cand_dir} and {base_dir} have no test set answered by both (generate first)")
    out_dir = RunDir(config.run_dir).judgments(pair_name(cand, base))
    answers = [os.path.join(d, f"{ts}.jsonl") for d in (cand_dir, base_dir) for ts in test_sets]
    missing = [p for p in answers if not os.path.exists(p)]
    if missing:
        raise InputError(f"{missing[0]}: no answers for this test set (run alpagasus generate first)")
    if start_outputs(out_dir, {"answers": content_digest(answers)}):
        log.info("judge: the answers changed since %s was judged; judging them again", out_dir)
    files, tasks, order = {}, [], {}
    for ts in test_sets:
        files[ts] = RecordFile(os.path.join(out_dir, f"{ts}.jsonl"), key=lambda r: _key(r[C.ID], r["order"]))
        done = files[ts].read()
        _check_same_judge(done, judge, cfg.prompt, files[ts].path)
        every = _tasks(os.path.join(cand_dir, f"{ts}.jsonl"), os.path.join(base_dir, f"{ts}.jsonl"))
        order[ts] = {t["key"]: i for i, t in enumerate(every)}
        for task in every:
            old = done.get(task["key"])
            if old is None or not _final(old, cfg.retry_failed):
                tasks.append(task)
    meta = {"judge": judge, "prompt": cfg.prompt}
    unanswered = [t for t in tasks if t["missing"]]
    append_by_test_set(files, [_record(t, _no_answer(t), meta) for t in unanswered])
    to_send = [t for t in tasks if not t["missing"]]
    log.info("judge: %s vs %s on %s: %d judgments to ask %s", cand, base, ", ".join(test_sets), len(to_send), judge)
    if to_send:
        ensure_ray()
        by_key = {t["key"]: t for t in to_send}

        def save(results: list[dict]) -> None:
            append_by_test_set(files, [_record(by_key[r["key"]], r, meta) for r in results])

        rows = [{k: t[k] for k in ("key", "question", "first", "second")} for t in to_send]
        price = cfg.cost
        with watch("judge", total=len(rows), cost=price) as progress:
            ask_all(rows, VerdictTask(cfg), cfg, save, progress, batch_dir=os.path.join(out_dir, "batches"))
    counts, tokens = Counter(), Counter()
    for ts, f in files.items():
        records = f.read()
        f.rewrite(records[k] for k in sorted(records, key=lambda k: order[ts].get(k, len(order[ts]))))
        counts.update(r[C.STATUS] for r in records.values())
        for r in records.values():
            tokens.update({C.TOKENS_IN: r[C.TOKENS_IN] or 0, C.TOKENS_OUT: r[C.TOKENS_OUT] or 0})
    record = {"candidate": cand, "baseline": base, "candidate_answers": cand_dir, "baseline_answers": base_dir,
              "test_sets": test_sets, "judgments_by_status": dict(counts), "sent_this_run": len(to_send),
              "tokens_in": tokens[C.TOKENS_IN], "tokens_out": tokens[C.TOKENS_OUT],
              "cost_usd": cfg.cost(tokens[C.TOKENS_IN], tokens[C.TOKENS_OUT]),
              "wall_seconds": round(time.time() - started, 2), "config": config_for_record(config)["judge"], **meta}
    with open(os.path.join(out_dir, JUDGE_FILE), "w") as f:
        json.dump(record, f, indent=2)
    return record


def _answers_dir(run_dir: str, name_or_path: str, key: str) -> tuple[str, str]:
    """(directory, name) of a model's answers: a name under <run_dir>/answers/ or a directory."""
    inside = RunDir(run_dir).answers(name_or_path)
    path = inside if os.path.isdir(inside) else name_or_path
    if not os.path.isdir(path):
        raise InputError(f"{key}={name_or_path}: no answers in {inside} (run alpagasus generate first) or at that path")
    name = os.path.basename(os.path.normpath(path))
    return path, (read_json(os.path.join(path, GENERATION_FILE)) or {}).get("name", name)


def _answered_sets(path: str) -> set[str]:
    return {n[: -len(".jsonl")] for n in os.listdir(path) if n.endswith(".jsonl")}


def _key(prompt_id: str, order: str) -> str:
    return f"{prompt_id}|{order}"


def _tasks(cand_file: str, base_file: str) -> list[dict]:
    """Two judgments per prompt. The two files must answer the same prompts."""
    cand = {r[C.ID]: r for r in read_answers(cand_file)}
    base = {r[C.ID]: r for r in read_answers(base_file)}
    if cand.keys() != base.keys():
        only_c, only_b = sorted(cand.keys() - base.keys()), sorted(base.keys() - cand.keys())
        raise InputError(
            f"{cand_file} and {base_file} answer different prompts: {len(only_c)} ids only in the first "
            f"(e.g. {only_c[:5]}), {len(only_b)} only in the second (e.g. {only_b[:5]})"
        )
    tasks = []
    for pid, c in cand.items():
        b = base[pid]
        missing = c.get(C.STATUS) != C.OK or b.get(C.STATUS) != C.OK
        common = {C.ID: pid, "test_set": c["test_set"], "category": c.get("category"), "question": question(c),
                  "missing": missing}
        tasks.append({**common, "order": CANDIDATE_FIRST, "key": _key(pid, CANDIDATE_FIRST),
                      "first": c["answer"], "second": b["answer"]})
        tasks.append({**common, "order": BASELINE_FIRST, "key": _key(pid, BASELINE_FIRST),
                      "first": b["answer"], "second": c["answer"]})
    return tasks


def _final(record: dict, retry_failed: bool) -> bool:
    """Judgments not to ask again: all but a first unreadable reply (and failures on request)."""
    if record[C.STATUS] == C.PARSE_FAILED and record[C.ATTEMPTS] < MAX_ASKS:
        return False
    return not (retry_failed and record[C.STATUS] in (C.REQUEST_FAILED, NO_ANSWER))


def _check_same_judge(done: dict, judge: str, prompt: str, where: str) -> None:
    for record in done.values():
        if (record["judge"], record["prompt"]) != (judge, prompt):
            raise ConfigError(
                f"{where} already holds verdicts of judge {record['judge']!r} with prompt {record['prompt']!r}, "
                f"this run asks {judge!r} with {prompt!r}: use another run_dir (verdicts are never mixed)"
            )


def _no_answer(task: dict) -> dict:
    return {"key": task["key"], C.STATUS: NO_ANSWER, "outcome": None, "score_1": None, "score_2": None,
            C.REVIEW: "", C.ATTEMPTS: 0, C.ERROR: "a model has no answer to this prompt (its generation failed)",
            C.TOKENS_IN: 0, C.TOKENS_OUT: 0}


def _record(task: dict, result: dict, meta: dict) -> dict:
    """A judgment from the candidate's side: its outcome and its score beside the baseline's."""
    first_is_candidate = task["order"] == CANDIDATE_FIRST
    outcome = result["outcome"]
    scores = (result["score_1"], result["score_2"]) if first_is_candidate else (result["score_2"], result["score_1"])
    return {
        C.ID: task[C.ID], "test_set": task["test_set"], "category": task["category"], "order": task["order"],
        C.STATUS: result[C.STATUS], "outcome": outcome if outcome is None or first_is_candidate else flip(outcome),
        "score_candidate": scores[0], "score_baseline": scores[1], C.REVIEW: result[C.REVIEW] or "",
        C.ATTEMPTS: result[C.ATTEMPTS], C.ERROR: result[C.ERROR], C.TOKENS_IN: result[C.TOKENS_IN],
        C.TOKENS_OUT: result[C.TOKENS_OUT], **meta,
    }


# What a constrained judge may write: the verdict alone.
VERDICT_FORMATS = {"vicuna": {"regex": "([1-9]|10) ([1-9]|10)"}, "pair": {"choice": ["[[A]]", "[[B]]", "[[C]]"]}}


class VerdictTask:
    """The judge's prompt (App. C, or the pair prompt) and its reader, for the LLM layer. Scores
    are in the judge's own positions (1 = the answer shown first)."""

    fields = pa.schema([("outcome", pa.string()), ("score_1", pa.float64()), ("score_2", pa.float64()),
                        (C.REVIEW, pa.string())])
    chat = True
    engine_kwargs: dict = {}

    def __init__(self, cfg: JudgeConfig):
        self.cfg = cfg
        self.constraint = VERDICT_FORMATS[cfg.prompt] if cfg.backend == "vllm" and cfg.constrained else None

    def request(self, row: dict) -> Request:
        return Request(messages=judge_messages(row["question"], row["first"], row["second"], self.cfg.prompt),
                       max_tokens=self.cfg.max_tokens, constraint=self.constraint)

    def read(self, row: dict, reply: Reply) -> tuple[dict, str | None]:
        verdict = PARSERS[self.cfg.prompt](reply.text)
        scores = verdict.scores or (None, None)
        fields = {"outcome": verdict.outcome, "score_1": scores[0], "score_2": scores[1], C.REVIEW: reply.text}
        return fields, None if verdict.outcome else verdict.error
