"""The stage chain on a budget: the pipeline flow from the shipped tiny AR base, B4 → B8 → B16 → B32
(merge + distill, one Ray Train `fit()` per stage), every shapes benchmark for the AR base and each
stage through the gate's evaluation (lm-eval, the same engine, paired items). Reports steps, training
wall time (Ray overhead included), final loss, scores and paired drops per stage, and whether every
stage stays within `--tolerance` of the AR base.

    python -m benchmarks.stage_budget [--limit 300] [--seed 11] [--size 3000] [--steps 450:0,100:40,100:40,420:60]
        [--lr 2.5e-4,2e-4,2e-4,2e-4] [--ar-control] [--set noise.kind=mask] [--work DIR]

Defaults: the tiny recipe's own schedule and rates. The chain is the pipeline's (`benchmarks/chain.py`,
gates opened so every stage is measured); what the schedule depends on, measured, is in
docs/stage_budget.md. `--seed` builds another shapes world to check that a split is not tuned to one.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bard_core.gate import paired
from bard_core.recipes import get_recipe
from benchmarks.chain import chain_params, curated, parse_steps, run_chain
from flows.pipeline import world_dir


def ar_control(work: Path, report: dict, steps: int, lr: float, overrides: dict, limit: int, tolerance: float,
               benchmarks: Path) -> dict:
    """The AR base fine-tuned with its own next-token objective for `steps` at `lr` on the chain's data, and
    its paired drops against the chain's AR evaluation: how much plain fine-tuning on this data costs."""
    from tasks.evaluate import Suite, evaluate_checkpoint
    from tasks.refs import checkpoint_ref
    from tasks.train import run_stage

    settings = {**overrides, "train.lr": lr, "train.base_steps": str(steps)}
    started = time.monotonic()
    ref = run_stage(curated(report), checkpoint_ref(report["baseline"]["checkpoint"]), work / "AR-control", "tiny",
                    settings, objective="ar")
    seconds = time.monotonic() - started
    gate = get_recipe("tiny").gate
    suite = Suite(gate.benchmarks, (str(benchmarks),), limit)
    (result,) = evaluate_checkpoint(ref.uri, suite, work / "AR-control-eval", mode="ar", recipe="tiny")
    baseline = json.loads((work / "chain" / "eval" / "AR" / "ar" / "eval.json").read_text())
    checks = []
    for name in gate.benchmarks:
        drop, se, n, _ = paired(baseline["items"][name], result.items[name])
        checks.append({"benchmark": name, "score": result.scores[name], "drop": drop, "se": se, "n": n})
    history = json.loads((Path(ref.uri) / "bard.json").read_text())["history"]
    tail = history[-max(1, len(history) // 10):]
    return {"stage": "AR-ft", "checks": checks, "tpf": 1.0, "train_seconds": seconds,
            "final_loss": sum(h["loss"] for h in tail) / len(tail),
            "passed": max(c["drop"] for c in checks) <= tolerance, "steps": f"{steps}+0", "lr": lr}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default=None, help="merge:distill steps for B4,B8,B16,B32 (default: the recipe's)")
    parser.add_argument("--lr", default=None, help="merge learning rate (train.lr): one for every stage, or one per "
                                                   "stage (default: the recipe's); vision and distillation rates "
                                                   "follow it (train.vision_lr_scale, train.distill_lr_scale)")
    parser.add_argument("--limit", type=int, default=300, help="items per benchmark")
    parser.add_argument("--size", type=int, default=3000,
                        help="clean conversations per source (two sources: 3000 gives ~6000 curated rows)")
    parser.add_argument("--seed", type=int, default=11, help="seed of the shapes world (sources and benchmark items)")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--tolerance", type=float, default=0.03)
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one); a second run "
                                                     "with the same settings reuses its world, data and stages")
    parser.add_argument("--ar-control", action="store_true",
                        help="also fine-tune the AR base with its own next-token objective for the first stage's steps "
                             "and rate on the same data, and report its drops (a control row, outside the verdict)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="tiny-recipe override for every stage, e.g. noise.kind=mask or train.vision_lr_scale=0.1")
    args = parser.parse_args(argv)
    bad = [kv for kv in args.set if "=" not in kv]
    if bad:
        parser.error(f"--set expects KEY=VALUE, got {bad[0]!r}")
    extra = dict(kv.split("=", 1) for kv in args.set)
    if "train.lr" in extra:
        parser.error("set the merge learning rate with --lr (one, or one per stage), not --set train.lr")
    try:  # bad values fail here, before minutes of synthesis and curation
        recipe = get_recipe("tiny", extra)
        steps = parse_steps(args.steps) if args.steps else None
        lrs = [float(x) for x in args.lr.split(",")] if args.lr else None
        settings = dict(seed=args.seed, size=args.size, limit=args.limit, threshold=args.threshold, steps=steps,
                        lrs=lrs, overrides=extra)
        chain_params(args.work or "unused", **settings)
    except (KeyError, ValueError, TypeError) as e:
        parser.error(f"--steps / --lr / --set: {e}")

    work = Path(args.work or tempfile.mkdtemp(prefix="stage_budget_")).resolve()
    started = time.monotonic()
    report = run_chain(work, **settings)
    wall = time.monotonic() - started
    rows = report["stages"]
    control = None
    if args.ar_control:
        first = rows[0]
        params = chain_params(work, **settings)
        control = ar_control(work, report, sum(int(x) for x in first["steps"].split("+")), first["lr"], extra,
                             args.limit, args.tolerance, world_dir(params.root, params.world) / "benchmarks")
    names = list(recipe.gate.benchmarks)
    print(f"stage budget — tiny recipe through the pipeline flow, {args.limit} items per benchmark, "
          f"tau={args.threshold}, world {args.seed}")
    print(f"{'stage':<6} {'lr':>8} {'steps':>9} {'train s':>8} {'loss':>6} " + " ".join(f"{n[7:]:>8}" for n in names)
          + f" {'max drop (±se)':>22} {'TPF ext':>7}")
    base = report["baseline"]
    print(f"{'AR':<6} {'-':>8} {'-':>9} {'-':>8} {'-':>6} " + " ".join(f"{base['scores'][n]:>8.3f}" for n in names)
          + f" {'-':>22} {base['speed'].get('tpf', 1.0):>7.2f}")
    summary = []
    for r in rows + ([control] if control else []):
        checks = {c["benchmark"]: c for c in r["checks"]}
        worst = max(checks.values(), key=lambda c: c["drop"])
        print(f"{r['stage']:<6} {r['lr']:>8.2g} {r['steps']:>9} {r['train_seconds'] or 0:>8.0f} {r['final_loss']:>6.3f} "
              + " ".join(f"{checks[n]['score']:>8.3f}" for n in names)
              + f" {worst['drop']:>7.3f} ±{worst['se']:.3f} {worst['benchmark'][7:]:>7} {r['tpf']:>7.2f}")
        summary.append({"stage": r["stage"], "lr": r["lr"], "steps": r["steps"], "train_seconds": r["train_seconds"],
                        "final_loss": r["final_loss"], "tpf": r["tpf"], "worst": worst["benchmark"],
                        "max_drop": worst["drop"], "within_tolerance": worst["drop"] <= args.tolerance,
                        "scores": {n: checks[n]["score"] for n in names},
                        "drops": {n: checks[n]["drop"] for n in names}, "drop_se": {n: checks[n]["se"] for n in names}})
    if control:
        print("AR-ft: the AR base fine-tuned with next-token CE for B4's steps at B4's rate on the same data (a control, "
              "outside the verdict)")
    stages = [s for s in summary if s["stage"] != "AR-ft"]
    train_total = sum(s["train_seconds"] or 0 for s in stages)
    print(f"training wall time {train_total:.0f}s, whole run {wall:.0f}s; every stage within {args.tolerance:.2f} of AR: "
          f"{all(s['within_tolerance'] for s in stages)}")
    print(json.dumps({"total_train_seconds": train_total, "seconds": wall, "timing": report["timing"],
                      "all_within_tolerance": all(s["within_tolerance"] for s in stages), "tolerance": args.tolerance,
                      "items_per_benchmark": args.limit, "seed": args.seed, "overrides": extra,
                      "ar": base["scores"], "stages": stages, "ar_control": summary[-1] if control else None,
                      "report": str(work / "chain" / "report.md"), "work": str(work)}))


if __name__ == "__main__":
    main()
