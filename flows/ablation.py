"""The ablation flow (issue 24): does the pipeline reproduce BARD-VL's claims, and do our departures earn
their place? Each variant (`bard_core.ablations.VARIANTS`) is a run of the pipeline flow — the one chain —
with its overrides, at the reference's total training steps, per seed; the gates are opened so that every
stage is trained and measured whatever it scores. All runs share the pipeline's content-addressed cache under
`root`: one world, one curated dataset, and every stage whose inputs a variant does not change (a decoding
variant trains nothing). The report compares each variant with the reference on the same items. A run that
finished before with the same settings and the same code is reused, so an ablation that stopped, or one given
more variants or seeds, runs only what is new (delete ``ROOT/<variant>-seed<N>`` to run one again). With
`speed_taus`, each final stage is also evaluated at those thresholds, for the comparison at equal speed.

    ablation ─▶ for seed, for variant: pipeline(overrides, schedule, steps) ─▶ final stage at speed_taus
             ─▶ ablation.md / .json / .png
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from prefect import flow
from pydantic import Field, field_validator

from bard_core.ablations import VARIANTS, as_reference, plan, stage_steps
from bard_core.recipes import get_recipe
from flows.pipeline import OPEN_GATES, LineParams, PipelineParams, pipeline_flow, world_dir
from tasks.ablation_render import publish_ablation, write_ablation
from tasks.ablation_report import run_summary
from tasks.evaluate import Suite, evaluate_task
from tasks.refs import code_version

FINISHED = "ablation-run.json"  # beside a run's report.json: the settings and code it finished with
SPEED = "speed"  # beside it: the final stage at the ablation's speed_taus (`speed_points`)


class AblationParams(LineParams):
    """Shown as a form in the Prefect UI; `recipe`, `block_sizes` and `overrides` make the reference."""

    variants: list[str] = Field(default_factory=lambda: list(VARIANTS),
                                description="variants to run besides the reference: " + ", ".join(VARIANTS))
    seeds: int = Field(1, ge=1, description="seeds per variant (train.seed 0..N-1: data order and noise)")
    limit: int = Field(300, ge=4, description="items per shapes benchmark")
    root: str = Field("ablation", description="the runs, the shared cache and the report live here")
    speed_taus: list[float] = Field(default_factory=list,
                                    description="more decoding thresholds for each variant's final stage, for the "
                                                "comparison at equal speed (e.g. 0.7, 0.5, 0.3)")

    @field_validator("speed_taus")
    @classmethod
    def _taus(cls, taus: list[float]) -> list[float]:
        if not all(0.0 < t < 1.0 for t in taus):
            raise ValueError(f"speed_taus {taus}: decoding thresholds lie in (0, 1)")
        return sorted(set(taus), reverse=True)

    @field_validator("variants")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
        return ["reference"] + [n for n in dict.fromkeys(names) if n != "reference"]


def _reference(params: AblationParams) -> tuple[dict[str, str], tuple[int, ...]]:
    """Every run's overrides, and the reference's schedule."""
    # the claims are about block decoding (noise, correction): the gate judges its thresholds only, not the
    # stage's own speculative mode, whose answers no decoding setting changes
    base = {**params.overrides, **OPEN_GATES, "gate.limit": str(params.limit), "gate.speculative": "false"}
    if params.ray_address:
        base["ray_address"] = params.ray_address
    return base, tuple(params.block_sizes) or get_recipe(params.recipe, base).train.block_sizes


def not_run(params: AblationParams) -> dict[str, str]:
    """The asked-for variants that would train and decode as the reference does on this recipe, and why: they
    are not run, and the report says their claims went untested (`bard_core.ablations.as_reference`)."""
    base, schedule = _reference(params)
    return {name: why for name in params.variants if name != "reference"
            and (why := as_reference(VARIANTS[name], params.recipe, base, schedule))}


def variant_runs(params: AblationParams) -> list[tuple[str, int, PipelineParams]]:
    """(variant, seed, the pipeline run's parameters) for every run of the ablation, less `not_run`'s; bad
    settings raise ValueError here, before any work."""
    base, schedule = _reference(params)
    recipe = get_recipe(params.recipe, base)
    skipped = not_run(params)
    world = params.world.model_copy(update={"bench_size": params.limit})
    root = Path(params.root).resolve()
    runs = []
    for seed in range(params.seeds):
        for name in (n for n in params.variants if n not in skipped):
            variant = VARIANTS[name]
            sizes, per_stage = plan(variant, recipe, schedule)
            overrides = {**base, **variant.overrides, "train.seed": str(seed)}
            for B in sizes:
                get_recipe(params.recipe, {**overrides, **per_stage[B]})  # every stage's settings are valid
            run = f"{name}-seed{seed}"
            runs.append((name, seed, PipelineParams(
                recipe=params.recipe, sources=params.sources, include_paths=params.include_paths,
                overrides=overrides, stage_overrides=per_stage, block_sizes=sizes, root=str(root), run_name=run,
                registry=str(root / "registries" / run), world=world)))
    return runs


def run_dir(run: PipelineParams) -> Path:
    """Where a run of the ablation keeps its report, its FINISHED marker and its SPEED points."""
    return Path(run.root) / run.run_name


def write_report(params: AblationParams, runs: list, seconds: float | None = None) -> dict:
    """The ablation report of `runs` (`variant_runs(params)`, every one finished) under ``ROOT/report``."""
    recipe = get_recipe(params.recipe, {**params.overrides, **OPEN_GATES})
    schedule = list(params.block_sizes) or list(recipe.train.block_sizes)
    policy = get_recipe(params.recipe, params.overrides).gate  # what the recipe's own gates would promote
    summaries: dict[str, list[dict]] = {}
    for name, _, run in runs:
        summaries.setdefault(name, []).append(run_summary(run_dir(run), params.speed_taus, policy))
    # `--report-only` after an upgrade: runs trained by other code or settings are reported, and named as such
    older = [run.run_name for _, _, run in runs if not finished(run)]
    settings = {"recipe": params.recipe, "seeds": params.seeds, "schedule": schedule, "older_runs": older,
                "not_run": not_run(params),
                "total_steps": sum(s["merge"] + s["distill"] for s in stage_steps(recipe, tuple(schedule))),
                "limit": params.limit, "overrides": params.overrides, "world": params.world.model_dump(),
                "speed_taus": params.speed_taus, "seconds": seconds}
    return write_ablation(Path(params.root).resolve() / "report", summaries, settings)


def speed_points(params: AblationParams, run: PipelineParams) -> list[str]:
    """Evaluate a finished run's final stage at each of `params.speed_taus` not yet measured (nor measured by
    its gate), under ``ROOT/<run>/speed/tau-X``; returns the thresholds it evaluated."""
    where = run_dir(run)
    final = json.loads((where / "report.json").read_text())["stages"][-1]
    done = {e["threshold"] for e in final["sweep"] if e.get("threshold") is not None}
    todo = tuple(t for t in params.speed_taus if t not in done
                 and not (where / SPEED / f"tau-{t:g}" / "eval.json").exists())
    if todo:
        overrides = {**run.overrides, **run.stage_overrides.get(final["block_size"], {})}
        include = list(run.include_paths) + ([] if run.sources else  # as the pipeline found them
                                             [str(world_dir(run.root, run.world) / "benchmarks")])
        suite = Suite.of_gate(get_recipe(run.recipe, overrides).gate, tuple(include))
        evaluate_task(final["checkpoint"], suite, str(where / SPEED), "diffusion", todo, None, run.recipe, overrides)
    return [f"{t:g}" for t in todo]


def speed_curves(params: AblationParams, runs: list) -> None:
    """`speed_points` for every finished run of `runs` (`variant_runs(params)`)."""
    for name, seed, run in runs:
        if params.speed_taus and (taus := speed_points(params, run)):
            print(f"variant {name}, seed {seed}: final stage evaluated at τ {', '.join(taus)}")


def fingerprint(run: PipelineParams) -> str:
    """What a finished run is reused on: all its settings and the code the pipeline runs (not the report's)."""
    blob = json.dumps({"params": run.model_dump(mode="json"), "code": code_version("flows.pipeline")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def finished(run: PipelineParams) -> bool:
    try:
        recorded = json.loads((run_dir(run) / FINISHED).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):  # no marker, or one cut short: the run is run again
        return False
    return recorded == fingerprint(run) and (run_dir(run) / "report.json").exists()


def summarize(paths: dict) -> dict:
    """What `ablation_flow` returns, and `bard ablate` prints, of a written report (`write_report`)."""
    result = paths["result"]
    return {"report": paths["ablation_md"], "json": paths["ablation_json"], "seconds": result["settings"]["seconds"],
            "verdicts": {t["variant"]: t["verdict"] for c in result["claims"] for t in c["tests"]},
            "older_runs": result["settings"].get("older_runs", [])}


@flow(name="ablation", log_prints=True)
def ablation_flow(params: AblationParams) -> dict:
    started = time.monotonic()
    runs = variant_runs(params)
    for name, why in not_run(params).items():
        print(f"variant {name}: not run, it would train and decode as the reference: {why}")
    print(f"ablation: {len(runs)} pipeline runs ({len({n for n, _, _ in runs})} variants × {params.seeds} seeds) "
          f"under {Path(params.root).resolve()}")
    for name, seed, run in runs:
        marker = run_dir(run) / FINISHED
        if finished(run):
            print(f"variant {name}, seed {seed}: finished before with these settings and this code; reused")
            continue
        print(f"variant {name}, seed {seed}: schedule {run.block_sizes}, {VARIANTS[name].what}")
        marker.unlink(missing_ok=True)  # gone before the run's report changes
        shutil.rmtree(marker.parent / SPEED, ignore_errors=True)  # measured on what the run replaces
        pipeline_flow.with_options(flow_run_name=run.run_name)(run)
        marker.write_text(json.dumps({"fingerprint": fingerprint(run), "variant": name, "seed": seed}))
    speed_curves(params, runs)
    paths = write_report(params, runs, round(time.monotonic() - started, 1))
    publish_ablation(paths)
    for claim in paths["result"]["claims"]:
        for test in claim["tests"]:
            print(f"{claim['claim']}: {test['verdict']} ({test['variant']}: {test['gain']:+.1f} ± {test['se']:.1f} pt)")
    summary = summarize(paths)
    (Path(params.root).resolve() / "report" / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
