"""Joining Ray: every stage that needs a cluster calls `ensure_ray` first.

How much the workers say is decided here too: by default only warnings and errors of their Python
logging (and of vLLM's engines, see `worker_log_level`); with `alpagasus --verbose`, everything.
"""

from __future__ import annotations

_verbose = False


def set_verbose(verbose: bool) -> None:
    """Show every message of Ray's, Ray Data's and vLLM's workers (`alpagasus --verbose`)."""
    global _verbose
    _verbose = verbose


def worker_log_level() -> str:
    """The level of the workers' logging: INFO with --verbose, else WARNING."""
    return "INFO" if _verbose else "WARNING"


def ensure_ray() -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`), or start a local one."""
    import ray

    if ray.is_initialized():
        return
    ray.init(ignore_reinit_error=True, log_to_driver=True, logging_config=ray.LoggingConfig(log_level=worker_log_level()))
    import warnings

    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # the stages draw their own (progress.py)
    # A pool of API actors waits on blocks that come one by one: not a problem to report.
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
