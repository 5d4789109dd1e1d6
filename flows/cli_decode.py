"""`bard generate` and `bard bench-decode`: the decoding side of the command line (thin, as `flows/cli.py`: parse,
check, call one function), with their decode flags (one per `DecodeConfig` field), thresholds and device."""

from __future__ import annotations

import argparse
import dataclasses

from flows.cli import UsageError, _emit, _existing_dir

DEVICE_HELP = "auto (a GPU when there is one, else the CPU), cpu, cuda, cuda:N"


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
