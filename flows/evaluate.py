"""The evaluate and gate flows.

``evaluate_flow``: one checkpoint through lm-eval (any tasks) and the decode-speed measurement, a
summary artifact. ``gate_flow``: the AR baseline and the candidate evaluated in the same run, same
harness, same prompts; the candidate at every threshold of the recipe's sweep; the gate; promotion of
the chosen setting into the registry when it passes; the report either way. A failed gate ends the
flow run Failed, its reasons in the message (`GateFailed`), with the report and artifacts written.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from bard_core.gate import EvalReport, GateResult, select, setting
from bard_core.recipes import get_recipe
from tasks import registry
from tasks.evaluate import Suite, evaluate_task
from tasks.refs import checkpoint_ref
from tasks.report import StageOutcome, publish_gate, publish_report, write_report


class GateFailed(RuntimeError):
    """A stage did not pass its gate; the message lists every reason, `report` is the report written."""

    def __init__(self, message: str, report: str | None = None):
        super().__init__(message)
        self.report = report


class EvalParams(BaseModel):
    """Shown as a form in the Prefect UI."""

    model: str = Field(description="checkpoint directory (an HF directory, bard.json when trained here)")
    out: str = Field(description="output directory (eval.json and per-item samples per decode setting)")
    tasks: list[str] = Field(default_factory=list, description="lm-eval task or group names (default: the recipe's "
                                                               "gate benchmarks)")
    include_paths: list[str] = Field(default_factory=list, description="directories with more lm-eval task YAMLs")
    mode: str | None = Field(None, description="ar | diffusion | speculative (lossless: the greedy answers of the "
                                               "verifier) (default: diffusion for a block-diffusion checkpoint)")
    verifier: str | None = Field(None, description="speculative mode: the model whose greedy answers come out, e.g. "
                                                   "the AR base (default: the checkpoint's own weights)")
    ar_model: str | None = Field(None, description="AR base whose decode speed is measured beside the model's")
    recipe: str = Field("tiny", description="named recipe: decode defaults, gate benchmarks, mask token id")
    limit: int | None = Field(None, description="items per benchmark (default: the recipe's gate.limit)")
    thresholds: list[float] = Field(default_factory=list, description="decode thresholds to evaluate (default: the "
                                                                      "checkpoint's own setting)")
    decode: dict[str, str] = Field(default_factory=dict, description="DecodeConfig fields, e.g. block_size=8")
    speed_benchmark: str | None = Field(None, description="long-output benchmark for the speed figures "
                                                          "(default: the recipe's, when it is among the tasks)")


def _summary(report: EvalReport) -> dict:
    return {"label": report.label, "mode": report.mode, "decode": report.decode, "scores": report.scores,
            "metrics": report.metrics, "speed": report.speed, "harness": report.harness,
            "samples": report.samples_uri}


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params: EvalParams) -> dict:
    recipe = get_recipe(params.recipe)
    names = tuple(params.tasks) or recipe.gate.benchmarks
    speed = params.speed_benchmark or (recipe.gate.speed_benchmark if recipe.gate.speed_benchmark in names else None)
    suite = Suite(names, tuple(params.include_paths), params.limit or recipe.gate.limit, speed,
                  recipe.gate.speed_items)
    mode = params.mode or ("diffusion" if checkpoint_ref(params.model).block_size else "ar")
    reports = evaluate_task(params.model, suite, params.out, mode, tuple(params.thresholds) or None, params.ar_model,
                            params.recipe, None, params.decode or None, params.verifier)
    lines = [f"# Evaluation of `{params.model}` ({mode})", "", "| setting | " + " | ".join(names) + " | TPF | tok/s b1 |",
             "|---|" + "---|" * (len(names) + 2)]
    for r in reports:
        batch1 = (r.speed.get("batch") or {}).get("1", {}).get("tok_s")
        lines.append(f"| {r.label} | " + " | ".join(f"{r.scores[n]:.3f}" for n in names)
                     + f" | {r.speed.get('tpf', float('nan')):.2f} | {batch1 or float('nan'):.0f} |")
    create_markdown_artifact("\n".join(lines), key="evaluation", description=f"evaluation of {params.model}")
    result = {"model": params.model, "mode": mode, "reports": [_summary(r) for r in reports]}
    result.update({k: result["reports"][0][k] for k in ("scores", "speed", "harness")})
    (Path(params.out) / "evaluation.json").write_text(json.dumps(result, indent=1, default=str))
    return result


class GateParams(BaseModel):
    """Shown as a form in the Prefect UI."""

    candidate: str = Field(description="the stage's checkpoint (block size from its bard.json)")
    baseline: str = Field(description="the AR base, evaluated in the same run as the candidate")
    out: str = Field(description="run directory: evaluations, report.md, report.json, tradeoff.png")
    recipe: str = Field("tiny", description="named recipe: its gate policy (benchmarks, tolerances, minimum TPF, "
                                            "threshold sweep)")
    overrides: dict[str, str] = Field(default_factory=dict, description="dotted recipe overrides, e.g. gate.limit=100")
    include_paths: list[str] = Field(default_factory=list, description="directories with the gate's task YAMLs")
    stage: str | None = Field(None, description="stage name (default: B<block size>)")
    promote: bool = Field(True, description="promote into the registry when the gate passes")
    registry: str | None = Field(None, description="registry root (default: $BARD_REGISTRY or ./registry)")


@task(name="gate")
def gate_task(candidates: list[EvalReport], baseline: EvalReport, recipe: str, overrides: dict, stage: str,
              block_size: int | None) -> GateResult:
    return select(candidates, baseline, get_recipe(recipe, overrides).gate, stage, block_size)


@task(name="promote")
def promote_task(root: str, recipe: str, result: GateResult, candidate: str, report: EvalReport,
                 baseline: EvalReport, block_size: int | None, run: str | None) -> dict:
    return registry.promote(root, recipe, result, candidate, report, baseline, block_size=block_size, run=run)


def judge_stage(stage: str, block_size: int, candidate: str, baseline: EvalReport, baseline_uri: str, suite: Suite,
                recipe: str, overrides: dict, out: Path, registry_root: str | None, promote: bool = True,
                run: str | None = None) -> StageOutcome:
    """A stage's gate inside a flow: the candidate at every setting of the recipe's sweep (the AR base's
    speed beside it), the verdict, the promotion of the chosen setting when it passes, the gate artifacts."""
    policy = get_recipe(recipe, overrides).gate
    candidates = evaluate_task(candidate, suite, str(out / stage), "diffusion", policy.thresholds, baseline_uri,
                               recipe, overrides, None, speculative=policy.speculative, drafter=policy.drafter)
    result = gate_task(candidates, baseline, recipe, overrides, stage, block_size)
    if result.passed and promote:
        chosen = next(c for c in candidates if c.decode == result.decode)
        root = registry_root or str(registry.default_root())
        entry = promote_task(root, recipe, result, candidate, chosen, baseline, block_size, run)
        result = dataclasses.replace(result, promoted_uri=entry["uri"])
    outcome = StageOutcome(stage, block_size, str(Path(candidate).resolve()), result, candidates)
    publish_gate(outcome, baseline)
    print(f"gate {stage}: {'PASSED at ' + setting(result.decode) if result.passed else 'FAILED'}"
          + ("" if result.passed else ": " + "; ".join(result.reasons)))
    return outcome


@flow(name="gate", log_prints=True)
def gate_flow(params: GateParams) -> dict:
    from prefect.runtime import flow_run

    recipe = get_recipe(params.recipe, params.overrides)
    block_size = checkpoint_ref(params.candidate).block_size
    if block_size is None:
        raise ValueError(f"{params.candidate} is not a block-diffusion checkpoint (no block size in bard.json)")
    stage = params.stage or f"B{block_size}"
    suite = Suite.of_gate(recipe.gate, tuple(params.include_paths))
    out = Path(params.out)
    (baseline,) = evaluate_task(params.baseline, suite, str(out / "AR"), "ar", None, None, params.recipe,
                                params.overrides, None)
    outcome = judge_stage(stage, block_size, params.candidate, baseline, params.baseline, suite, params.recipe,
                          params.overrides, out, params.registry, params.promote, str(flow_run.get_id() or ""))
    paths = write_report(out, recipe.name, baseline, [outcome])
    publish_report(paths)
    print(f"report {paths['report_md']}")
    if not outcome.result.passed:
        raise GateFailed(f"stage {stage} failed its gate: " + "; ".join(outcome.result.reasons), paths["report_md"])
    entry = registry.read(params.registry or registry.default_root(), recipe.name)["current"].get(stage) \
        if outcome.result.promoted_uri else None
    return {"stage": stage, "passed": True, "decode": outcome.result.decode, "promoted": entry,
            "report": paths["report_md"], "tradeoff": paths["tradeoff"]}
