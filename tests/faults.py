"""Real faults for tests: no hook in the code under test, the process is killed from outside."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def train_workers() -> list[int]:
    """Process ids of this machine's Ray Train workers (Ray titles them ``ray::RayTrainWorker...``)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"RayTrainWorker" in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:  # gone meanwhile
            continue
    return sorted(found)


class WorkerCrash:
    """A stage's `on_progress` callback that SIGKILLs one Ray Train worker, once, as soon as the stage
    reports a step ≥ `after_step` (an OOM kill or a lost node, as far as Ray Train can tell). Every progress
    value it receives is kept in `seen`."""

    def __init__(self, after_step: int):
        self.after_step, self.seen, self.killed = after_step, [], None

    def __call__(self, value: dict) -> None:
        self.seen.append(value)
        if self.killed is None and value["step"] >= self.after_step:
            workers = train_workers()
            if workers:
                os.kill(workers[-1], signal.SIGKILL)
                self.killed = value["step"]
