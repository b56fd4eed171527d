"""Every path under a run directory: the one module that knows its layout.

    <run_dir>/
      rated/                         rated rows, Parquet parts                  rate
      rated_turns/                   rated assistant turns (rate.unit=turn)     rate
      rated_summary.json             counts, tokens, cost, score histogram      rate
      rate_config.json               the config the rating ran with             rate
      batches/                       request files and their batches' records   rate (batch backends)
      selected.json, .jsonl          the training rows (Alpaca format)          filter
      selection.json                 what was selected, how and the counts      filter
      plots/                         PNGs                                       filter, report
      model/                         the fine-tuned model (Hugging Face)        train
      train_log.jsonl                metrics per step                           train
      checkpoints/, tensorboard/     (default places)                           train
      answers/<name>/<set>.jsonl     a model's answers, + generation.json       generate
      judgments/<pair>/<set>.jsonl   verdicts, + judge.json (+ batches/)        judge
      report.json, report.md                                                    report
      stages/<stage>.json            stage fingerprints                         run
      run_config.json                the config of the last `alpagasus run`     run
      logs/                          libraries' and workers' messages           every command

An answers or judgments directory also holds `inputs.json`: what its records were made from.
The rating stage's paths may be on any filesystem pyarrow opens (a local disk, a shared mount,
s3://, gs://); the other stages write to a local or mounted run directory.
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs

from alpagasus_ray.errors import ConfigError

# Files inside an answers directory and a judgments directory (also read from other runs).
GENERATION_FILE = "generation.json"
JUDGE_FILE = "judge.json"
INPUTS_FILE = "inputs.json"


def open_filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a local path or a URI such as s3://bucket/run."""
    path = os.fspath(path)
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def is_local(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    return "://" not in path or path.startswith("file://")


# A file being written under this prefix is not whole yet (a kill may leave one; readers skip it).
STAGING_PREFIX = ".tmp-"


def staging_path(fs: pafs.FileSystem, path: str) -> str:
    """Where to write `path` so that readers see it whole or not at all (then `publish` it): a
    temporary name beside it on a local disk; `path` itself on an object store, which shows an
    object only once it is closed."""
    if not isinstance(fs, pafs.LocalFileSystem):
        return path
    directory, name = os.path.split(path)
    return os.path.join(directory, STAGING_PREFIX + name)


def publish(fs: pafs.FileSystem, path: str) -> None:
    """Give the whole file written at `staging_path(fs, path)` its name."""
    if isinstance(fs, pafs.LocalFileSystem):
        os.replace(staging_path(fs, path), path)


def exists(uri: str) -> bool:
    fs, path = open_filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    """A directory, or on an object store a prefix with objects under it."""
    fs, path = open_filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        return True
    if isinstance(fs, pafs.LocalFileSystem):
        return False
    return bool(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def list_dir(uri: str) -> list[str]:
    """The names directly under a directory (none when it does not exist), in name order."""
    fs, path = open_filesystem(uri)
    found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(f.path.rstrip("/").rsplit("/", 1)[-1] for f in found)


def read_bytes(uri: str) -> bytes:
    fs, path = open_filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def remove(uri: str) -> None:
    """Delete a file, or a directory and all under it; nothing when it does not exist."""
    fs, path = open_filesystem(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.File:
        fs.delete_file(path)
    elif kind == pafs.FileType.Directory or is_dir(uri):
        fs.delete_dir(path)


def join(uri: str, *parts: str) -> str:
    """A path under `uri`, joined with / on an object store.

    >>> join("s3://b/run", "answers", "x"), join("runs/a", "b")
    ('s3://b/run/answers/x', 'runs/a/b')
    """
    uri = os.fspath(uri)
    return "/".join([uri.rstrip("/"), *parts]) if "://" in uri else os.path.join(uri, *parts)


def write_whole(uri: str, data: bytes) -> None:
    """Write a file that readers see whole or not at all, on any filesystem: every summary, record
    and published output of a stage is written by this one function."""
    fs, path = open_filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(staging_path(fs, path)) as f:
        f.write(data)
    publish(fs, path)


def write_json(uri: str, record) -> None:
    """A JSON record (a summary, a stage's record), written whole."""
    import json

    write_whole(uri, json.dumps(record, indent=2, ensure_ascii=False, default=str).encode())


def read_json(uri: str):
    """A JSON record's content, or None when there is none (on any filesystem)."""
    import json

    fs, path = open_filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def trained_model_dir(run_dir: str, model_dir: str | None) -> str:
    """Where a run's fine-tuned model is: `train.model_dir`, or `<run_dir>/model` on a local run
    directory. Engines load a model from a directory, so on an object store it must be given.

    >>> trained_model_dir("runs/a", None), trained_model_dir("s3://b/run", "/mnt/shared/models/a")
    ('runs/a/model', '/mnt/shared/models/a')
    """
    if model_dir:
        return model_dir
    if not is_local(run_dir):
        raise ConfigError(f"run_dir={run_dir} is on an object store, where an engine cannot load a model from: set "
                          "train.model_dir to a directory every node can read (e.g. /mnt/shared/models/<run>)")
    return RunDir(run_dir).model


class RunDir:
    """The paths of one run directory."""

    def __init__(self, root: str):
        self.root = root

    def path(self, *parts: str) -> str:
        """A path under the run directory (joined with / on an object store)."""
        return join(self.root, *parts)

    # rate
    @property
    def rated(self) -> str:
        return self.path("rated")

    @property
    def rated_turns(self) -> str:
        return self.path("rated_turns")

    @property
    def rated_summary(self) -> str:
        return self.path("rated_summary.json")

    @property
    def rate_config(self) -> str:
        return self.path("rate_config.json")

    @property
    def batches(self) -> str:
        return self.path("batches")

    # rate --pilot: the sample, a run directory per grader, the comparison
    def pilot(self, *parts: str) -> str:
        return self.path("pilot", *parts)

    # filter
    @property
    def selected_json(self) -> str:
        return self.path("selected.json")

    @property
    def selected_jsonl(self) -> str:
        return self.path("selected.jsonl")

    @property
    def selection(self) -> str:
        return self.path("selection.json")

    @property
    def plots(self) -> str:
        return self.path("plots")

    # train
    @property
    def model(self) -> str:
        return self.path("model")

    @property
    def train_log(self) -> str:
        return self.path("train_log.jsonl")

    @property
    def checkpoints(self) -> str:
        return self.path("checkpoints")

    @property
    def tensorboard(self) -> str:
        return self.path("tensorboard")

    # generate, judge, report
    def answers(self, name: str = "") -> str:
        return self.path("answers", name) if name else self.path("answers")

    def judgments(self, pair: str = "") -> str:
        return self.path("judgments", pair) if pair else self.path("judgments")

    @property
    def report_json(self) -> str:
        return self.path("report.json")

    @property
    def report_md(self) -> str:
        return self.path("report.md")

    # run
    def stage_record(self, stage: str) -> str:
        return self.path("stages", f"{stage}.json")

    @property
    def run_config(self) -> str:
        return self.path("run_config.json")

    # every command
    @property
    def logs(self) -> str:
        return self.path("logs")

    # Directories that hold bulk data rather than results a person reads (the report lists them whole).
    @property
    def bulk(self) -> tuple[str, ...]:
        return (self.rated, self.rated_turns, self.model, self.checkpoints, self.tensorboard, self.logs)
