"""The `vllm_batch` engine: request files run by vLLM's batch runner (`run_batch`) on this machine.

The same request files as the Batch API's; the runner writes an output file that the same
collector reads (`files.FileEngine`). A run ends before `submit` returns.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Iterator

from alpagasus_ray.errors import ConfigError
from alpagasus_ray.llm.context import engine_context
from alpagasus_ray.llm.engines.files import BatchRecord, FileEngine
from alpagasus_ray.store.layout import is_local

log = logging.getLogger(__name__)


class VllmBatchEngine(FileEngine):
    """vLLM's batch runner in a subprocess: a request file in, an output file out."""

    def __init__(self, endpoint, workdir: str | None = None):
        if workdir is not None and not is_local(workdir):
            raise ConfigError(f"backend vllm_batch runs request files on this machine: {workdir} must be a local path "
                              "(use a local run_dir, or the vllm backend)")
        super().__init__(endpoint, workdir)

    def check(self, section: str) -> None:
        from alpagasus_ray.tiny_model import check_model_dir

        check_model_dir(self.cfg.model)

    def context(self):
        return engine_context(self.cfg)

    def submit(self, record: BatchRecord) -> None:
        from alpagasus_ray.llm.engines.vllm import engine_env
        from alpagasus_ray.tiny_model import resolve_model

        cfg, store = self.cfg, self.store
        output = store.file(f"{record.name}.output.jsonl")
        command = [sys.executable, "-m", "vllm.entrypoints.openai.run_batch",
                   "-i", store.file(f"{record.name}.requests.jsonl"), "-o", f"{output}.part",
                   "--model", resolve_model(cfg.model), "--served-model-name", cfg.model,
                   "--max-model-len", str(cfg.max_model_len)]
        if not cfg.use_gpu:
            command += ["--dtype", "float32", "--enforce-eager"]
        for key, value in cfg.engine_kwargs.items():
            command += [f"--{key.replace('_', '-')}", str(value)]
        record.status = "in_progress"
        store.save(record)
        log.info("vllm_batch: running request file %s (%d rows)", record.name, record.rows)
        messages = store.file(f"{record.name}.vllm.log")
        with open(messages, "wb") as out:
            done = subprocess.run(command, env={**os.environ, **engine_env(cfg)}, stdout=out, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            with open(messages, "rb") as f:
                tail = f.read().decode(errors="replace").strip().splitlines()[-3:]
            record.status = "failed"
            record.errors = [f"vllm run_batch exit {done.returncode} (see {messages}): {' | '.join(tail)}"]
        else:
            os.replace(f"{output}.part", output)
            record.status, record.output_file_id = "completed", os.path.basename(output)
        store.save(record)

    def refresh(self, record: BatchRecord) -> None:
        pass  # a run ends before `submit` returns

    def cancel_batch(self, record: BatchRecord) -> None:
        pass

    def lines(self, record: BatchRecord) -> Iterator[bytes]:
        if record.output_file_id:
            with open(self.store.file(record.output_file_id), "rb") as f:
                yield from f
