"""`bard generate`, `bard bench-decode`, `bard eval`, `bard gate` and `bard registry`: the decoding and
evaluation side of the command line (thin, as `flows/cli.py`: parse, check, call one flow or function)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from flows.cli import UsageError, _emit, _existing_dir, _pairs
from flows.local_server import ensure_flow_server


def _thresholds(text: str, command: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        raise UsageError(f"bard {command}: --threshold expects comma-separated numbers, got {text!r}") from None
    if not all(0 <= v <= 1 for v in values):
        raise UsageError(f"bard {command}: thresholds must lie in [0, 1], got {text!r}")
    return values


def add_decode_flags(p, skip: tuple[str, ...] = ()) -> None:
    """One flag per `DecodeConfig` field (its type, choices and help), default None: the checkpoint's promoted
    setting, else its recipe's (`checkpoint.decode_config`)."""
    from bard_core.config import DecodeConfig

    kinds = {"int": int, "float": float, "str": str, "int | None": int}
    for f in dataclasses.fields(DecodeConfig):
        if f.name in skip:
            continue
        flag, helptext = "--" + f.name.replace("_", "-"), f"{f.metadata['help']} (default: the checkpoint's promoted setting, else its recipe's, else {f.default})"
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            p.add_argument(flag, type=kinds[f.type], choices=f.metadata.get("choices"), default=None, help=helptext)


def decode_flags(args, skip: tuple[str, ...] = ()) -> dict:
    """The decode flags that were given (`add_decode_flags` with the same `skip`), by field name."""
    from bard_core.config import DecodeConfig

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(DecodeConfig)
            if f.name not in skip and getattr(args, f.name, None) is not None}


def cmd_generate(args) -> int:
    from PIL import Image

    from bard_core import checkpoint
    from bard_core.decode import ar_generate_cached, generate
    from bard_core.inputs import context_messages, encode_prompt

    model_dir = _existing_dir(args.model, "generate", "--model")
    images = []
    for path in args.image or []:
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"bard generate: cannot read image {path!r}: {exc}") from None
    meta = checkpoint.read_meta(model_dir)
    ar = args.ar or (args.block_size is None and not meta.get("block_size"))
    if not ar and checkpoint.untagged_stage(meta):  # before minutes of loading
        raise UsageError(f"bard generate: {model_dir} is {checkpoint.untagged_stage(meta)}")
    if args.verifier and args.mode != "speculative":
        raise UsageError("bard generate: --verifier is for --mode speculative")
    device = _device(args, "generate")
    model, processor, meta = checkpoint.load(model_dir)
    model.to(device)
    try:  # the checkpoint's promoted decode setting, then the flags that were given
        cfg = checkpoint.decode_config(meta, None, **decode_flags(args))
        ids = checkpoint.token_ids(processor.tokenizer, meta, require_mask=not ar)
        enc = encode_prompt(context_messages(args.prompt, len(images)), images, processor)
    except ValueError as exc:
        raise UsageError(f"bard generate: {exc}") from None
    if ar:
        (g,) = ar_generate_cached(model, [enc], cfg.max_new_tokens, ids)
        decoder = "ar"
    elif cfg.mode == "speculative":
        try:  # given, or the AR base a stage promoted as its drafter is verified by
            path = args.verifier or checkpoint.promoted_verifier(meta, model_dir)
        except ValueError as exc:
            raise UsageError(f"bard generate: {exc}") from None
        verifier = checkpoint.load(_existing_dir(path, "generate", "--verifier"))[0].to(device) if path else None
        (g,) = generate(model, [enc], cfg, ids, verifier=verifier)
        decoder = f"speculative B={cfg.block_size} (lossless: the greedy answer of {path or 'these weights'})"
    else:
        (g,) = generate(model, [enc], cfg, ids)
        decoder = f"block-diffusion B={cfg.block_size} tau={cfg.threshold:g} fallback={cfg.fallback}"
        decoder += "" if cfg.sure_eos else " unsure-eos"
    text = processor.tokenizer.decode(g.token_ids, skip_special_tokens=True)
    payload = {"text": text, "decoder": decoder, "tokens": g.tokens, "nfe": g.nfe, "tpf": g.tpf,
               "seconds": g.seconds, "tok_s": g.tokens / max(g.seconds, 1e-9), "edits": g.edits}
    extra = f"{g.edits} edits"
    if g.accepted:  # speculative: drafted tokens accepted per step, after the exact first one
        payload["accepted"] = g.accepted
        extra = f"{len(g.accepted)} steps, {sum(g.accepted) / len(g.accepted):.2f} drafted tokens accepted per step"
    _emit(payload, args.json, [text, f"-- {decoder}: {g.tokens} tokens, {g.nfe} forwards, TPF {g.tpf:.2f}, "
                                     f"{payload['tok_s']:.1f} tok/s, {extra}"])
    return 0


