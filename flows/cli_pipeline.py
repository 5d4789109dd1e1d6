"""`bard demo` and `bard pipeline`: the pipeline flow from the command line (thin, as `flows/cli.py`).

Both print a summary table (the AR base and every gated stage: scores, TPF, tokens/s, verdict) and the
report's path; the last line is one JSON object with ``seconds``, ``promoted`` and ``report``. Exit 0 only
when every stage of the schedule was promoted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bard_core.gate import setting
from flows.cli import UsageError, _pairs
from flows.local_server import ensure_flow_server
from tasks.report import chosen_entry


def _summary(report: dict, seconds: float) -> list[str]:
    names = report["benchmarks"]
    short = [n.removeprefix("shapes_")[:8] for n in names]
    lines = [f"{'stage':<6} {'verdict':<9} {'setting':>7} " + " ".join(f"{n:>8}" for n in short)
             + f" {'TPF':>5} {'tok/s b1':>8} {'tok/s bN':>8} {'lossless b1':>11}"]
    base = report["baseline"]
    batch = base["speed"].get("batch", {})
    lines.append(f"{'AR':<6} {'baseline':<9} {'-':>7} " + " ".join(f"{base['scores'][n]:>8.3f}" for n in names)
                 + f" {base['speed'].get('tpf', 0):>5.2f} {batch.get('1', {}).get('tok_s', 0):>8.0f} "
                 + f"{max(batch.items(), key=lambda kv: int(kv[0]))[1]['tok_s'] if batch else 0:>8.0f}")
    for stage in report["stages"]:
        chosen = chosen_entry(stage) or None
        scores = chosen["scores"] if chosen else {}
        lines.append(f"{stage['stage']:<6} {'promoted' if stage['passed'] else 'FAILED':<9} "
                     f"{setting(stage['decode']):>7} " + " ".join(f"{scores.get(n, float('nan')):>8.3f}"
                                                                            for n in names)
                     + f" {stage['tpf'] or 0:>5.2f} {(chosen or {}).get('tok_s_batch1') or 0:>8.0f} "
                     + f"{(chosen or {}).get('tok_s') or 0:>8.0f} {_lossless(stage):>11}")
        lines += [f"       why: {reason}" for reason in stage["reasons"][:3]]
    timing = report.get("timing", {})
    lines.append("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timing.items()) + f" (wall {seconds:.0f} s)")
    return lines


def _lossless(stage: dict) -> str:
    """The lossless mode beside a stage: its batch-1 tokens/s and speed-up over AR (`tasks.evaluate._lossless`,
    measured beside each block-decoding setting)."""
    lossless = next((e["lossless"] for e in [chosen_entry(stage), *stage["sweep"]] if e and e.get("lossless")), None)
    if not lossless:
        return "-"
    flag = "" if lossless["identical"] == 1.0 else " DIFFERS"
    return f"{lossless['batch']['1']['tok_s']:.0f} {lossless['speedup'].get('1', 0):.2f}x{flag}"


def _run(params, as_json: bool) -> int:
    from flows.evaluate import GateFailed
    from flows.pipeline import pipeline_flow

    started = time.monotonic()
    try:
        ensure_flow_server()
        result = pipeline_flow(params)
        report_md = result["report"]
    except GateFailed as exc:
        report_md = exc.report
    seconds = time.monotonic() - started
    report = json.loads((Path(report_md).parent / "report.json").read_text())
    promoted = report["promoted"]
    done = report["passed"] and promoted == report.get("schedule", promoted)
    payload = {"seconds": round(seconds, 1), "promoted": promoted, "report": report_md, "passed": done,
               "run": report.get("run"), "timing": report.get("timing", {})}
    if not as_json:
        print("\n".join(_summary(report, seconds) + [f"report: {report_md}"]))
    print(json.dumps(payload))
    return 0 if done else 1


def _world(args):
    from flows.pipeline import WorldParams

    if args.world_size < 20 or args.world_bench_size < 4:
        raise UsageError("bard: --world-size must be >= 20 and --world-bench-size >= 4")
    return WorldParams(seed=args.world_seed, size=args.world_size, bench_size=args.world_bench_size)


def cmd_demo(args) -> int:
    from flows.pipeline import PipelineParams

    root = Path(args.root).resolve()
    params = PipelineParams(recipe="tiny", root=str(root), run_name=args.run_name,
                            registry=args.registry or str(root / "registry"), world=_world(args))
    return _run(params, args.json)


def pipeline_params(args, command: str = "pipeline"):
    """The PipelineParams of `bard pipeline`'s arguments (shared with `bard ui`); bad ones are usage errors."""
    from bard_core.recipes import get_recipe
    from flows.pipeline import PipelineParams

    prefix = f"bard {command}"
    overrides = _pairs(args.set, command, "--set")
    stage_overrides: dict[int, dict[str, str]] = {}
    for item in args.stage_set or []:
        block, sep, pair = item.partition(":")
        if not sep or not block.isdigit() or "=" not in pair:
            raise UsageError(f"{prefix}: --stage-set expects B:KEY=VALUE, got {item!r}")
        stage_overrides.setdefault(int(block), {}).update(_pairs([pair], command, "--stage-set"))
    blocks = args.block_sizes.split(",") if args.block_sizes else []
    if not all(b.strip().isdigit() for b in blocks):
        raise UsageError(f"{prefix}: --block-sizes expects comma-separated block sizes, got {args.block_sizes!r}")
    schedule = [int(b) for b in blocks]
    try:
        recipe = get_recipe(args.recipe, overrides)
        for B in schedule or recipe.train.block_sizes:
            get_recipe(args.recipe, {**overrides, **stage_overrides.get(B, {})})
    except ValueError as exc:
        raise UsageError(f"{prefix}: {exc}") from None
    sources = _pairs(args.source, command, "--source")
    for name, uri in sources.items():
        if "://" not in uri and not Path(uri).exists():
            raise UsageError(f"{prefix}: source {name}={uri}: no such file or directory")
    sources = {name: uri if "://" in uri else str(Path(uri).resolve()) for name, uri in sources.items()}
    from bard_core.shapes.metrics import BENCHMARKS as SHAPES

    world_benchmarks = [b for b in recipe.gate.benchmarks if b in SHAPES]  # their YAMLs live in a shapes world
    if sources and world_benchmarks and not args.include_path:
        raise UsageError(f"{prefix}: with --source, give the task YAMLs of the gate benchmarks "
                         f"{', '.join(world_benchmarks)} (--include-path WORLD/benchmarks)")
    unknown = set(stage_overrides) - set(schedule or recipe.train.block_sizes)
    if unknown:
        raise UsageError(f"{prefix}: --stage-set for block sizes {sorted(unknown)} outside the schedule")
    try:
        return PipelineParams(recipe=args.recipe, sources=sources, include_paths=[str(Path(p).resolve())
                                                                                for p in args.include_path or []],
                              block_sizes=schedule, overrides=overrides, stage_overrides=stage_overrides,
                              root=str(Path(args.root).resolve()), run_name=args.run_name, registry=args.registry,
                              world=_world(args))
    except ValueError as exc:  # pydantic's validation errors are ValueErrors
        message = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)
        raise UsageError(f"{prefix}: {message}") from None


