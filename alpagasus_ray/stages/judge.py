"""The judging stage: an LLM judge compares two models' answers, each prompt in both orders.

    alpagasus judge --config configs/paper_alpagasus_9k.yaml judge.candidate=alpagasus-9k judge.baseline=runs/alpaca-52k/answers/alpaca-52k

For every prompt (and every turn of a multi-turn prompt) answered by both models the judge is
asked twice, candidate first and then baseline first, with the paper's App. C prompt (`judge.prompt=vicuna`: two scores 1-10) or the
FastChat pair prompt (`pair`: a verdict [[A]]/[[B]]/[[C]]); a later turn is judged with each
model's own conversation up to its answer, the answer to the last question judged. A reply that cannot be read is asked
once more, then kept as parse_failed: it is never a score. The judge runs on the same backends as
rating (an OpenAI-compatible API under concurrency and rate limits, or vLLM engines on Ray Data).

Writes `<run_dir>/judgments/<candidate>_vs_<baseline>/<test_set>.jsonl`, one line per judgment
(two per prompt and turn), each from the candidate's side: id, turn, test_set, category, order, status, outcome,
score_candidate, score_baseline, review, attempts, error, tokens, judge, prompt. Judgments are
saved by the worker where each batch finished, as Parquet parts under `parts/` beside them; a rerun
asks only for the missing ones, and the JSONL files are written whole from the parts at the end.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import Counter

import pyarrow as pa

from alpagasus_ray import columns as C
from alpagasus_ray.config import Config, ConfigError, JudgeConfig, config_for_record
from alpagasus_ray.errors import InputError
from alpagasus_ray.llm import driver
from alpagasus_ray.llm.engines import Engine, engine_for
from alpagasus_ray.llm.results import PartResults
from alpagasus_ray.llm.task import Reply, Request, result_schema
from alpagasus_ray.progress import watch
from alpagasus_ray.ray_runtime import ensure_ray
from alpagasus_ray.rules.judging import PARSERS, flip, judge_messages, judge_turn_messages
from alpagasus_ray.stages.generate import (
    answers_names,
    question,
    read_answers,
    rows_dataset,
    turn_key,
)
from alpagasus_ray.store.layout import (
    GENERATION_FILE, JUDGE_FILE, RunDir, exists, is_dir, join, list_dir, read_json, write_json,
)
from alpagasus_ray.store.parts import PartStore
from alpagasus_ray.store.records import content_digest, start_outputs, write_jsonl

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
    out_dir = RunDir(config.run_dir).judgments(pair_name(cand, base))
    engine = engine_for(cfg, join(out_dir, "batches"))
    engine.check("judge")
    judge = engine.name
    test_sets = cfg.test_sets or sorted(_answered_sets(cand_dir) & _answered_sets(base_dir))
    if not test_sets:
        raise InputError(f"{cand_dir} and {base_dir} have no test set answered by both (generate first)")
    answers = [join(d, f"{ts}.jsonl") for d in (cand_dir, base_dir) for ts in test_sets]
    missing = [p for p in answers if not exists(p)]
    if missing:
        raise InputError(f"{missing[0]}: no answers for this test set (run alpagasus generate first)")
    if start_outputs(out_dir, {"answers": content_digest(answers)}):
        log.info("judge: the answers changed since %s was judged; judging them again", out_dir)
    meta = {"judge": judge, "prompt": cfg.prompt}
    task = VerdictTask(cfg, engine)
    store = PartStore(join(out_dir, PARTS), pa.schema([*SENT, *result_schema(task), *META]))
    store.remove_unfinished()
    _check_same_judge(store, judge, cfg.prompt, out_dir)
    tasks = []
    for ts in test_sets:
        tasks += _tasks(join(cand_dir, f"{ts}.jsonl"), join(base_dir, f"{ts}.jsonl"))
    done = set(store.read()[C.ID].to_pylist())
    to_send = [t for t in tasks if not t["missing"] and t["key"] not in done]
    log.info("judge: %s vs %s on %s: %d judgments to ask %s", cand, base, ", ".join(test_sets), len(to_send), judge)
    again = (cfg.retry_failed and store.ids_to_ask_again(retry_failed=True, reask=False)) or \
        store.ids_to_ask_again(retry_failed=False, reask=True)
    if to_send or again:
        ensure_ray()
        engine.cap_spending([store], "judge")
        rows = [{C.ID: t["key"], **{k: t[k] for k in ("question", "first", "second", "turn")}} for t in to_send]
        with watch("judge", total=len(rows), cost=engine.cost) as progress:
            driver.ask(engine, task, rows_dataset(rows, SENT, cfg.batch_size),
                       PartResults(store, SENT.names, functools.partial(_with_meta, meta=meta)), progress=progress,
                       retry_failed=cfg.retry_failed)
    results = {r[C.ID]: r for r in store.read().to_pylist()}
    counts, tokens, records = Counter(), Counter(), {}
    for t in tasks:
        result = _no_answer(t) if t["missing"] else results.get(t["key"])
        if result is None:
            raise RuntimeError(f"judgments asked != verdicts out: no verdict for {t['key']}")
        record = records.setdefault(t["test_set"], [])
        record.append(_record(t, result, meta))
        counts[result[C.STATUS]] += 1
        tokens.update({C.TOKENS_IN: result[C.TOKENS_IN] or 0, C.TOKENS_OUT: result[C.TOKENS_OUT] or 0})
    for ts in test_sets:
        write_jsonl(join(out_dir, f"{ts}.jsonl"), records.get(ts, []))
    record = {"candidate": cand, "baseline": base, "candidate_answers": cand_dir, "baseline_answers": base_dir,
              "test_sets": test_sets, "judgments_by_status": dict(counts), "sent_this_run": len(to_send),
              "tokens_in": tokens[C.TOKENS_IN], "tokens_out": tokens[C.TOKENS_OUT],
              "cost_usd": engine.cost(tokens[C.TOKENS_IN], tokens[C.TOKENS_OUT]),
              "wall_seconds": round(time.time() - started, 2), "config": config_for_record(config)["judge"], **meta}
    write_json(join(out_dir, JUDGE_FILE), record)
    return record


# What a judgment is sent with (its id is `<prompt id>|<order>`, or `<prompt id>#turn<k>|<order>`
# for a later turn, whose `first` and `second` are the two conversations as JSON), and the judge
# beside each verdict.
SENT = pa.schema([(C.ID, pa.string()), ("question", pa.string()), ("first", pa.string()), ("second", pa.string()),
                  ("turn", pa.int32())])
META = pa.schema([("judge", pa.string()), ("prompt", pa.string())])
PARTS = "parts"


def _with_meta(batch: pa.Table, meta: dict) -> pa.Table:
    for name, value in meta.items():
        batch = batch.append_column(name, pa.array([value] * batch.num_rows, pa.string()))
    return batch


def _answers_dir(run_dir: str, name_or_path: str, key: str) -> tuple[str, str]:
    """(directory, name) of a model's answers: a name under <run_dir>/answers/ or a directory."""
    inside = RunDir(run_dir).answers(name_or_path)
    path = inside if is_dir(inside) else name_or_path
    if not is_dir(path):
        raise InputError(f"{key}={name_or_path}: no answers in {inside} (run alpagasus generate first) or at that path")
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return path, (read_json(join(path, GENERATION_FILE)) or {}).get("name", name)


