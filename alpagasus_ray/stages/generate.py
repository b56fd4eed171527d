"""The generation stage: one model's answers to the test sets, for judging.

    alpagasus generate --config configs/paper_alpagasus_9k.yaml generate.limit=5

Loads the test sets (the paper's four are shipped; other files in their formats work too), builds
each prompt with the Alpaca template the model was trained with, and generates greedily, up to
`generate.max_tokens` tokens (the paper: 1024). With the vllm backend the engines are Ray Data
LLM actors, one per GPU (one CPU engine in tests); the answer is exactly the generated tokens,
which stop at the model's end-of-sequence token or at the cap, never a search in the text. With
the openai backend a reference system answers instead.

Writes `<run_dir>/answers/<name>/<test_set>.jsonl`, one line per prompt:
id, test_set, category, instruction, input, prompt, answer, model, finish_reason, status, error,
tokens_in, tokens_out; and `<run_dir>/answers/<name>/generation.json` (what it ran with). Each
finished batch of answers is saved by the worker where it finished, as a Parquet part under
`<run_dir>/answers/<name>/parts/`; a rerun generates only the missing ones. The JSONL files are
written whole from the parts at the end.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import time
from collections import Counter

import pyarrow as pa

from alpagasus_ray import columns as C
from alpagasus_ray.config import (
    OPERATIONAL,
    Config,
    ConfigError,
    GenerateConfig,
    config_for_record,
)
from alpagasus_ray.errors import InputError
from alpagasus_ray.llm import driver
from alpagasus_ray.llm.engines import engine_for
from alpagasus_ray.llm.results import PartResults
from alpagasus_ray.llm.task import Reply, Request, result_schema
from alpagasus_ray.progress import watch
from alpagasus_ray.ray_runtime import ensure_ray
from alpagasus_ray.rules.recipe import alpaca_follow_up, alpaca_prompt
from alpagasus_ray.store.layout import GENERATION_FILE, RunDir, join, trained_model_dir, write_json
from alpagasus_ray.store.parts import PartStore
from alpagasus_ray.store.rated import MESSAGES_TYPE
from alpagasus_ray.store.records import (
    file_stamps,
    read_jsonl,
    start_outputs,
    write_jsonl,
)
from alpagasus_ray.testsets import load_test_set
from alpagasus_ray.tiny_model import BUILTIN_MODEL

log = logging.getLogger(__name__)

STOP, ERROR = "stop", "error"


def run_generate(config: Config) -> list[dict]:
    """Answer every prompt of `config.generate.test_sets` with `generate.model`, then with
    `generate.baseline_model` if set; returns the record of each.

    Raises:
        InputError: a test set or a model cannot be read (nothing was generated for it).
    """
    cfg = config.generate
    models = [(candidate_model(config), answers_names(config)[0])]
    if cfg.baseline_model:
        models.append((cfg.baseline_model, answers_names(config)[1]))
    if len(models) == 2 and models[0][1] == models[1][1]:
        raise ConfigError(f"generate.model and generate.baseline_model are both called {models[0][1]!r}; set generate.baseline_name")
    return [_generate(config, model, name) for model, name in models]


def candidate_model(config: Config) -> str:
    """The model whose answers are judged: generate.model, or the run's trained model."""
    return config.generate.model or trained_model_dir(config.run_dir, config.train.model_dir)


def answers_names(config: Config) -> tuple[str, str | None]:
    """What the answers of generate.model and generate.baseline_model are called."""
    cfg = config.generate
    baseline = cfg.baseline_name or (answers_name(cfg.baseline_model) if cfg.baseline_model else None)
    return cfg.name or answers_name(candidate_model(config)), baseline


