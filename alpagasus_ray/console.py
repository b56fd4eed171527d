"""What a person sees while a stage runs, and where everything else goes.

The console shows the project's own lines (stages, progress bars, the warnings that need the user's
action) and any library's errors. Everything else (Ray's and Ray Data's notices, vLLM's engine
start-up, the workers' output, other libraries' warnings) goes to `<run_dir>/logs/`:

    logs/alpagasus.log   every log record of the driver, ours and the libraries'
    logs/workers.log     the output of every Ray worker (tasks, actors, vLLM engines, training)

`alpagasus --verbose` shows it all on the console as well. A run directory on an object store
gets its logs copied there when the command exits (they are written locally first).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import tempfile
import time

from alpagasus_ray.errors import user_error

OURS = "alpagasus_ray"
FORMAT = "%(asctime)s %(levelname)s %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DRIVER_LOG, WORKER_LOG = "alpagasus.log", "workers.log"

_set_up = False  # by `setup` (the CLI); a library caller's logging is left alone
_verbose = False
_log_dir: str | None = None
_run_root: str | None = None  # the local run directory the logs are in
_console_handler: logging.Handler | None = None
_file_handler: logging.Handler | None = None
_worker_file = None


# The line Ray Data logs before the traceback of an error raised in a read task.
_RAY_DATA_PREAMBLE = "Exception occurred in Ray Data or Ray Core internal code"


class _ConsoleFilter(logging.Filter):
    """Our records from INFO on, anyone's errors; everything with --verbose. A library's report of a
    user's error (bad input found in a Ray task: Ray Data logs the worker's traceback) stays in the
    log file: the CLI prints the error's own message, once."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _verbose:
            return True
        if record.levelno >= logging.ERROR:
            if record.getMessage().startswith(_RAY_DATA_PREAMBLE):
                return False  # says nothing alone; the record with the traceback follows it
            return not (record.exc_info and user_error(record.exc_info[1]) is not None)
        return record.name == OURS or record.name.startswith(OURS + ".")


def setup(verbose: bool = False) -> None:
    """The console handler on the root logger; library loggers are routed through it (`adopt_loggers`)."""
    global _set_up, _verbose, _console_handler
    _set_up, _verbose = True, verbose
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    console.addFilter(_ConsoleFilter())
    root.addHandler(console)
    _console_handler = console
    logging.captureWarnings(True)  # Python warnings become records of "py.warnings": to the file
    # Ray LLM gives each of its loggers a console handler unless "ray.llm" has one: a no-op one
    # makes them pass their records up, to ours.
    logging.getLogger("ray.llm").addHandler(logging.NullHandler())
    adopt_loggers()


def verbose() -> bool:
    return _verbose


def is_set_up() -> bool:
    """Whether `setup` has run (the CLI): then this module decides where log records go."""
    return _set_up


def adopt_loggers() -> None:
    """Libraries that print through handlers of their own (Ray's "ray", "ray.data", ...) are made
    to pass their records to ours instead; call again after importing such a library, and after
    `ray.init`, whose LoggingConfig puts a console handler of its own on the root logger."""
    if not _set_up:
        return
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        if handler not in (_console_handler, _file_handler):
            root.removeHandler(handler)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or name.startswith(OURS):
            continue
        streams = [h for h in logger.handlers
                   if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
        for handler in streams:
            logger.removeHandler(handler)
        if streams:
            logger.propagate = True


def log_to(run_dir: str) -> str:
    """Write the logs of this command under `<run_dir>/logs/` from now on; returns that directory
    (a local one, copied to the run directory at exit when it is on an object store)."""
    global _log_dir, _file_handler, _run_root
    from alpagasus_ray.store.layout import RunDir, is_local

    target = RunDir(run_dir).logs
    local = target if is_local(target) else os.path.join(tempfile.mkdtemp(prefix="alpagasus-logs-"), "logs")
    if _log_dir == local:
        return local
    os.makedirs(local, exist_ok=True)
    if _file_handler is not None:
        logging.getLogger().removeHandler(_file_handler)
        _file_handler.close()
    _file_handler = logging.FileHandler(os.path.join(local, DRIVER_LOG), encoding="utf-8", delay=True)
    _file_handler.setFormatter(logging.Formatter(FILE_FORMAT))
    logging.getLogger().addHandler(_file_handler)
    _log_dir = local
    _run_root = run_dir if is_local(target) else None
    if not is_local(target):
        atexit.register(_copy_logs, local, target)
    if _worker_file is not None:  # Ray is up already: move the workers' output too
        _open_worker_file()
    return local


def drop_logs_of_failed_start() -> None:
    """A command that stopped on bad config or input leaves no run directory behind: remove it
    when it holds nothing but this command's logs."""
    global _file_handler, _log_dir
    import shutil

    if _run_root is None or not os.path.isdir(_run_root) or os.listdir(_run_root) != ["logs"]:
        return
    if _file_handler is not None:
        logging.getLogger().removeHandler(_file_handler)
        _file_handler.close()
        _file_handler = None
    _log_dir = None
    if _worker_file is not None:  # Ray's thread goes on writing: to a temporary file from now on
        _open_worker_file()
    shutil.rmtree(_run_root, ignore_errors=True)


def capture_workers() -> None:
    """Send the Ray workers' output (which Ray prints on the driver's console) to
    `logs/workers.log`, unless --verbose. Call right after `ray.init`."""
    if not _set_up or _verbose:
        return
    try:  # Ray's private dispatcher of worker output; if it moves, the output stays on the console
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    _open_worker_file()
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("alpagasus_worker_logs", _write_worker_lines)


def _open_worker_file() -> None:
    global _worker_file
    if _worker_file is not None:
        _worker_file.close()
    directory = _log_dir or tempfile.mkdtemp(prefix="alpagasus-logs-")
    _worker_file = open(os.path.join(directory, WORKER_LOG), "a", encoding="utf-8", buffering=1)


def _write_worker_lines(data: dict) -> None:
    who = data.get("actor_name") or data.get("task_name") or "worker"
    stamp = time.strftime("%H:%M:%S")
    for line in data.get("lines", []):
        _worker_file.write(f"{stamp} ({who} pid={data.get('pid')}, ip={data.get('ip')}) {line}\n")


def _copy_logs(local: str, target: str) -> None:
    import pyarrow.fs as pafs

    from alpagasus_ray.store.layout import open_filesystem

    for handler in (_file_handler, _worker_file):
        if handler is not None:
            handler.flush()
    fs, path = open_filesystem(target)
    for name in os.listdir(local):
        pafs.copy_files(os.path.join(local, name), f"{path}/{name}", destination_filesystem=fs)
