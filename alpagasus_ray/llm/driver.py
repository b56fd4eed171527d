"""The one driver of the LLM layer: every stage's rows go through the same passes.

    running = ask(engine, task, rows, results, progress=p, retry_failed=cfg.retry_failed)

1. the first pass sends the new rows (a Ray Dataset; None to only finish what an earlier run
   left, e.g. batches still running);
2. with `retry_failed`, the rows whose request failed are sent again;
3. the rows whose reply could not be read on their first ask are asked once more, sampled (an
   API engine asks again inside the request, so it leaves none).
Each pass is one `engine.ask`; an engine that sends request files may return what is still
running (`detach`), and the driver stops there: the same command taken up again goes on.
"""

from __future__ import annotations

import logging

from alpagasus_ray.llm.engines.base import Engine
from alpagasus_ray.llm.task import FIRST, MAX_ASKS, REASK, RETRY, LLMTask, Results

log = logging.getLogger(__name__)


def ask(engine: Engine, task: LLMTask, rows, results: Results, *, progress=None, retry_failed: bool = False,
        detach: bool = False) -> list:
    """Ask `rows` and then the failures again (see the module docstring); returns what is still
    running (only with `detach`)."""
    import ray

    running = engine.ask(rows, task, results, attempt=1, round=FIRST, progress=progress, detach=detach)
    for round in ((RETRY,) if retry_failed else ()) + (REASK,):
        if running:
            return running
        ids = results.ids_to_ask_again(retry_failed=round == RETRY, reask=round == REASK)
        if not ids:
            continue
        log.info("asking again for %s rows %s", f"{len(ids):,}",
                 "whose request failed" if round == RETRY else "whose reply could not be read")
        size = engine.cfg.batch_size
        again = ray.data.from_arrow([t.slice(i, size) for t in results.rows(ids) for i in range(0, t.num_rows, size)])
        running = engine.ask(again, task, results, attempt=MAX_ASKS if round == REASK else 1, round=round,
                             progress=progress.again() if progress is not None else None, detach=detach)
    return running
