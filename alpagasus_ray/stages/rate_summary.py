"""What the rating stage reports: the estimate of a dry run (`dry_run_report`), before anything is
sent, and the summary of a finished run (`summarize`), counted by one streaming scan of the parts."""

from __future__ import annotations

import math
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from alpagasus_ray import columns as C
from alpagasus_ray.config import RateConfig
from alpagasus_ray.llm.context import Context
from alpagasus_ray.llm.engines import Engine
from alpagasus_ray.rules.budget import FORMAT_TOKENS, FORMAT_TOKENS_PER_MESSAGE
from alpagasus_ray.rules.prompts import CHARS_PER_TOKEN, PROMPT_VERSION
from alpagasus_ray.store.inputs import InputScan
from alpagasus_ray.store.parts import token_sums, value_counts
from alpagasus_ray.store.rated import RatedStore

# Bytes of a rating request line besides the prompt's text: custom_id, url, model, sampling fields.
REQUEST_LINE_OVERHEAD = 300
# Messages of a rating request: the system message with the row, the user message with the question.
RATING_MESSAGES = 2


def dry_run_report(scan: InputScan, cfg: RateConfig, engine: Engine, to_send: int, bytes_per_request: float,
                   fixed: int, context: Context | None = None, spent: tuple[int, int] = (0, 0)) -> dict:
    """What rating would send: `to_send` requests (one per row, or per assistant turn), each with
    `bytes_per_request` bytes of text on average and the prompt's own `fixed` bytes; the rows too
    long for the grader's `context` are among those set aside. `spent` is the usage earlier runs
    saved (tokens in, out), which a spending cap counts."""
    text_bytes = bytes_per_request * to_send
    prompt_tokens = math.ceil((text_bytes + fixed * to_send) / CHARS_PER_TOKEN)
    report = {
        "rows_in": scan.rows,
        "invalid_input": scan.invalid - scan.too_long,
        "too_long": scan.too_long,
        "context": context_record(context),
        "to_send": to_send,
        "prompt_tokens_estimate": prompt_tokens,
        "completion_tokens_at_most": to_send * cfg.max_tokens,
        "cost_usd_at_most": engine.cost(prompt_tokens, to_send * cfg.max_tokens),
    }
    if scan.conversations:
        report["assistant_turns"] = scan.turns
        report["requests_per"] = cfg.unit
    if engine.sends_files:
        # A request line is the prompt's text as JSON plus the body's other fields.
        request_bytes = text_bytes + (fixed + REQUEST_LINE_OVERHEAD) * to_send
        report["request_files"] = max(math.ceil(to_send / cfg.batch_max_requests),
                                      math.ceil(request_bytes / cfg.batch_max_bytes))
        report["request_bytes_estimate"] = math.ceil(request_bytes)
        report["cost_usd_at_most_synchronous"] = engine.cost(prompt_tokens, to_send * cfg.max_tokens, full_price=True)
    cap = getattr(cfg, "max_cost_usd", None)
    if cap is not None:
        # As the cap counts a request before it is sent: a token a byte, and the chat format's own.
        worst_prompt = text_bytes + to_send * (fixed + RATING_MESSAGES * FORMAT_TOKENS_PER_MESSAGE + FORMAT_TOKENS)
        spent_usd = engine.cost(*spent)
        worst = engine.cost(math.ceil(worst_prompt), to_send * cfg.max_tokens)
        report["budget"] = {"max_cost_usd": cap, "spent_usd": spent_usd, "worst_case_usd": worst,
                            "covers": spent_usd + worst <= cap}
    return report


def context_record(context: Context | None) -> dict | None:
    """What a summary says of the grader's context: its tokens, the key that set it, how counted."""
    if context is None:
        return None
    return {"tokens": context.tokens, "key": f"rate.{context.key}", "counted_by": context.counted_by}


def summarize(scan: InputScan, store: RatedStore, cfg: RateConfig, engine: Engine, seconds: float, sent: int,
              prompt_version: str = PROMPT_VERSION, context: Context | None = None) -> dict:
    """The summary, counted by one streaming scan of the parts."""
    statuses, scores, tokens, suspects, rows = Counter(), Counter(), Counter(), Counter(), 0
    not_ok, suspect_examples = [], []
    for batch in store.batches([C.ID, C.STATUS, C.SCORE, C.TOKENS_IN, C.TOKENS_OUT, C.SOURCE, C.ERROR, C.SUSPECT]):
        table = pa.Table.from_batches([batch])
        rows += table.num_rows
        flagged = table.filter(pc.is_valid(table[C.SUSPECT]))
        suspects.update(value_counts(flagged[C.SUSPECT]))
        if len(suspect_examples) < 20:
            suspect_examples += flagged.select([C.ID, C.SOURCE, C.SUSPECT]).slice(0, 20 - len(suspect_examples)).to_pylist()
        statuses.update(value_counts(table[C.STATUS]))
        ok = pc.equal(table[C.STATUS], C.OK)
        scores.update(value_counts(table.filter(ok)[C.SCORE]))
        tokens.update(dict(zip((C.TOKENS_IN, C.TOKENS_OUT), token_sums(table))))
        if len(not_ok) < 20:
            not_ok += table.filter(pc.invert(ok)).slice(0, 20 - len(not_ok)).to_pylist()
    if rows != scan.rows:
        raise RuntimeError(f"rows in != rows out: {scan.rows:,} rows in the input, {rows:,} rated rows in {store.uri}")
    return {
        "rows_in": scan.rows,
        "rows_out": rows,
        "by_status": {s: statuses.get(s, 0) for s in C.STATUSES},
        "context": context_record(context),
        "grader": engine.name,
        "dimension": cfg.dimension,
        "prompt_version": prompt_version,
        "tokens_in": tokens[C.TOKENS_IN],
        "tokens_out": tokens[C.TOKENS_OUT],
        "cost_usd": engine.cost(tokens[C.TOKENS_IN], tokens[C.TOKENS_OUT]),
        "wall_seconds": round(seconds, 2),
        "rows_sent_this_run": sent,
        "score_histogram": {f"{k:g}": v for k, v in sorted(scores.items())},
        "suspect_injection": {"rows": sum(suspects.values()), "by_pattern": dict(suspects.most_common()),
                              "examples": [{"id": r[C.ID], "source": r[C.SOURCE], "pattern": r[C.SUSPECT]}
                                           for r in suspect_examples]},
        "duplicate_ids": {"count": len(scan.repeats), "examples": scan.repeat_sources},
        "not_ok_examples": [{"id": r[C.ID], "status": r[C.STATUS], "source": r[C.SOURCE], "error": r[C.ERROR]}
                            for r in not_ok],
        "input_files": scan.files,
    }
