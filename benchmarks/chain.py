"""The stage chain as the benchmarks run it: the pipeline flow (`flows/pipeline.py`, the only chain) on
a recipe on the tiny base (`tiny`, `tiny-long`) over a shapes world, with the benchmark's steps, rates and
overrides per stage.

Its gates are opened (tolerance 1, no minimum TPF) so that every stage of the schedule is trained and
measured whatever its scores: a benchmark reports drops and speeds; it does not stop at the first stage
a gate would refuse. Everything is cached under the work directory as in any pipeline run, so a second
call with the same settings only evaluates.
"""

from __future__ import annotations

import json
from pathlib import Path

from flows.pipeline import OPEN_GATES


def parse_steps(text: str) -> list[tuple[int, int]]:
    """``"450:0,100:40"`` → ``[(450, 0), (100, 40)]`` (merge:distill per stage)."""
    steps = [tuple(int(x) for x in part.split(":")) for part in text.split(",")]
    if any(len(s) != 2 for s in steps):
        raise ValueError(f"steps expects MERGE:DISTILL per stage, got {text!r}")
    return steps


def chain_params(work: str | Path, *, seed: int = 11, size: int = 3000, limit: int = 300, threshold: float = 0.9,
                 steps: list[tuple[int, int]] | None = None, lrs: list[float] | None = None,
                 overrides: dict | None = None, stage_sets: dict[int, dict[str, str]] | None = None,
                 run_name: str = "chain", recipe: str = "tiny"):
    """The PipelineParams of a benchmark's chain. `steps`/`lrs`: per stage of the recipe's schedule from B4
    on (the schedule is cut to the length of `steps`; one rate is every stage's); `overrides`: recipe
    overrides for every stage; `stage_sets`: block size → overrides of that stage only (they beat `overrides`).
    `recipe`: a recipe on the tiny base. Bad values raise ValueError before any work."""
    from bard_core.recipes import get_recipe
    from flows.pipeline import PipelineParams, WorldParams

    work = Path(work).resolve()
    base = {**(overrides or {}), **OPEN_GATES, "gate.limit": str(limit), "gate.thresholds": json.dumps([threshold])}
    if get_recipe(recipe).model.base != "tiny":
        raise ValueError(f"recipe {recipe!r} is not on the tiny base: the chain runs on a shapes world")
    schedule = list(get_recipe(recipe, base).train.block_sizes)
    if steps is not None and len(steps) > len(schedule):
        raise ValueError(f"{len(steps)} stages of steps for the block sizes {schedule}")
    schedule = schedule[:len(steps)] if steps is not None else schedule
    lrs = (lrs * len(schedule) if len(lrs) == 1 else lrs) if lrs else None
    if lrs is not None and len(lrs) != len(schedule):
        raise ValueError(f"{len(lrs)} learning rates for {len(schedule)} stages: give one, or one per stage")
    unknown = set(stage_sets or {}) - set(schedule)
    if unknown:
        raise ValueError(f"stage settings for block sizes {sorted(unknown)} outside the schedule {schedule}")
    per_stage: dict[int, dict[str, str]] = {B: dict((stage_sets or {}).get(B, {})) for B in schedule}
    for k, B in enumerate(schedule):
        if steps is not None:
            per_stage[B].update({"train.merge_steps": str(steps[k][0]), "train.distill_steps": str(steps[k][1])})
        if lrs is not None:
            per_stage[B]["train.lr"] = str(lrs[k])
        get_recipe(recipe, {**base, **per_stage[B]})  # a bad value fails here
    return PipelineParams(recipe=recipe, overrides=base, stage_overrides={B: o for B, o in per_stage.items() if o},
                          block_sizes=schedule, root=str(work), run_name=run_name, registry=str(work / "registry"),
                          world=WorldParams(seed=seed, size=size, bench_size=limit))


def run_chain(work: str | Path, **settings) -> dict:
    """Run the pipeline flow with `chain_params(work, **settings)` and return its report (``report.json``)
    with `annotate`'s additions."""
    from flows.pipeline import pipeline_flow

    params = chain_params(work, **settings)
    pipeline_flow(params)
    return annotate(json.loads((Path(params.root) / params.run_name / "report.json").read_text()))


def annotate(report: dict) -> dict:
    """`report` (a pipeline run's ``report.json``) with, per stage, ``final_loss`` (the mean loss of its last
    10% of steps), ``steps`` (merge+distill), merge ``lr``, ``train_seconds`` (this run's) and ``step_seconds``
    (its training steps', recorded in its checkpoint)."""
    for stage in report["stages"]:
        meta = json.loads((Path(stage["checkpoint"]) / "bard.json").read_text())
        tail = meta["history"][-max(1, len(meta["history"]) // 10):]
        stage["final_loss"] = sum(h["loss"] for h in tail) / len(tail)
        phases = {p["name"]: p for p in meta["phases"]}
        stage["steps"] = f"{phases['merge']['steps']}+{phases.get('distill', {}).get('steps', 0)}"
        stage["lr"] = phases["merge"]["lr"]
        stage["train_seconds"] = report["timing"].get(f"{stage['stage']}_train")
        # the stage's own training steps, whichever run paid for them (a cached stage costs this run nothing)
        stage["step_seconds"] = sum(h.get("step_s", 0.0) + h.get("data_s", 0.0) for h in meta["history"])
    return report


def curated(report: dict):
    """The DatasetRef of the data a chain's stages trained on (recorded in each stage's bard.json)."""
    from tasks.refs import DatasetRef

    data = Path(json.loads((Path(report["stages"][0]["checkpoint"]) / "bard.json").read_text())["data"])
    return DatasetRef.from_manifest(data, json.loads((data / "manifest.json").read_text()))
