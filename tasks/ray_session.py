"""The driver's Ray: a cluster to join, or a small local one sized for Ray Train next to Ray Data."""

from __future__ import annotations

import os


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join `address` / RAY_ADDRESS when given, else start a small local Ray (idempotent)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    else:
        # Ray Train's controller polls its workers every 2 s by default, so a finished stage waited ~2 s
        # for its fit() to return; at 0.5 s a poll is two small calls a second (set before the local Ray starts, whose
        # processes inherit it; a cluster's own setting is left alone).
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        # Twice the cores as logical CPUs: Ray Train workers hold one each, and Ray Data still needs
        # room for its read tasks next to them (with exactly 2 on 2 cores a 2-worker stage starves).
        ray.init(num_cpus=num_cpus or 2 * (os.cpu_count() or 1), object_store_memory=2 * 1024**3,
                 include_dashboard=False, ignore_reinit_error=True, log_to_driver=os.environ.get("BARD_RAY_LOGS") == "1")