def _generate(config: Config, model: str, name: str) -> dict:
    started = time.time()
    cfg = config.generate
    endpoint = cfg.model_copy(update={"model": model})
    engine = engine_for(endpoint)
    engine.check("generate")
    prompts = _load_prompts(cfg)
    out_dir = RunDir(config.run_dir).answers(name)
    made_from = {"model": model, "model_files": file_stamps(glob.glob(os.path.join(model, "*"))) if os.path.isdir(model) else [],
                 "settings": {k: v for k, v in cfg.model_dump(mode="json").items() if k not in OPERATIONAL}}
    if start_outputs(out_dir, made_from):
        log.info("generate: %s changed since its answers in %s were made; generating them again", model, out_dir)
    task = AnswerTask(cfg)
    schema = pa.schema([*SENT, *result_schema(task)])
    store = PartStore(join(out_dir, PARTS), schema)
    results_of = PartResults(store, SENT.names, functools.partial(_stored, schema=schema))
    store.remove_unfinished()
    turns = sum(1 + len(p["follow_ups"]) for p in prompts)
    log.info("generate: %d prompts (%d turns) of %s for %s with %s", len(prompts), turns, ", ".join(cfg.test_sets),
             name, cfg.backend)
    record = {"name": name, "model": model, "backend": cfg.backend, "config": config_for_record(config)["generate"]}
    # Turn k of a prompt is asked once its turn k-1 is answered: its answer is in the context.
    sent = 0
    for turn in range(1, 1 + max(1 + len(p["follow_ups"]) for p in prompts)):
        results = {r[C.ID]: r for r in store.read().to_pylist()}
        rows = [_turn_row(p, turn, _history(p, turn, results), cfg.template)
                for p in prompts if len(p["follow_ups"]) + 1 >= turn]
        pending = [r for r in rows if r is not None and r[C.ID] not in results]
        again = cfg.retry_failed and store.ids_to_ask_again(retry_failed=True, reask=False)
        if pending or again or store.ids_to_ask_again(retry_failed=False, reask=True):
            ensure_ray()
            # The cap is the stage's: the answers of both models count as spent.
            engine.cap_spending([PartStore(join(RunDir(config.run_dir).answers(n), PARTS), schema)
                                 for n in answers_names(config) if n], "generate")
            label = f"generate {name}" + (f" turn {turn}" if turn > 1 else "")
            with watch(label, total=len(pending)) as progress:
                driver.ask(engine, task, rows_dataset(pending, SENT, cfg.batch_size),
                           results_of, progress=progress, retry_failed=cfg.retry_failed)
            sent += len(pending)
    results = {r[C.ID]: r for r in store.read().to_pylist()}
    answers = [a for p in prompts for a in _answer_records(p, results, name, cfg.template)]
    for ts in sorted({p["test_set"] for p in prompts}):
        write_jsonl(join(out_dir, f"{ts}.jsonl"), (a for a in answers if a["test_set"] == ts))
    record.update(_counts(prompts, answers), wall_seconds=round(time.time() - started, 2), generated_this_run=sent)
    write_json(join(out_dir, GENERATION_FILE), record)
    return record