def _device(args, command: str):
    """Where `command` decodes (`bard_core.engine.decode_device`); one that is not here is refused before loading."""
    from bard_core.engine import decode_device

    try:  # RuntimeError: a device string torch cannot parse
        return decode_device(args.device)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"bard {command}: --device: {exc}") from None


def cmd_bench_decode(args) -> int:
    from bard_core import checkpoint
    from bard_core.shapes import suite

    model_dir = _existing_dir(args.model, "bench-decode", "--model")
    ar_dir = _existing_dir(args.ar_model, "bench-decode", "--ar-model")
    thresholds = _thresholds(args.threshold, "bench-decode")
    device = _device(args, "bench-decode")
    try:
        items = suite.load_items(args.benchmarks_dir, args.benchmark, args.limit)
    except ValueError as exc:
        raise UsageError(f"bard bench-decode: {exc}") from None
    model, processor, meta = checkpoint.load(model_dir)
    if not (args.block_size or meta.get("block_size")):
        raise UsageError("bard bench-decode: --model has no bard.json block size; pass --block-size")
    model.to(device)
    ar_model, _, ar_meta = checkpoint.load(ar_dir)
    ar_model.to(device)
    prompts = suite.prompts_for(items, processor)
    try:
        base = checkpoint.decode_config(meta, None, **decode_flags(args, skip=("threshold",)))
    except ValueError as exc:
        raise UsageError(f"bard bench-decode: {exc}") from None
    ar = suite.run_ar(ar_model, processor, args.benchmark, items, prompts, base.max_new_tokens, base.batch_size,
                      checkpoint.token_ids(processor.tokenizer, ar_meta, require_mask=False))
    rows = [{"decoder": "ar", "block_size": None, "threshold": None, "accuracy": ar.accuracy, "tokens": ar.tokens,
             "nfe": ar.nfe, "tpf": ar.tpf, "tok_s": ar.tok_s, "speedup": 1.0}]
    for tau in thresholds:
        cfg = dataclasses.replace(base, threshold=tau)
        d = suite.run_diffusion(model, processor, args.benchmark, items, prompts, cfg,
                                checkpoint.token_ids(processor.tokenizer, meta))
        rows.append({"decoder": "diffusion", "block_size": cfg.block_size, "threshold": tau, "accuracy": d.accuracy,
                     "tokens": d.tokens, "nfe": d.nfe, "tpf": d.tpf, "tok_s": d.tok_s, "speedup": d.tok_s / ar.tok_s})
    lines = [f"{args.benchmark}: {len(items)} items, batch {base.batch_size}",
             f"{'decoder':<10} {'B':>3} {'tau':>5} {'accuracy':>8} {'NFE':>6} {'TPF':>5} {'tok/s':>7} {'speed-up':>8}"]
    for r in rows:
        lines.append(f"{r['decoder']:<10} {r['block_size'] or '-':>3} {r['threshold'] if r['threshold'] is not None else '-':>5} "
                     f"{r['accuracy']['accuracy']:>8.3f} {r['nfe']:>6} {r['tpf']:>5.2f} {r['tok_s']:>7.1f} "
                     f"{r['speedup']:>8.2f}")
    _emit({"benchmark": args.benchmark, "items": len(items), "rows": rows}, args.json, lines)
    return 0




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
    try:
        thresholds = [float(t) for t in args.threshold.split(",")] if args.threshold else []
    except ValueError:
        raise UsageError(f"bard eval: --threshold expects comma-separated numbers, got {args.threshold!r}") from None
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


DEVICE_HELP = "auto (a GPU when there is one, else the CPU), cpu, cuda, cuda:N"


def add_commands(sub) -> None:
    p = sub.add_parser("generate", help="answer one prompt (with images) and print decoding stats")
    p.add_argument("--model", required=True, help="checkpoint directory (block size from its bard.json)")
    p.add_argument("--image", action="append", help="image file (repeatable)")
    p.add_argument("--prompt", required=True)
    add_decode_flags(p, skip=("batch_size", "label_shift"))
    p.add_argument("--ar", action="store_true", help="decode autoregressively (one token per forward)")
    p.add_argument("--verifier", default=None, help="--mode speculative: the model whose greedy answer comes out, e.g. "
                                                    "the AR base (default: the model's own weights)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench-decode", help="AR vs block-diffusion decoding on a benchmark, side by side")
    p.add_argument("--model", required=True, help="block-diffusion checkpoint")
    p.add_argument("--ar-model", required=True, help="AR checkpoint (the baseline)")
    p.add_argument("--benchmark", required=True, help="e.g. shapes_extract")
    p.add_argument("--benchmarks-dir", required=True, help="the benchmarks/ directory written by `bard synth`")
    p.add_argument("--threshold", default="0.5,0.7,0.9", help="comma-separated thresholds (a sweep)")
    p.add_argument("--limit", type=int, default=None)
    add_decode_flags(p, skip=("threshold", "label_shift"))
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_decode)

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
