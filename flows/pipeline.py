"""The pipeline (DESIGN.md §2, §6): the one stage chain.

    sources ─curate─▶ data ─▶ AR base ─▶ baseline evaluation ─▶ for B in the schedule:
        stage (merge → distill: one Ray Train fit(), init and teacher = the last promoted stage)
        ─▶ evaluate (threshold sweep) ─▶ gate ─▶ promote | stop with reasons
    ─▶ final report

Everything a stage costs is cached by content under ``<root>/cache`` (the shapes world, the curated data,
every stage's checkpoint, named by a hash of its inputs), so a re-run with unchanged inputs skips straight
to evaluation and a change re-trains from the first stage it affects; each run writes its evaluations and
report to its own ``<root>/<run-id>/``. A failed gate stops the line: the flow run ends Failed with the
reasons in its message, and the report is written first.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import time
from pathlib import Path

from prefect import flow, task
from pydantic import BaseModel, Field, field_validator

from bard_core.recipes import get_recipe
from flows.evaluate import GateFailed, judge_stage
from tasks.curate import curate_sources
from tasks.evaluate import Suite, evaluate_task
from tasks.refs import CheckpointRef, checkpoint_ref
from tasks.report import publish_report, write_report
from tasks.train import stage_key, train_stage
from tasks.world import world_task

# gates that promote whatever a stage scores, so that every stage of a schedule is trained and measured (the
# benchmarks' chains and the ablation's variants report drops and speeds; they do not stop at a refusal)
OPEN_GATES = {"gate.default_tolerance": "1", "gate.min_tpf": "{}"}


class WorldParams(BaseModel):
    """The built-in shapes world, used when no sources are given (tiny recipe)."""

    seed: int = Field(11, description="world seed (sources and benchmark items)")
    size: int = Field(3000, description="clean conversations per source")
    bench_size: int = Field(300, description="images per shapes benchmark")


class LineParams(BaseModel):
    """What a pipeline run and an ablation share: the recipe, its data, its schedule, where it runs."""

    recipe: str = Field("tiny", description="named recipe: tiny, tiny-long, qwen3-vl-2b, qwen3-vl-4b, qwen3-vl-8b")
    sources: dict[str, str] = Field(default_factory=dict, description="source kind → URI (llava_ov, finevision); "
                                                                      "empty: the built-in shapes world")
    include_paths: list[str] = Field(default_factory=list, description="directories with the gate benchmarks' task "
                                                                       "YAMLs (the shapes world's are added for it)")
    block_sizes: list[int] = Field(default_factory=list, description="the schedule (default: the recipe's)")
    overrides: dict[str, str] = Field(default_factory=dict, description="dotted recipe overrides for every stage")
    ray_address: str | None = Field(None, description="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    world: WorldParams = Field(default_factory=WorldParams)

    @field_validator("block_sizes")
    @classmethod
    def _merging(cls, sizes: list[int]) -> list[int]:
        """Progressive merging: each stage's block is a multiple of the last (its teacher's)."""
        if any(b < 1 for b in sizes) or any(b % a or b <= a for a, b in zip(sizes, sizes[1:])):
            raise ValueError(f"block sizes {sizes}: each must be a larger multiple of the one before (4, 8, 16, 32)")
        return sizes


class PipelineParams(LineParams):
    """Shown as a form in the Prefect UI."""

    stage_overrides: dict[int, dict[str, str]] = Field(default_factory=dict,
                                                       description="per block size, overrides for that stage only")
    root: str = Field("runs", description="run directories and the content-addressed cache live here")
    run_name: str | None = Field(None, description="this run's directory name (default: time and flow run id)")
    registry: str | None = Field(None, description="registry root (default: $BARD_REGISTRY or ./registry)")


def world_dir(root: str | Path, world: WorldParams) -> Path:
    """Where the pipeline under `root` caches the shapes world of `world` (its sources and benchmarks)."""
    return Path(root).resolve() / "cache" / "worlds" / f"seed{world.seed}-size{world.size}-bench{world.bench_size}"


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@task(name="ar-base")
def base_task(recipe: str, overrides: dict) -> CheckpointRef:
    """The chain's AR base: the shipped tiny model, or the recipe's base checkpoint directory."""
    base = get_recipe(recipe, overrides).model.base
    if base == "tiny":
        from bard_core.assets import check_shipped_base, shipped_base

        check_shipped_base()
        return checkpoint_ref(shipped_base())
    if not (Path(base) / "config.json").exists():
        raise ValueError(f"model.base {base!r} is not a local model directory; download it first (hub loading "
                         "inside the pipeline is not built yet)")
    return checkpoint_ref(base)


@flow(name="pipeline", log_prints=True)
def pipeline_flow(params: PipelineParams) -> dict:
    from prefect.runtime import flow_run

    started, timing = time.monotonic(), {}

    def lap(name: str, since: float) -> float:
        timing[name] = round(time.monotonic() - since, 1)
        return time.monotonic()

    if params.ray_address:
        params = params.model_copy(update={"overrides": {**params.overrides, "ray_address": params.ray_address}})
    recipe = get_recipe(params.recipe, params.overrides)
    schedule = tuple(params.block_sizes) or recipe.train.block_sizes
    unknown = set(params.stage_overrides) - set(schedule)
    if unknown:
        raise ValueError(f"stage_overrides for block sizes {sorted(unknown)} outside the schedule {schedule}")
    for B in schedule:  # every stage's settings are checked before minutes of curation
        get_recipe(params.recipe, {**params.overrides, **params.stage_overrides.get(B, {})})
    root = Path(params.root).resolve()
    run_id = params.run_name or (datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-"
                                 + str(flow_run.get_id() or "local")[:8])
    run_dir, cache = root / run_id, root / "cache"
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"run {run_id}: {run_dir}")
    t = time.monotonic()

    sources, include = dict(params.sources), list(params.include_paths)
    if not sources:
        w = params.world
        world = world_task(str(world_dir(root, w)), w.seed, w.size, w.bench_size)
        sources = {k: world[k] for k in ("llava_ov", "finevision")}
        include.append(world["benchmarks"])
    benchmarks_dir = include[-1] if include else None  # decontaminate against the gate benchmarks' items
    t = lap("world", t)
    # named by what curation reads (the data settings and the processor), so runs that change only training
    # or decoding settings (an ablation's variants) share one curated dataset
    curated = cache / "curated" / _digest(sources, dataclasses.asdict(recipe.data), dataclasses.asdict(recipe.model))
    data = curate_sources(sources, str(curated), params.recipe, params.overrides, benchmarks_dir)
    t = lap("curate", t)
    base = base_task(params.recipe, params.overrides)
    suite = Suite.of_gate(recipe.gate, tuple(include))
    (baseline,) = evaluate_task(base.uri, suite, str(run_dir / "eval" / "AR"), "ar", None, None, params.recipe,
                                params.overrides, None)
    t = lap("baseline_eval", t)

    parent, outcomes = base, []
    for B in schedule:
        overrides = {**params.overrides, **params.stage_overrides.get(B, {})}
        train = get_recipe(params.recipe, overrides).train.for_stage(B)
        teacher = {"previous": parent if parent.block_size else None, "ar": base, "none": None}[train.teacher]
        if teacher is None or not train.distill_steps:  # no distill phase: no teacher, and no steps recorded for it
            teacher, overrides = None, {**overrides, "train.distill_steps": "0"}
        # the chain's own base, not the path a cached parent recorded (it may have moved since; the key is its digest)
        anchor = base if train.uses_base else None
        key = stage_key(data, parent, params.recipe, overrides, block_size=B, teacher=teacher, anchor=anchor)
        out = cache / "stages" / f"B{B}-{key[:16]}"
        ref = train_stage(data, parent, str(out), params.recipe, overrides, block_size=B, teacher=teacher,
                          anchor=anchor)
        t = lap(f"B{B}_train", t)
        outcome = judge_stage(f"B{B}", B, ref.uri, baseline, base.uri, suite, params.recipe, overrides,
                              run_dir / "eval", params.registry, True, run_id)
        t = lap(f"B{B}_eval", t)
        outcomes.append(outcome)
        if not outcome.result.passed:
            break
        parent = ref

    timing["total"] = round(time.monotonic() - started, 1)
    paths = write_report(run_dir, recipe.name, baseline, outcomes, extra={"run": run_id, "timing": timing,
                                                                          "schedule": list(schedule)})
    publish_report(paths)
    summary = {"run": run_id, "report": paths["report_md"], "promoted": [o.block_size for o in outcomes
                                                                          if o.result.passed],
               "schedule": list(schedule), "timing": timing, "seconds": timing["total"]}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    failed = [o for o in outcomes if not o.result.passed]
    if failed:
        raise GateFailed(f"stage {failed[0].stage} failed its gate: " + "; ".join(failed[0].result.reasons),
                         paths["report_md"])
    return summary
