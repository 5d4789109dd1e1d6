"""Real faults for tests: no hook in the code under test, the process is killed from outside."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def _raylet_of(pid: int) -> int | None:
    for entry in (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0"):
        if entry.startswith(b"RAY_RAYLET_PID="):
            return int(entry.split(b"=", 1)[1])
    return None


def _parent(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])


def train_workers() -> list[int]:
    """Process ids of the Ray Train workers of this process's local Ray (titled ``ray::RayTrainWorker...`` by Ray;
    their raylet is a child of this process), not of another Ray on the same machine."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"RayTrainWorker" in (proc / "cmdline").read_bytes():
                raylet = _raylet_of(int(proc.name))
                if raylet is not None and _parent(raylet) == os.getpid():
                    found.append(int(proc.name))
        except (OSError, ValueError):  # gone meanwhile
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
