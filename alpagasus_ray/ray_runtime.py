"""Joining Ray: every stage that needs a cluster calls `ensure_ray` first.

How much the workers say is decided here too: by default only warnings and errors of their Python
logging (and of vLLM's engines, see `worker_log_level`), into `<run_dir>/logs/workers.log`
(`console.capture_workers`); with `alpagasus --verbose`, everything, on the console too.
"""

from __future__ import annotations

from alpagasus_ray import console


def worker_log_level() -> str:
    """The level of the workers' logging: INFO with --verbose, else WARNING."""
    return "INFO" if console.verbose() else "WARNING"


def ensure_ray() -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`), or start a local one."""
    import ray

    # Loggers that `import ray` (and ray.data, ray.train, ... imported by the caller) set up print
    # by themselves: hand them to console.py, so Ray's start-up notices go to the log file too.
    console.adopt_loggers()
    if ray.is_initialized():
        return
    ray.init(ignore_reinit_error=True, log_to_driver=True, logging_config=ray.LoggingConfig(log_level=worker_log_level()),
             configure_logging=not console.is_set_up())  # under the CLI, Ray's records go where console.py says
    console.capture_workers()
    import warnings

    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # the stages draw their own (progress.py)
    # A pool of API actors waits on blocks that come one by one: not a problem to report.
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
    console.adopt_loggers()  # Ray's and Ray Data's loggers print to the console by themselves
