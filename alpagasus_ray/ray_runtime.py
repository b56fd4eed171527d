"""Joining Ray: every stage that needs a cluster calls `ensure_ray` first."""

from __future__ import annotations


def ensure_ray() -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`), or start a local one."""
    import ray

    if ray.is_initialized():
        return
    ray.init(ignore_reinit_error=True, log_to_driver=True)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
