"""`bard eval`, `bard gate` and `bard registry`: the evaluation side of the command line (thin, as `flows/cli.py`:
parse, check, call one flow or function; `bard generate` and `bard bench-decode`: `flows/cli_decode.py`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flows.cli import UsageError, _emit, _existing_dir, _pairs
from flows.cli_decode import _thresholds
from flows.local_server import ensure_flow_server


def _recipe(name: str, overrides: dict, command: str):
    from bard_core.recipes import get_recipe

    try:
        return get_recipe(name, overrides)
    except ValueError as exc:
        raise UsageError(f"bard {command}: {exc}") from None


def _include_paths(paths: list[str] | None, command: str) -> list[str]:
    for path in paths or []:
        if not Path(path).is_dir():
            raise UsageError(f"bard {command}: --include-path {path}: not a directory")
    return [str(Path(p).resolve()) for p in paths or []]


def _known_tasks(include: list[str], names: tuple[str, ...], command: str) -> None:
    from tasks.evaluate import task_manager

    try:
        task_manager(tuple(include), names)
    except ValueError as exc:
        raise UsageError(f"bard {command}: {exc}") from None


def _check_decode(decode: dict, model: Path, mode: str | None) -> None:
    """Decode settings are DecodeConfig fields (its ``mode`` as ``decode_mode``); block decoding needs a block size."""
    from bard_core.checkpoint import read_meta, untagged_stage
    from bard_core.config import DecodeConfig

    fields = {f.name for f in dataclasses.fields(DecodeConfig)} - {"mode"} | {"decode_mode"}
    unknown = sorted(set(decode) - fields)
    if unknown:
        raise UsageError(f"bard eval: --set {unknown[0]}: not a decode setting; valid: {', '.join(sorted(fields))}")
    meta = read_meta(model)
    if mode in ("diffusion", "speculative") and not meta.get("block_size") and "block_size" not in decode:
        raise UsageError(f"bard eval: --mode {mode}: {model} is an AR checkpoint; give --set block_size=B to "
                         "decode it in blocks anyway")
    if mode != "ar" and untagged_stage(meta):
        raise UsageError(f"bard eval: {model} is {untagged_stage(meta)}")


def cmd_eval(args) -> int:
    model = _existing_dir(args.model, "eval", "--model")
    if args.ar_model:
        _existing_dir(args.ar_model, "eval", "--ar-model")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"bard eval: --limit must be positive (got {args.limit})")
    recipe = _recipe(args.recipe, {}, "eval")
    names = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else recipe.gate.benchmarks
    include = _include_paths(args.include_path, "eval")
    thresholds = _thresholds(args.threshold, "eval") if args.threshold else []
    decode = _pairs(args.set, "eval", "--set")
    _check_decode(decode, model, args.mode)
    if args.verifier and args.mode != "speculative":
        raise UsageError("bard eval: --verifier is for --mode speculative")
    if args.verifier:
        _existing_dir(args.verifier, "eval", "--verifier")
    _known_tasks(include, names, "eval")
    from flows.evaluate import EvalParams, evaluate_flow

    ensure_flow_server()
    result = evaluate_flow(EvalParams(model=str(model.resolve()), out=str(Path(args.out).resolve()),
                                      tasks=list(names), include_paths=include, mode=args.mode,
                                      verifier=str(Path(args.verifier).resolve()) if args.verifier else None,
                                      ar_model=args.ar_model, recipe=args.recipe, limit=args.limit,
                                      thresholds=thresholds, decode=decode))
    lines = [f"evaluated {model} ({result['mode']}) -> {args.out}"]
    for r in result["reports"]:
        lines.append(f"  {r['label']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["scores"].items()))
        speed = r["speed"]
        if speed:
            batch = speed.get("batch", {})
            line = f"    {speed['benchmark']}: TPF {speed['tpf']:.2f}, " + ", ".join(
                f"{v['tok_s']:.0f} tok/s at batch {k}" for k, v in batch.items())
            if speed.get("speedup"):
                line += " (" + ", ".join(f"{v:.2f}x AR at batch {k}" for k, v in speed["speedup"].items()) + ")"
            lines.append(line)
        h = r["harness"]
        lines.append(f"    harness: lm-eval {h['total_s']:.1f} s, engine {h['engine_s']:.1f} s, prompts "
                     f"{h['encode_s']:.1f} s: overhead {100 * h['overhead']:.0f}% of the engine's time")
    _emit(result, args.json, lines)
    return 0


def cmd_gate(args) -> int:
    candidate = _existing_dir(args.candidate, "gate", "--candidate")
    baseline = _existing_dir(args.baseline, "gate", "--baseline")
    overrides = _pairs(args.set, "gate", "--set")
    recipe = _recipe(args.recipe, overrides, "gate")
    include = _include_paths(args.include_path, "gate")
    from bard_core.checkpoint import read_meta, untagged_stage
    from bard_core.gate import setting
    from tasks.refs import checkpoint_ref

    if untagged_stage(read_meta(candidate)):
        raise UsageError(f"bard gate: --candidate {candidate} is {untagged_stage(read_meta(candidate))}")
    if checkpoint_ref(candidate).block_size is None:
        raise UsageError(f"bard gate: --candidate {candidate} is not a block-diffusion checkpoint (no block size)")
    _known_tasks(include, recipe.gate.benchmarks, "gate")
    from flows.evaluate import GateFailed, GateParams, gate_flow

    params = GateParams(candidate=str(candidate.resolve()), baseline=str(baseline.resolve()),
                        out=str(Path(args.out).resolve()), recipe=args.recipe, overrides=overrides,
                        include_paths=include, stage=args.stage, promote=not args.no_promote, registry=args.registry)
    try:
        ensure_flow_server()
        result = gate_flow(params)
    except GateFailed as exc:
        _emit({"passed": False, "reasons": str(exc), "report": exc.report}, args.json,
              [f"GATE FAILED: {exc}", f"report: {exc.report}"])
        return 1
    where = result["promoted"]["uri"] if result["promoted"] else "not promoted (--no-promote)"
    _emit(result, args.json, [f"gate {result['stage']} PASSED at {setting(result['decode'])}",
                              f"promoted: {where}", f"report: {result['report']}"])
    return 0


def cmd_registry(args) -> int:
    from tasks import registry

    root = Path(args.root).resolve() if args.root else registry.default_root()
    names = [args.recipe] if args.recipe else registry.recipes(root)
    state = {name: registry.read(root, name) for name in names}
    lines = [f"registry {root}"] if names else [f"registry {root}: nothing promoted yet"]
    for name, s in state.items():
        lines.append(f"  {name}: {len(s['history'])} promotion(s)")
        for e in s["history"]:
            lines.append(f"    {e['time']}  {e['stage']:<5} tau={e['decode'].get('threshold')}  "
                         f"TPF {e['speed'].get('tpf', float('nan')):.2f}  {e['uri']}")
    _emit({"root": str(root), "recipes": state}, args.json, lines)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on lm-eval tasks with the bard model, plus decode speed")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--ar-model", default=None, help="AR base: its decode speed is measured beside the model's")
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval task or group names, built in or from "
                                                 "--include-path (default: the recipe's gate benchmarks)")
    p.add_argument("--include-path", action="append", help="directory of lm-eval task YAMLs (repeatable), e.g. "
                                                           "the benchmarks/ of `bard synth`")
    p.add_argument("--mode", choices=["ar", "diffusion", "speculative"], default=None,
                   help="default: diffusion for a block-diffusion checkpoint, else ar; speculative: lossless (the "
                        "greedy answers of --verifier, default the model's own)")
    p.add_argument("--verifier", default=None, help="--mode speculative: verify with this model (e.g. the AR base)")
    p.add_argument("--limit", type=int, default=None, help="items per task (default: the recipe's gate.limit)")
    p.add_argument("--threshold", default=None, help="comma-separated decode thresholds to evaluate (a sweep)")
    p.add_argument("--recipe", default="tiny")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="a DecodeConfig field, e.g. block_size=8")
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("gate", help="a stage's gate: AR baseline and candidate in one run, threshold sweep, verdict, "
                                    "promotion, report (exit 1 when it fails)")
    p.add_argument("--candidate", required=True, help="the stage's checkpoint")
    p.add_argument("--baseline", required=True, help="the AR base")
    p.add_argument("--recipe", default="tiny")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override, e.g. gate.limit=100")
    p.add_argument("--include-path", action="append", help="directory of the gate benchmarks' task YAMLs")
    p.add_argument("--stage", default=None, help="stage name (default: B<block size>)")
    p.add_argument("--no-promote", action="store_true", help="judge only; leave the registry alone")
    p.add_argument("--registry", default=None, help="registry root (default: $BARD_REGISTRY or ./registry)")
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("registry", help="list promoted stages")
    p.add_argument("--recipe", default=None)
    p.add_argument("--root", default=None, help="registry root (default: $BARD_REGISTRY or ./registry)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_registry)
