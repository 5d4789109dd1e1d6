"""`bard ablate`: the ablation flow from the command line (thin, as `flows/cli.py`).

The default is CI-sized (two stages, short training, the paper's claims, a small world: about 7 minutes on
2 cores); ``--full`` is the real run (the recipe's schedule and steps, every variant, 300 items, 3 seeds).
Prints the claims' verdicts and the variants' table; the last line is one JSON object.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from flows.cli import UsageError, _pairs
from flows.cli_decode import _thresholds
from flows.local_server import ensure_flow_server

# the CI-sized default: B4 → B8 at 60 merge + 12 distill steps a stage, 400 conversations per source, 60 items
QUICK = {"block_sizes": [4, 8], "overrides": {"train.merge_steps": "60", "train.distill_steps": "12",
                                              "train.checkpoint_every": "30"},
         "limit": 60, "size": 400, "speed_taus": [0.5],
         "variants": ["direct", "teacher_ar", "teacher_none", "mask_noise", "no_correction"]}
FULL = {"seeds": 3, "limit": 300, "size": 3000, "speed_taus": [0.7, 0.5, 0.3]}


def ablation_params(args):
    from bard_core.ablations import VARIANTS
    from flows.ablation import AblationParams
    from flows.pipeline import WorldParams

    overrides = {} if args.full else dict(QUICK["overrides"])
    overrides.update(_pairs(args.set, "ablate", "--set"))
    blocks = args.block_sizes.split(",") if args.block_sizes else []
    if not all(b.strip().isdigit() for b in blocks):
        raise UsageError(f"bard ablate: --block-sizes expects comma-separated block sizes, got {args.block_sizes!r}")
    names = [n.strip() for n in args.variants.split(",")] if args.variants else None
    if names == ["all"]:
        names = list(VARIANTS)
    default = FULL if args.full else QUICK
    taus = default["speed_taus"]
    if args.speed_taus is not None:
        taus = _thresholds(args.speed_taus, "ablate") if args.speed_taus.strip() else []
    sources = _pairs(args.source, "ablate", "--source")
    for name, uri in sources.items():
        if "://" not in uri and not Path(uri).exists():
            raise UsageError(f"bard ablate: source {name}={uri}: no such file or directory")
    if sources and not args.include_path:
        raise UsageError("bard ablate: with --source, give the task YAMLs of the gate benchmarks (--include-path DIR)")
    try:
        return AblationParams(
            recipe=args.recipe, overrides=overrides,
            sources={n: u if "://" in u else str(Path(u).resolve()) for n, u in sources.items()},
            include_paths=[str(Path(d).resolve()) for d in args.include_path or []], seeds=args.seeds or default.get("seeds", 1),
            variants=names or (list(VARIANTS) if args.full else QUICK["variants"]),
            block_sizes=[int(b) for b in blocks] or ([] if args.full else QUICK["block_sizes"]),
            limit=args.limit or default["limit"], root=str(Path(args.root).resolve()), speed_taus=taus,
            world=WorldParams(seed=args.world_seed, size=args.world_size or default["size"]))
    except ValueError as exc:  # pydantic's validation errors are ValueErrors
        message = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)
        raise UsageError(f"bard ablate: {message}") from None


def cmd_ablate(args) -> int:
    from flows.ablation import (
        ablation_flow,
        not_run,
        run_dir,
        speed_curves,
        summarize,
        variant_runs,
        write_report,
    )

    params = ablation_params(args)
    try:
        runs = variant_runs(params)  # bad settings fail here, before minutes of work
        idle = not_run(params)
    except ValueError as exc:
        raise UsageError(f"bard ablate: {exc}") from None
    asked = [n for n in params.variants if n != "reference"]
    if asked and all(n in idle for n in asked):
        raise UsageError(f"bard ablate: on {params.recipe} every variant asked for would train and decode as the "
                         f"reference: " + "; ".join(f"{n}: {why}" for n, why in idle.items()))
    if args.dry_run:
        for name, why in idle.items():
            print(json.dumps({"variant": name, "not_run": why}))
        for name, seed, run in runs:
            print(json.dumps({"variant": name, "seed": seed, "block_sizes": run.block_sizes,
                              "overrides": run.overrides, "stage_overrides": run.stage_overrides}))
        return 0
    started = time.monotonic()
    if args.report_only:  # the report again from the runs under --root (e.g. after a change to the report)
        missing = [run.run_name for _, _, run in runs if not (run_dir(run) / "report.json").exists()]
        if missing:
            raise UsageError(f"bard ablate --report-only: no finished run {', '.join(missing)} under {params.root}")
        if params.speed_taus:  # the final stages at thresholds not yet measured: evaluation, no training
            ensure_flow_server()
            speed_curves(params, runs)
        summary = summarize(write_report(params, runs))
        if summary["older_runs"]:
            print(f"bard ablate --report-only: {', '.join(summary['older_runs'])} trained by other code or settings than "
                  "today's; reported as they are, and named so in the report", file=sys.stderr)
    else:
        ensure_flow_server()
        summary = ablation_flow(params)
    result = json.loads(Path(summary["json"]).read_text())
    if not args.json:
        print(Path(summary["report"]).read_text())
        print(f"report: {summary['report']}")
    print(json.dumps({"seconds": round(time.monotonic() - started, 1), "report": summary["report"],
                      "verdicts": summary["verdicts"], "older_runs": summary["older_runs"],
                      "variants": {r["variant"]: {k: r[k] for k in ("mean_score", "mean_score_sd", "max_drop", "tpf",
                                                                    "train_seconds")} for r in result["variants"]}}))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("ablate", help="the ablation flow: each claim's variant as a pipeline run at the same training "
                                      "budget, seeds, and a report of what held")
    p.add_argument("--recipe", default="tiny")
    p.add_argument("--source", action="append", metavar="NAME=URI", help="llava_ov=URI or finevision=URI "
                                                                         "(default: the shapes world)")
    p.add_argument("--include-path", action="append", help="directory of the gate benchmarks' task YAMLs")
    p.add_argument("--variants", default=None, help="comma-separated variants, or 'all' (default: the paper's claims; "
                                                    "--full: all)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 1; --full 3)")
    p.add_argument("--full", action="store_true", help="the real run: the recipe's schedule and steps, every variant, "
                                                       "300 items, 3 seeds (hours on 2 cores)")
    p.add_argument("--block-sizes", default=None, help="comma-separated reference schedule")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override for every variant")
    p.add_argument("--limit", type=int, default=None, help="items per shapes benchmark (default 60; --full 300)")
    p.add_argument("--root", default="ablation", help="runs, cache and report (default: ./ablation)")
    p.add_argument("--world-seed", type=int, default=11)
    p.add_argument("--world-size", type=int, default=None, help="clean conversations per source (default 400; "
                                                                "--full 3000)")
    p.add_argument("--dry-run", action="store_true", help="print every run's schedule and overrides, run nothing")
    p.add_argument("--speed-taus", default=None, metavar="T,T,...",
                   help="more decoding thresholds for each final stage, for the comparison at equal speed; '' for none "
                        "(default 0.5; --full 0.7,0.5,0.3)")
    p.add_argument("--report-only", action="store_true", help="write the report again from the finished runs under "
                                                              "--root, training nothing (final stages are evaluated "
                                                              "at the --speed-taus not yet measured)")
    p.add_argument("--json", action="store_true", help="print only the final JSON line")
    p.set_defaults(func=cmd_ablate)
