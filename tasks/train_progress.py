"""A training stage's progress, seen from the driver: rank 0 posts its last step to a small Ray actor
(`ProgressBoard`), a thread polls it while `fit()` blocks (`watching`), and `ProgressLog` turns the values into
the stage's Prefect progress artifact and a log line a minute (step, phase, loss, steps/s, time left) — what a
person following a run of hours in a terminal or in the UI's logs reads. Nothing here changes a weight, so the
stage key does not hash this module (`tasks.train.STAGE_CODE_SKIP`).
"""

from __future__ import annotations

import contextlib
import threading
import time


class ProgressBoard:
    """Where rank 0 posts its last step (an actor, so it works when the workers are on other nodes)."""

    def __init__(self):
        self.value = None

    def set(self, value: dict) -> None:
        self.value = value

    def get(self) -> dict | None:
        return self.value


@contextlib.contextmanager
def watching(board, on_progress, every: float = 2.0):
    """Poll `board` from a thread while the body (a blocking `fit()`) runs; hand new values to `on_progress`."""
    import ray

    if board is None:
        yield
        return
    stop = threading.Event()

    def poll():
        last, stopped = None, False
        while not stopped:  # one more look after the body ends, for the last steps
            stopped = stop.wait(every)
            try:
                value = ray.get(board.get.remote(), timeout=10)
                if value is not None and value != last:
                    last = value
                    on_progress(value)
            except Exception:  # noqa: BLE001 - progress is best effort; it never disturbs training
                continue

    thread = threading.Thread(target=poll, name="stage-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(every + 10)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


class ProgressLog:
    """`on_progress` for a stage named `name`: `artifact(percent)` on every value; `log(line)` on the first value
    of this process's training, then once `interval` seconds have passed, with the rate since the last line and
    the time left at that rate. `done()` is the closing line: the steps this process saw trained (from the first
    it saw: a resumed stage starts past 1) and their time, or that it trained none (a cached stage, or one another
    run finished)."""

    def __init__(self, name: str, log, artifact=None, interval: float = 60.0, clock=time.monotonic):
        self.name, self.log, self.artifact, self.interval, self.clock = name, log, artifact, interval, clock
        self.first = self.last = None  # (time, step) of the first value, and of the last line
        self.latest = None  # the last value

    def __call__(self, value: dict) -> None:
        step, total, now = value["step"], value["total"], self.clock()
        self.latest = value
        if self.artifact is not None:
            self.artifact(round(100.0 * step / total, 1))
        if self.last is not None and now - self.last[0] < self.interval:
            return
        line = f"{self.name}: step {step}/{total} ({value['phase']}), loss {value['loss']:.3f}"
        if self.last is not None and step > self.last[1]:
            rate = (step - self.last[1]) / (now - self.last[0])
            line += f", {rate:.2f} steps/s, about {_minutes((total - step) / rate)} left"
        self.log(line)
        self.first = self.first or (now, step)
        self.last = (now, step)

    def done(self) -> str:
        if self.first is None:
            line = f"{self.name}: nothing trained here (its checkpoint was finished: cached, or another run's)"
        else:
            line = (f"{self.name}: trained steps {self.first[1]}–{self.latest['step']} of {self.latest['total']} in "
                    f"{_minutes(self.clock() - self.first[0])}")
        self.log(line)
        return line