def cmd_pipeline(args) -> int:
    return _run(pipeline_params(args), args.json)


def _common(p) -> None:
    p.add_argument("--root", default="runs", help="run directories and the cache (default: ./runs)")
    p.add_argument("--run-name", default=None, help="this run's directory name (default: time and run id)")
    p.add_argument("--world-seed", type=int, default=11, help="shapes world seed (when no --source is given)")
    p.add_argument("--world-size", type=int, default=3000, help="clean conversations per source")
    p.add_argument("--world-bench-size", type=int, default=300, help="images per shapes benchmark")
    p.add_argument("--json", action="store_true", help="print only the final JSON line")


def cmd_recipe(args) -> int:
    """A recipe's settings that depart from METHOD.md or its reference, each with its reason (and --set overrides)."""
    from bard_core.recipe_audit import explain, reference, table
    from bard_core.recipes import get_recipe
    from flows.cli import UsageError, _emit, _pairs

    overrides = _pairs(args.set, "recipe", "--set")
    try:
        named = get_recipe(args.name)
        rows = explain(get_recipe(args.name, overrides), named)
    except ValueError as exc:
        raise UsageError(f"bard recipe: {exc}") from None
    _emit({"recipe": args.name, "overrides": overrides, "settings": rows}, args.json,
          [f"recipe {args.name}: settings that depart from METHOD.md or from {reference(named)[0]}, and why",
           table(rows)])
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("recipe", help="what a recipe departs from (METHOD.md, the tiny recipe) and why")
    p.add_argument("name", help="tiny, tiny-long, qwen3-vl-2b, qwen3-vl-4b, qwen3-vl-8b")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="an override, shown as such")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_recipe)

    p = sub.add_parser("demo", help="the whole pipeline on the built-in shapes world (offline, CPU): curate, the "
                                    "shipped AR base, B4 -> B8 -> B16 -> B32 with gates, report")
    _common(p)
    p.add_argument("--registry", default=None, help="registry root (default: ROOT/registry)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("pipeline", help="the pipeline flow for a recipe: curate, AR base, stages with gates, report")
    pipeline_arguments(p)
    p.set_defaults(func=cmd_pipeline)


def pipeline_arguments(p) -> None:
    p.add_argument("--recipe", default="tiny")
    p.add_argument("--source", action="append", metavar="NAME=URI", help="llava_ov=URI or finevision=URI "
                                                                         "(default: the shapes world)")
    p.add_argument("--include-path", action="append", help="directory of the gate benchmarks' task YAMLs")
    p.add_argument("--block-sizes", default=None, help="comma-separated schedule (default: the recipe's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override for every stage")
    p.add_argument("--stage-set", action="append", metavar="B:KEY=VALUE", help="override for stage B only")
    p.add_argument("--registry", default=None, help="registry root (default: $BARD_REGISTRY or ./registry)")
    _common(p)