def _stored(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    """Answers as the store holds them (a row that went through an engine as JSON comes back with
    its turns' fields in another order)."""
    columns = {name: batch[name] for name in batch.column_names}
    columns[C.MESSAGES] = pa.array(batch[C.MESSAGES].to_pylist(), MESSAGES_TYPE)
    return pa.table({f.name: columns[f.name] for f in schema}, schema=schema)


def turn_key(prompt_id: str, turn: int) -> str:
    """The id under which turn `turn` (1-based) of a prompt is answered: the prompt's own for the
    first, so the answers of single-turn prompts keep their ids."""
    return prompt_id if turn == 1 else f"{prompt_id}#turn{turn}"


def user_turns(prompt: dict) -> list[str]:
    """The user turns of a prompt as a chat model is asked them (the first with its input)."""
    return [question(prompt), *prompt["follow_ups"]]


def _history(prompt: dict, turn: int, results: dict) -> list[dict] | None:
    """The conversation before turn `turn`'s question, with the model's own earlier answers;
    None when an earlier turn has no answer."""
    history = [{"role": "system", "content": prompt["system"]}] if prompt["system"] else []
    users = user_turns(prompt)
    for earlier in range(1, turn):
        result = results.get(turn_key(prompt[C.ID], earlier))
        if result is None or result[C.STATUS] != C.OK:
            return None
        history += [{"role": "user", "content": users[earlier - 1]},
                    {"role": "assistant", "content": result["answer"] or ""}]
    return history


def _turn_row(prompt: dict, turn: int, history: list[dict] | None, template: str) -> dict | None:
    """What turn `turn` of a prompt is sent with, after `history` (`_history`); None while an
    earlier turn has no answer."""
    if history is None:
        return None
    if template == "chat":
        messages = [*history, {"role": "user", "content": user_turns(prompt)[turn - 1]}]
        return {C.ID: turn_key(prompt[C.ID], turn), "prompt": None, C.MESSAGES: messages}
    # The Alpaca template has no system turn and no turns: each answer follows its "### Response:",
    # each later question comes as a new "### Instruction:" block.
    answers = [m["content"] for m in history if m["role"] == "assistant"]
    text = alpaca_prompt(prompt["instruction"], prompt["input"])
    for answer, follow_up in zip(answers, prompt["follow_ups"]):
        text += answer + alpaca_follow_up(follow_up)
    return {C.ID: turn_key(prompt[C.ID], turn), "prompt": text, C.MESSAGES: None}


def rows_dataset(rows: list[dict], schema: pa.Schema, batch_size: int):
    """A few rows (a small stage's) as a Ray Dataset in blocks of one batch; None for none."""
    import ray

    if not rows:
        return None
    table = pa.Table.from_pylist(rows, schema=schema)
    return ray.data.from_arrow([table.slice(i, batch_size) for i in range(0, table.num_rows, batch_size)])


def answers_name(model: str) -> str:
    """What answers of `model` are called by default: its directory's name, or the run's name
    when it is a run's trained model (<run_dir>/model).

    >>> answers_name("runs/alpagasus-9k/model"), answers_name("/models/llama-7b/"), answers_name("gpt-4o")
    ('alpagasus-9k', 'llama-7b', 'gpt-4o')
    """
    if model == BUILTIN_MODEL:
        return "tiny-llama"
    parts = [p for p in model.replace("\\", "/").split("/") if p]
    if len(parts) >= 2 and parts[-1] == "model":
        return parts[-2]
    return parts[-1] if parts else "model"


def _load_prompts(cfg: GenerateConfig) -> list[dict]:
    prompts, seen = [], {}
    for name in cfg.test_sets:
        for p in load_test_set(name, cfg.limit):
            for turn in range(1, 2 + len(p["follow_ups"])):
                key = turn_key(p[C.ID], turn)
                if key in seen:
                    raise InputError(f"{name}: id {key!r} is also in {seen[key]}; ids must be unique across test sets")
                seen[key] = name
            prompts.append(p)
    return prompts


def question(prompt: dict) -> str:
    """The question as a person would ask it: the instruction, then the input if there is one.

    >>> question({"instruction": "Translate.", "input": "Bonjour"})
    'Translate.\\n\\nBonjour'
    """
    extra = (prompt.get("input") or "").strip()
    return f"{prompt['instruction']}\n\n{extra}" if extra else prompt["instruction"]


# The answer record as the judge reads it, whoever wrote it. Optional fields: `input` (default ""),
# `category`, `status` (default "ok"; any other value means the model has no answer to the
# prompt, which is then not judged), and for a turn after the first of a multi-turn prompt `turn`
# (default 1) and `history` (the conversation before the turn's question, with the model's own
# earlier answers). Other fields are kept but not read.
ANSWER_REQUIRED = {C.ID: (str, int), "test_set": (str,), C.INSTRUCTION: (str,), "answer": (str,)}
ANSWER_OPTIONAL = {C.INPUT: (str,), "category": (str, int), C.STATUS: (str,), "turn": (int,), "history": (list,)}


def read_answers(path: str) -> list[dict]:
    """The answer records of one test set's file, checked before anything is sent.

    Raises:
        InputError: naming the file, the line and the field, for a line that is not JSON or not an
            object, a missing or mistyped field, a record of another test set, or a repeated id.
    """
    expected_set = path.rstrip("/").rsplit("/", 1)[-1].removesuffix(".jsonl")
    records, seen = [], {}
    for lineno, record in read_jsonl(path, with_lines=True):
        where = f"{path}:{lineno}"
        if not isinstance(record, dict):
            raise InputError(f"{where}: an answer record is a JSON object, got {type(record).__name__}")
        for field, types in {**ANSWER_REQUIRED, **ANSWER_OPTIONAL}.items():
            value = record.get(field)
            if field not in record and field in ANSWER_REQUIRED:
                raise InputError(f"{where}: missing field {field!r} (required: {', '.join(ANSWER_REQUIRED)})")
            if (value is not None or field in ANSWER_REQUIRED) and not isinstance(value, types):
                raise InputError(f"{where}: field {field!r} is {type(value).__name__}, expected "
                                 + " or ".join(t.__name__ for t in types))
        if record["test_set"] != expected_set:
            raise InputError(f"{where}: an answer of test set {record['test_set']!r} in {expected_set}.jsonl")
        key, turn = str(record[C.ID]), record.get("turn") or 1
        if (key, turn) in seen:
            of = f" turn {turn}" if turn > 1 else ""
            raise InputError(f"{where}: id {key!r}{of} again (first at line {seen[key, turn]})")
        seen[key, turn] = lineno
        history = record.get("history") or []
        answered = (record.get(C.STATUS) or C.OK) == C.OK
        if turn < 1 or (turn > 1 and answered and not _is_history(history, turn)):
            raise InputError(f"{where}: turn {turn} needs a 'history' of the {turn - 1} exchanges before it "
                             "(a list of {role, content}: an optional system turn, then user and assistant turns)")
        records.append({**record, C.ID: key, C.INPUT: record.get(C.INPUT) or "", C.STATUS: record.get(C.STATUS) or C.OK,
                        "turn": turn, "history": history})
    return records


def _is_history(history: list, turn: int) -> bool:
    turns = history[1:] if history and isinstance(history[0], dict) and history[0].get("role") == "system" else history
    roles = [t.get("role") if isinstance(t, dict) and isinstance(t.get("content"), str) else None for t in turns]
    return roles == ["user", "assistant"] * (turn - 1)


def _answer_records(prompt: dict, results: dict, name: str, template: str) -> list[dict]:
    """One record per turn of a prompt; a turn after one with no answer has none either."""
    records = []
    for turn, user in enumerate([prompt[C.INSTRUCTION], *prompt["follow_ups"]], start=1):
        result = results.get(turn_key(prompt[C.ID], turn))
        if result is None and (not records or records[-1][C.STATUS] == C.OK):
            raise RuntimeError(f"prompts in != answers out: no answer to {turn_key(prompt[C.ID], turn)}")
        ok = result is not None and result[C.STATUS] == C.OK
        error = result[C.ERROR] if result is not None else f"turn {turn - 1} has no answer, so this turn was not asked"
        history = _history(prompt, turn, results)
        row = _turn_row(prompt, turn, history, template) or {}
        records.append({
            C.ID: prompt[C.ID], "test_set": prompt["test_set"], "category": prompt["category"], "turn": turn,
            "turns": 1 + len(prompt["follow_ups"]), C.INSTRUCTION: user, C.INPUT: prompt[C.INPUT] if turn == 1 else "",
            "history": history or [],
            "prompt": row.get("prompt") or (row[C.MESSAGES][-1]["content"] if row.get(C.MESSAGES) else ""),
            "answer": (result or {}).get("answer") or "", "model": name,
            "finish_reason": result["finish_reason"] if ok else ERROR, C.STATUS: C.OK if ok else C.REQUEST_FAILED,
            C.ERROR: error, C.TOKENS_IN: (result or {}).get(C.TOKENS_IN), C.TOKENS_OUT: (result or {}).get(C.TOKENS_OUT),
        })
    return records


def _counts(prompts: list[dict], answers: list[dict]) -> dict:
    return {
        "prompts": len(prompts),
        "turns": len(answers),
        "by_test_set": dict(Counter(p["test_set"] for p in prompts)),
        "by_finish_reason": dict(Counter(a["finish_reason"] for a in answers)),
        "tokens_in": sum(a[C.TOKENS_IN] or 0 for a in answers),
        "tokens_out": sum(a[C.TOKENS_OUT] or 0 for a in answers),
    }


# What a prompt is sent with, and where its answers are kept until the JSONL files are written.
SENT = pa.schema([(C.ID, pa.string()), ("prompt", pa.string()), (C.MESSAGES, MESSAGES_TYPE)])
PARTS = "parts"


class AnswerTask:
    """A model's answer to a prompt's turn, for the LLM layer: greedy, up to `generate.max_tokens`,
    with the Alpaca prompt as plain text (no chat template) or the conversation so far as chat
    messages."""

    fields = pa.schema([("answer", pa.string()), ("finish_reason", pa.string())])

    def __init__(self, cfg: GenerateConfig):
        self.cfg = cfg
        self.chat = cfg.template == "chat"

    def request(self, row: dict) -> Request:
        if self.chat:
            return Request(messages=row[C.MESSAGES], max_tokens=self.cfg.max_tokens)
        return Request(prompt=row["prompt"], max_tokens=self.cfg.max_tokens)

    def read(self, row: dict, reply: Reply) -> tuple[dict, str | None]:
        return {"answer": reply.text.strip(), "finish_reason": reply.finish_reason or STOP}, None
