"""The training loop: a stage's phases in order, each with its own optimizer and schedule, resumable at any step.

A diffusion stage runs `merge` (block-diffusion CE at the stage's B) then `distill` (CE + top-K KD from the
previous stage, the teacher); an AR base runs `ar`. Each phase builds a fresh AdamW at its own rate with a
linear warm-up and a cosine to its floor. Resuming at step s skips the finished phases, restores the optimizer
state saved by the running phase and replays the schedule to s, so an interrupted and resumed stage takes the
same steps as one that was never stopped (`tests/test_train_loop.py`). The caller supplies the batches, the wrapped
model (plain, DDP or FSDP) and what a checkpoint does; Ray Train's worker (`tasks/train_worker.py`) adds only
the process group, its data shard and `ray.train.report`.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from bard_core.config import TrainConfig


@dataclass(frozen=True)
class Phase:
    name: str  # "merge", "distill" or "ar"
    steps: int
    lr: float
    min_ratio: float  # the cosine's floor, as a fraction of `lr`


def plan(objective: str, train: TrainConfig, has_teacher: bool) -> list[Phase]:
    """The phases of a stage: `ar` for an AR base; `merge`, then `distill` when there is a teacher."""
    if objective == "ar":
        return [Phase("ar", train.base_steps, train.lr, train.min_lr_ratio)]
    phases = [Phase("merge", train.merge_steps, train.lr, train.min_lr_ratio)]
    if has_teacher and train.distill_steps:
        phases.append(Phase("distill", train.distill_steps, train.distill_lr, train.distill_min_lr_ratio))
    return phases


@dataclass
class Progress:
    """Where a stage is: the steps done, one history entry per step, and the steps it was resumed from."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    resumed_from: list[int] = field(default_factory=list)

    @classmethod
    def resumed(cls, meta: dict) -> Progress:
        """The progress recorded in a checkpoint's meta, continuing from it."""
        return cls(meta["step"], list(meta["history"]), list(meta.get("resumed_from", [])) + [meta["step"]])


def checkpoint_meta(stage: dict, progress: Progress, phase: Phase, final: bool, **extra) -> dict:
    """A checkpoint's `bard.json`: the stage's fixed description plus where training stands."""
    return {**stage, "step": progress.step, "history": progress.history, "phase": phase.name, "final": final,
            "resumed_from": progress.resumed_from, **extra}


def load_teacher(path, block_size: int, device, dtype, fsdp: bool, attn_implementation: str = "sdpa"):
    """The previous stage as a frozen `Teacher` in eval mode: on `device` in `dtype`, or sharded like the
    student under FSDP (its full weights would otherwise sit on every rank)."""
    from bard_core import checkpoint
    from bard_core.parallel import shard
    from bard_core.train import LogitsAtLossPositions, Teacher

    model, _, _ = checkpoint.load(path, attn_implementation)
    model.requires_grad_(False).eval()
    if fsdp:
        return Teacher(shard(LogitsAtLossPositions(model.to(device)), dtype).eval(), block_size)
    return Teacher(model.to(device, dtype), block_size)


def run_phases(runner, phases: list[Phase], train: TrainConfig, next_batch: Callable[[], object],
               progress: Progress, *, teacher=None, start_weights: dict | None = None,
               restore: Callable[[str, object], None] | None = None,
               on_step: Callable[[Progress, Phase, dict], None] | None = None,
               on_checkpoint: Callable[[Progress, Phase, object, dict, bool], None] | None = None) -> Progress:
    """Train `runner` through `phases` from `progress.step` to the end; returns the progress.

    `restore(phase_name, optimizer)` puts back the optimizer state a checkpoint saved, if that phase saved it;
    it is called once, for the phase training resumes in. With ``train.base_pull``, `start_weights` holds the stage's
    starting weights by parameter name (`bard_core.train.BasePull`); a stage trained from step 0 may leave it
    out (its weights are the start), a resumed one may not. `on_checkpoint(progress,
    phase, optimizer, metrics, final)` runs every `train.checkpoint_every` steps and at each phase's end (under
    FSDP every rank must take part). The teacher (a `bard_core.train.Teacher`) serves the distill phase only.
    """
    from bard_core.train import BasePull, build_optimizer, build_scheduler, train_step

    module = runner.module if hasattr(runner, "module") else runner  # what the optimizer steps (DDP's inner module)
    pull = None
    if train.base_pull > 0:
        if start_weights is None and progress.step > 0:
            raise ValueError(f"train.base_pull: resuming at step {progress.step} needs the stage's starting weights")
        pull = BasePull(module, train.base_pull, start_weights)
    total, done_before, asked = sum(p.steps for p in phases), 0, restore is None
    for phase in phases:
        start, end = done_before, done_before + phase.steps
        done_before = end
        if progress.step >= end:
            continue
        optimizer = build_optimizer(module, train, phase.lr)
        scheduler = build_scheduler(optimizer, phase.steps, min(train.warmup_steps, phase.steps // 2),
                                    phase.min_ratio)
        if not asked:
            asked = True
            restore(phase.name, optimizer)
        with warnings.catch_warnings():  # the schedule where the phase left off (no optimizer step is missing)
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            for _ in range(progress.step - start):
                scheduler.step()
        phase_teacher = teacher if phase.name == "distill" else None
        while progress.step < end:
            started = time.perf_counter()
            batch = next_batch()
            fetched = time.perf_counter()
            metrics = train_step(runner, batch, optimizer, train, teacher=phase_teacher, scheduler=scheduler, pull=pull)
            progress.step += 1
            progress.history.append({"step": progress.step, "phase": phase.name, "loss": metrics["loss"],
                                     **{k: metrics[k] for k in ("ce", "kd", "anchor") if k in metrics},
                                     "data_s": round(fetched - started, 4),
                                     "step_s": round(time.perf_counter() - fetched, 4)})
            if on_step is not None:
                on_step(progress, phase, metrics)
            if on_checkpoint is not None and (progress.step % train.checkpoint_every == 0 or progress.step == end):
                on_checkpoint(progress, phase, optimizer, metrics, progress.step == total)
    return progress


def as_dicts(phases: list[Phase]) -> list[dict]:
    """The phases as JSON (a Ray config, a `bard.json`)."""
    return [dataclasses.asdict(p) for p in phases]


def from_dicts(phases: list[dict]) -> list[Phase]:
    return [Phase(**p) for p in phases]
