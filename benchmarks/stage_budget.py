"""The stage chain on a budget: the pipeline flow from the shipped tiny AR base, B4 → B8 → B16 → B32
(merge + distill, one Ray Train `fit()` per stage), every shapes benchmark for the AR base and each
stage through the gate's evaluation (lm-eval, the same engine, paired items). Reports per stage: steps,
training wall time (Ray overhead included), final loss, every score, the max paired drop (± se), and on
the speed benchmark (shapes_extract) TPF, tokens/s at batch 1 and at `--speed-batch`, and the speed-up
over the AR base measured beside it; whether every stage stays within `--tolerance` of the AR base.
Each `--ablate KEY=VALUE` runs the chain once more with that one setting changed (same world, data and
cache: stages whose inputs did not change are reused) and adds a row with its worst drop and final speed.

    python -m benchmarks.stage_budget [--recipe tiny] [--limit 300] [--seed 11] [--size 3000]
        [--steps 450:0,100:40,100:40,420:60] [--lr 2.5e-4,2e-4,2e-4,2e-4] [--speed-batch 16] [--ar-control]
        [--set noise.kind=mask] [--stage-set 16:train.base_pull=2] [--ablate train.long_share=0] [--work DIR]

Defaults: the recipe's own schedule and rates (`--recipe tiny-long`: issue 21's long profile). The chain is
the pipeline's (`benchmarks/chain.py`, gates opened so every stage is measured); each stage's row is the decode
setting the recipe's own gate promotes from its sweep (`tasks.report.rejudge`; `*`: none passes, the row is the fastest).
What the schedule depends on, measured, is in docs/stage_budget.md. `--seed` builds another shapes world to
check that a split is not tuned to one.
The last line printed is one JSON object (`train_seconds`: this run's; `step_seconds`: the stages' own training
steps, cached ones included; `max_drop`, `final_block_size`, `final_tpf_extract`, `speedup_batch1`,
`speedup_batch<N>`, `every_within`, the stages, the ablations, `overrides` and `stage_overrides`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bard_core.gate import paired, setting
from bard_core.recipes import get_recipe
from benchmarks.chain import chain_params, curated, parse_steps, run_chain
from flows.pipeline import world_dir
from tasks.report import chosen_entry, rejudge


def ar_control(work: Path, report: dict, steps: int, lr: float, overrides: dict, limit: int, tolerance: float,
               benchmarks: Path, recipe: str = "tiny") -> dict:
    """The AR base fine-tuned with its own next-token objective for `steps` at `lr` on the chain's data, and
    its paired drops against the chain's AR evaluation: how much plain fine-tuning on this data costs."""
    from tasks.evaluate import Suite, evaluate_checkpoint
    from tasks.refs import checkpoint_ref
    from tasks.train import run_stage

    settings = {**overrides, "train.lr": lr, "train.base_steps": str(steps)}
    started = time.monotonic()
    ref = run_stage(curated(report), checkpoint_ref(report["baseline"]["checkpoint"]), work / "AR-control", recipe,
                    settings, objective="ar")
    seconds = time.monotonic() - started
    gate = get_recipe(recipe).gate
    suite = Suite(gate.benchmarks, (str(benchmarks),), limit)
    (result,) = evaluate_checkpoint(ref.uri, suite, work / "AR-control-eval", mode="ar", recipe=recipe)
    baseline = json.loads((work / "chain" / "eval" / "AR" / "ar" / "eval.json").read_text())
    checks = []
    for name in gate.benchmarks:
        drop, se, n, _ = paired(baseline["items"][name], result.items[name])
        checks.append({"benchmark": name, "score": result.scores[name], "drop": drop, "se": se, "n": n})
    history = json.loads((Path(ref.uri) / "bard.json").read_text())["history"]
    tail = history[-max(1, len(history) // 10):]
    worst = max(checks, key=lambda c: c["drop"])
    return {"stage": "AR-ft", "tpf": 1.0, "train_seconds": seconds, "final_loss": sum(h["loss"] for h in tail) / len(tail),
            "within_tolerance": worst["drop"] <= tolerance, "steps": f"{steps}+0", "lr": lr,
            "worst": worst["benchmark"], "max_drop": worst["drop"], "max_drop_se": worst["se"],
            "scores": {c["benchmark"]: c["score"] for c in checks}, "drops": {c["benchmark"]: c["drop"] for c in checks}}


def stage_rows(report: dict, names: list[str], tolerance: float, batch: int) -> list[dict]:
    """One summary per stage of an annotated chain report (`benchmarks.chain.annotate`)."""
    rows = []
    for r in report["stages"]:
        checks = {c["benchmark"]: c for c in r["checks"] if c["benchmark"] in names}
        worst = max(checks.values(), key=lambda c: c["drop"])
        speed = chosen_entry(r)
        speedup = speed.get("speedup") or {}
        rows.append({"stage": r["stage"], "setting": setting(r["decode"]), "gate_passed": r.get("gate_passed"),
                     "block_size": r["block_size"], "lr": r["lr"],
                     "steps": r["steps"],
                     "train_seconds": r["train_seconds"], "step_seconds": r.get("step_seconds"),
                     "final_loss": r["final_loss"], "tpf": r["tpf"],
                     "tok_s_batch1": speed.get("tok_s_batch1"), f"tok_s_batch{batch}": speed.get("tok_s"),
                     "speedup_batch1": speedup.get("1"), f"speedup_batch{batch}": speedup.get(str(batch)),
                     "worst": worst["benchmark"], "max_drop": worst["drop"], "max_drop_se": worst["se"],
                     "within_tolerance": worst["drop"] <= tolerance,
                     "scores": {n: checks[n]["score"] for n in names},
                     "drops": {n: checks[n]["drop"] for n in names}, "drop_se": {n: checks[n]["se"] for n in names}})
    return rows


def chain_summary(report: dict, names: list[str], tolerance: float, batch: int) -> dict:
    """The chain's verdict: total training time, its worst drop over every stage and benchmark, and the
    final stage's block size, TPF and speed-ups (issue 21's figures)."""
    stages = stage_rows(report, names, tolerance, batch)
    final = stages[-1]
    return {"train_seconds": sum(s["train_seconds"] or 0 for s in stages),
            "step_seconds": sum(s["step_seconds"] or 0 for s in stages),
            "max_drop": max(s["max_drop"] for s in stages), "final_block_size": final["block_size"],
            "final_setting": final["setting"],
            "final_tpf_extract": final["tpf"], "speedup_batch1": final["speedup_batch1"],
            f"speedup_batch{batch}": final[f"speedup_batch{batch}"],
            "every_within": all(s["within_tolerance"] for s in stages), "stages": stages}


def _x(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(report: dict, summary: dict, names: list[str], batch: int, ablations: list[dict],
                control: dict | None) -> None:
    short = [n.removeprefix("shapes_") for n in names]
    print(f"{'stage':<22} {'steps':>9} {'train s':>7} {'step s':>7} {'loss':>6} " + " ".join(f"{n:>7}" for n in short)
          + f" {'max drop (±se)':>22} {'TPF':>5} {'tok/s b1':>8} {f'b{batch}':>7} {'× b1':>5} {f'× b{batch}':>5}")
    base, final = report["baseline"], summary["stages"][-1]

    def beside(key: str):  # the AR base's tokens/s measured beside the final stage (its × figures' reference)
        return final[f"tok_s_{key}"] / final[f"speedup_{key}"] if final.get(f"speedup_{key}") else None

    print(f"{'AR':<22} {'-':>9} {'-':>7} {'-':>7} {'-':>6} " + " ".join(f"{base['scores'][n]:>7.3f}" for n in names)
          + f" {'-':>22} {base['speed'].get('tpf', 1.0):>5.2f} {_x(beside('batch1'), '.0f'):>8}"
          + f" {_x(beside(f'batch{batch}'), '.0f'):>7} {'1.00':>5} {'1.00':>5}")
    for r in summary["stages"] + ([control] if control else []):
        label = f"{r['stage']} {r.get('setting', '')}" + (" *" if r.get("gate_passed") is False else "")
        print(f"{label.strip():<22} {r['steps']:>9} {r['train_seconds'] or 0:>7.0f} {_x(r.get('step_seconds'), '.0f'):>7} {r['final_loss']:>6.3f} "
              + " ".join(f"{r['scores'][n]:>7.3f}" for n in names)
              + f" {r['max_drop']:>7.3f} ±{_x(r['max_drop_se'], '.3f'):>5} {r['worst'][7:]:>7} {r['tpf']:>5.2f}"
              + f" {_x(r.get('tok_s_batch1'), '.0f'):>8} {_x(r.get(f'tok_s_batch{batch}'), '.0f'):>7}"
              + f" {_x(r.get('speedup_batch1'), '.2f'):>5} {_x(r.get(f'speedup_batch{batch}'), '.2f'):>5}")
    for a in ablations:  # the chain with one setting changed: its worst stage and its final speed
        f = a["stages"][-1]
        worst = max(a["stages"], key=lambda s: s["max_drop"])
        label = "abl " + ",".join(f"{k.split('.')[-1]}={v}" for k, v in a["set"].items())
        print(f"{label[:22]:<22} {'all':>9} {a['train_seconds']:>7.0f} {_x(a.get('step_seconds'), '.0f'):>7} {f['final_loss']:>6.3f} "
              + " ".join(f"{f['scores'][n]:>7.3f}" for n in names)
              + f" {worst['max_drop']:>7.3f} ±{_x(worst['max_drop_se'], '.3f'):>5} {worst['worst'][7:]:>7}"
              + f" {f['tpf']:>5.2f} {_x(f.get('tok_s_batch1'), '.0f'):>8} {_x(f.get(f'tok_s_batch{batch}'), '.0f'):>7}"
              + f" {_x(f.get('speedup_batch1'), '.2f'):>5} {_x(f.get(f'speedup_batch{batch}'), '.2f'):>5}")
    if control:
        print("AR-ft: the AR base fine-tuned with next-token CE for B4's steps at B4's rate on the same data (a control, "
              "outside the verdict)")
    print("setting: the one the recipe's own gate promotes from the stage's sweep; * no setting passes it (the "
          "row is the fastest)")
    print("AR tokens/s: measured beside the final stage (each stage's × is against the AR run beside it)")
    if ablations:
        print("abl rows: the whole chain again with that one setting changed; scores and speed of its final stage, "
              "max drop over all its stages")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="tiny", help="a recipe on the tiny base: tiny (the demo's) or tiny-long")
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
    parser.add_argument("--speed-batch", type=int, default=16,
                        help="the batch of the second speed measurement and of the evaluation (decode.batch_size)")
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one); a second run "
                                                     "with the same settings reuses its world, data and stages")
    parser.add_argument("--ar-control", action="store_true",
                        help="also fine-tune the AR base with its own next-token objective for the first stage's steps "
                             "and rate on the same data, and report its drops (a control row, outside the verdict)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for every stage, e.g. noise.kind=mask or train.vision_lr_scale=0.1")
    parser.add_argument("--stage-set", action="append", default=[], metavar="B:KEY=VALUE",
                        help="override for the stage at block size B only, e.g. 16:train.base_pull=2 (beats --set)")
    parser.add_argument("--ablate", action="append", default=[], metavar="KEY=VALUE",
                        help="run the chain again with this one override added (repeatable: one chain each)")
    args = parser.parse_args(argv)
    bad = [kv for kv in args.set + args.ablate if "=" not in kv]
    bad += [kv for kv in args.stage_set if "=" not in kv or not kv.split(":", 1)[0].isdigit()]
    if bad:
        parser.error(f"--set / --ablate expect KEY=VALUE, --stage-set B:KEY=VALUE; got {bad[0]!r}")
    stage_sets: dict[int, dict[str, str]] = {}
    for kv in args.stage_set:
        block, pair = kv.split(":", 1)
        stage_sets.setdefault(int(block), {}).update([pair.split("=", 1)])
    extra = dict(kv.split("=", 1) for kv in args.set)
    if "train.lr" in extra:
        parser.error("set the merge learning rate with --lr (one, or one per stage), not --set train.lr")
    if args.speed_batch < 1:
        parser.error("--speed-batch must be at least 1")
    extra.setdefault("decode.batch_size", str(args.speed_batch))
    ablations = [dict([kv.split("=", 1)]) for kv in args.ablate]
    try:  # bad values fail here, before minutes of synthesis and curation
        recipe = get_recipe(args.recipe, extra)
        batch = recipe.decode.batch_size
        steps = parse_steps(args.steps) if args.steps else None
        lrs = [float(x) for x in args.lr.split(",")] if args.lr else None
        settings = dict(seed=args.seed, size=args.size, limit=args.limit, threshold=args.threshold, steps=steps,
                        lrs=lrs, overrides=extra, stage_sets=stage_sets, recipe=args.recipe)
        chain_params(args.work or "unused", **settings)
        for change in ablations:
            chain_params(args.work or "unused", **{**settings, "overrides": {**extra, **change}})
    except (KeyError, ValueError, TypeError) as e:
        parser.error(f"--steps / --lr / --set / --stage-set / --ablate: {e}")

    work = Path(args.work or tempfile.mkdtemp(prefix="stage_budget_")).resolve()
    started = time.monotonic()
    report = rejudge(run_chain(work, **settings), recipe.gate)  # each stage's row: what the recipe's gate promotes
    names = list(recipe.gate.benchmarks)
    summary = chain_summary(report, names, args.tolerance, batch)
    abl = []
    for i, change in enumerate(ablations):
        other = rejudge(run_chain(work, **{**settings, "overrides": {**extra, **change}, "run_name": f"ablate-{i}"}),
                        get_recipe(args.recipe, {**extra, **change}).gate)
        abl.append({"set": change, **chain_summary(other, names, args.tolerance, batch)})
    wall = time.monotonic() - started
    control = None
    if args.ar_control:
        first = report["stages"][0]
        params = chain_params(work, **settings)
        control = ar_control(work, report, sum(int(x) for x in first["steps"].split("+")), first["lr"], extra,
                             args.limit, args.tolerance, world_dir(params.root, params.world) / "benchmarks",
                             args.recipe)
    print(f"stage budget — recipe {args.recipe} through the pipeline flow, {args.limit} items per benchmark, "
          f"tau={args.threshold}, world {args.seed}; speed on {recipe.gate.speed_benchmark} at batch 1 and {batch}, "
          f"× = tokens/s over the AR base's, same engine, same run")
    print_table(report, summary, names, batch, abl, control)
    print(f"training wall time {summary['train_seconds']:.0f}s (the stages' steps, cached ones too: "
          f"{summary['step_seconds']:.0f}s), whole run {wall:.0f}s; every stage within "
          f"{args.tolerance:.2f} of AR: {summary['every_within']}; final B{summary['final_block_size']} TPF "
          f"{summary['final_tpf_extract']:.2f}, {_x(summary['speedup_batch1'], '.2f')}× AR at batch 1, "
          f"{_x(summary[f'speedup_batch{batch}'], '.2f')}× at batch {batch}")
    print(json.dumps({**summary, "seconds": wall, "timing": report["timing"], "tolerance": args.tolerance,
                      "items_per_benchmark": args.limit, "seed": args.seed, "recipe": args.recipe, "overrides": extra,
                      "stage_overrides": {str(b): o for b, o in sorted(stage_sets.items())},
                      "ar": report["baseline"]["scores"], "ablations": abl, "ar_control": control,
                      "report": str(work / "chain" / "report.md"), "work": str(work)}))


if __name__ == "__main__":
    main()
