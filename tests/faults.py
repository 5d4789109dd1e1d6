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


def local_ray_processes(title: bytes) -> list[int]:
    """Process ids of this process's local Ray (its raylet is a child of this process, not another Ray on the same
    machine) whose command line (Ray's process title) contains `title`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and title in (proc / "cmdline").read_bytes():
                raylet = _raylet_of(int(proc.name))
                if raylet is not None and _parent(raylet) == os.getpid():
                    found.append(int(proc.name))
        except (OSError, ValueError):  # gone meanwhile
            continue
    return sorted(found)


def train_workers() -> list[int]:
    """The Ray Train workers of this process's local Ray (titled ``ray::RayTrainWorker...`` by Ray)."""
    return local_ray_processes(b"RayTrainWorker")


class WorkerCrash:
    """A stage's `on_progress` callback that SIGKILLs one Ray Train worker, once, as soon as the stage
    reports a step ≥ `after_step` (an OOM kill or a lost node, as far as Ray Train can tell). With `saved_under`
    (the stage's Ray storage directory) it also waits until Ray's controller has registered a checkpoint there:
    a worker reports step 9 before the controller has polled its step-8 checkpoint, and a kill in between is a
    restart from scratch (correct, but not the resume a test means to check). Every progress value it receives
    is kept in `seen`."""

    def __init__(self, after_step: int, saved_under: Path | None = None):
        self.after_step, self.saved_under, self.seen, self.killed = after_step, saved_under, [], None

    def _registered(self) -> bool:
        if self.saved_under is None:
            return True
        for snapshot in Path(self.saved_under).glob("*/checkpoint_manager_snapshot.json"):
            try:
                if "checkpoint_" in snapshot.read_text():
                    return True
            except OSError:  # being rewritten
                continue
        return False

    def __call__(self, value: dict) -> None:
        self.seen.append(value)
        if self.killed is None and value["step"] >= self.after_step and self._registered():
            workers = train_workers()
            if workers:
                os.kill(workers[-1], signal.SIGKILL)
                self.killed = value["step"]


def marked(marker: str) -> list[int]:
    """Process ids whose environment carries ``BARD_FAULT_RUN=<marker>``: a spawned command and everything it
    started (its Prefect server, Ray's daemons and workers inherit the environment), wherever they re-parented."""
    found, needle = [], f"BARD_FAULT_RUN={marker}".encode()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int(proc.name) != os.getpid() and \
                    needle in (proc / "environ").read_bytes().split(b"\0"):
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":  # a zombie holds nothing: it waits for its parent to reap it
                    found.append(int(proc.name))
        except (OSError, ValueError):  # gone meanwhile, or not ours to read
            continue
    return sorted(found)


def wait_until(predicate, timeout: float, proc=None, what: str = "the condition", every: float = 0.05):
    """Poll `predicate` until it is true; fail after `timeout` seconds, or as soon as `proc` exits first."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