def _answered_sets(path: str) -> set[str]:
    return {n[: -len(".jsonl")] for n in list_dir(path) if n.endswith(".jsonl")}


def _key(prompt_id: str, order: str) -> str:
    return f"{prompt_id}|{order}"


def _tasks(cand_file: str, base_file: str) -> list[dict]:
    """Two judgments per prompt and turn. The two files must answer the same prompts and turns."""
    cand = {turn_key(r[C.ID], r["turn"]): r for r in read_answers(cand_file)}
    base = {turn_key(r[C.ID], r["turn"]): r for r in read_answers(base_file)}
    if cand.keys() != base.keys():
        only_c, only_b = sorted(cand.keys() - base.keys()), sorted(base.keys() - cand.keys())
        raise InputError(
            f"{cand_file} and {base_file} answer different prompts: {len(only_c)} ids only in the first "
            f"(e.g. {only_c[:5]}), {len(only_b)} only in the second (e.g. {only_b[:5]})"
        )
    tasks = []
    for key, c in cand.items():
        b = base[key]
        if c[C.INSTRUCTION] != b[C.INSTRUCTION]:
            raise InputError(f"{cand_file} and {base_file} ask {key} different questions")
        missing = c.get(C.STATUS) != C.OK or b.get(C.STATUS) != C.OK
        common = {C.ID: c[C.ID], "turn": c["turn"], "test_set": c["test_set"], "category": c.get("category"),
                  "missing": missing}
        if c["turn"] == 1:
            common["question"] = question(c)
            answers = c["answer"], b["answer"]
        else:  # each model's own conversation up to its answer to this turn's question
            common["question"] = c[C.INSTRUCTION]
            answers = tuple(json.dumps(_conversation(r)) for r in (c, b))
        tasks.append({**common, "order": CANDIDATE_FIRST, "key": _key(key, CANDIDATE_FIRST),
                      "first": answers[0], "second": answers[1]})
        tasks.append({**common, "order": BASELINE_FIRST, "key": _key(key, BASELINE_FIRST),
                      "first": answers[1], "second": answers[0]})
    return tasks


def _conversation(answer: dict) -> list[dict]:
    """A later turn's answer in its conversation (the system turn is not shown to the judge)."""
    turns = [t for t in answer["history"] if t["role"] != "system"]
    return [*({"role": t["role"], "content": t["content"]} for t in turns),
            {"role": "user", "content": answer[C.INSTRUCTION]}, {"role": "assistant", "content": answer["answer"]}]


def _check_same_judge(store: PartStore, judge: str, prompt: str, where: str) -> None:
    for column, wanted in (("judge", judge), ("prompt", prompt)):
        found = store.values(column) - {wanted}
        if found:
            raise ConfigError(
                f"{where} already holds verdicts of {column} {sorted(found)[0]!r}, this run asks {judge!r} with "
                f"{prompt!r}: use another run_dir (verdicts are never mixed)"
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
        C.ID: task[C.ID], "turn": task["turn"], "test_set": task["test_set"], "category": task["category"],
        "order": task["order"],
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

    def __init__(self, cfg: JudgeConfig, engine: Engine):
        self.cfg = cfg
        self.constraint = VERDICT_FORMATS[cfg.prompt] if engine.constrains and cfg.constrained else None

    def request(self, row: dict) -> Request:
        if (row.get("turn") or 1) > 1:
            messages = judge_turn_messages(json.loads(row["first"]), json.loads(row["second"]), self.cfg.prompt)
        else:
            messages = judge_messages(row["question"], row["first"], row["second"], self.cfg.prompt)
        return Request(messages=messages, max_tokens=self.cfg.max_tokens, constraint=self.constraint)

    def read(self, row: dict, reply: Reply) -> tuple[dict, str | None]:
        verdict = PARSERS[self.cfg.prompt](reply.text)
        scores = verdict.scores or (None, None)
        fields = {"outcome": verdict.outcome, "score_1": scores[0], "score_2": scores[1], C.REVIEW: reply.text}
        return fields, None if verdict.outcome else verdict.error
