"""`bard`: the command line. Thin: each command parses arguments and calls one flow or one function.

Heavy modules are imported inside the commands, so `bard --help` is instant. Bad arguments print
one clear line and exit with status 2; `--json` prints a machine-readable result on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class UsageError(Exception):
    """A bad argument: reported on one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the usage block; we print one line
        raise UsageError(f"{self.prog}: {message}")


def _emit(result: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=True, default=str))
    else:
        print("\n".join(lines))


def cmd_synth(args) -> int:
    from bard_core.shapes.synth import synth

    if args.size < 20 or args.bench_size < 4:
        raise UsageError(f"bard synth: --size must be >= 20 and --bench-size >= 4 (got {args.size}, {args.bench_size})")
    result = synth(args.out, seed=args.seed, size=args.size, bench_size=args.bench_size)
    payload = {"out": str(Path(args.out).resolve()), "rows": result.rows, "planted": result.planted,
               "benchmarks": result.benchmarks}
    _emit(payload, args.json, [f"shapes world written to {payload['out']}",
                               f"  source rows: {result.rows}", f"  planted defects: {result.planted}",
                               f"  benchmarks: {result.benchmarks}"])
    return 0


def cmd_tiny_model(args) -> int:
    from bard_core.config import ModelConfig
    from bard_core.tiny import save_tiny_model

    out = save_tiny_model(args.out, _model_config(ModelConfig(), args.set, "tiny-model"))
    info = json.loads((out / "bard_model.json").read_text())
    payload = {"out": str(out.resolve()), **info}
    _emit(payload, args.json, [f"tiny Qwen3-VL written to {payload['out']} ({info['parameters']:,} parameters)"])
    return 0


def _model_config(base, items: list[str] | None, command: str):
    """Apply `--set FIELD=VALUE` overrides to a ModelConfig (bad ones are usage errors)."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(base)}
    parsed = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"bard {command}: --set expects FIELD=VALUE, got {item!r}")
        if key not in fields:
            raise UsageError(f"bard {command}: unknown model field {key!r}; valid: {', '.join(sorted(fields))}")
        current = getattr(base, key)
        try:
            parsed[key] = tuple(json.loads(value)) if isinstance(current, tuple) else type(current)(value)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"bard {command}: {key}={value!r}: {exc}") from None
    try:
        return dataclasses.replace(base, **parsed)
    except ValueError as exc:
        raise UsageError(f"bard {command}: {exc}") from None


def _family_weights(pairs: list[str] | None) -> dict[str, float] | None:
    """``--weight FAMILY=W`` pairs on top of the world's default weights (W = 0 drops a family)."""
    if not pairs:
        return None
    from bard_core.shapes import world

    weights = dict(world.FAMILY_WEIGHTS)
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in world.FAMILIES:
            raise UsageError(f"bard pretrain-tiny: --weight wants FAMILY=W with FAMILY one of "
                             f"{', '.join(world.FAMILIES)} (got {pair!r})")
        try:
            weights[name] = float(value)
        except ValueError:
            raise UsageError(f"bard pretrain-tiny: --weight {name}: {value!r} is not a number") from None
    try:
        world.check_family_weights(weights)
    except ValueError as exc:
        raise UsageError(f"bard pretrain-tiny: --weight: {exc}") from None
    return weights


def cmd_pretrain_tiny(args) -> int:
    from bard_core.config import ModelConfig
    from bard_core.pretrain import pretrain_tiny

    for flag, value in (("--minutes", args.minutes), ("--steps", args.steps), ("--eval-every-steps", args.eval_every_steps)):
        if value is not None and value <= 0:
            raise UsageError(f"bard pretrain-tiny: {flag} must be positive (got {value})")
    minutes = 60.0 if args.minutes is None and args.steps is None else args.minutes
    cfg = _model_config(ModelConfig(), args.set, "pretrain-tiny")
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    scores = pretrain_tiny(args.out, minutes, cfg, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                           lr=args.lr, eval_every=args.eval_every, eval_every_steps=args.eval_every_steps,
                           eval_per_family=args.eval_per_family, resume=args.resume,
                           family_weights=_family_weights(args.weight), formats=args.formats, log=log)
    out = Path(args.out)
    info = json.loads((out / "bard_model.json").read_text())
    payload = {"out": str(out.resolve()), "curve": str(out.with_name(out.name + ".curve.json").resolve()),
               "scores": scores, "steps": info["steps"], "meets_targets": info["meets_targets"]}
    _emit(payload, args.json, [f"AR base written to {payload['out']} after {info['steps']} steps",
                               f"  scores: {json.dumps(scores)}", f"  meets targets: {info['meets_targets']}",
                               f"  learning curve: {payload['curve']}"])
    return 0


def _existing_dir(path: str, command: str, what: str) -> Path:
    p = Path(path)
    if not (p / "config.json").exists():
        raise UsageError(f"bard {command}: {what} {path!r} is not a model directory (no config.json)")
    return p


def _pairs(items: list[str] | None, command: str, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise UsageError(f"bard {command}: {flag} expects NAME=VALUE, got {item!r}")
        out[key] = value
    return out


def cmd_curate(args) -> int:
    from bard_core.recipes import get_recipe

    sources = _pairs(args.source, "curate", "--source")
    if not sources:
        raise UsageError("bard curate: give at least one --source llava_ov=URI or finevision=URI")
    unknown = set(sources) - {"llava_ov", "finevision"}
    if unknown:
        raise UsageError(f"bard curate: unknown source {sorted(unknown)[0]!r}; valid: llava_ov, finevision")
    from bard_core.curation.normalise import REQUIRED
    from tasks.sources import check_source

    for name, uri in sorted(sources.items()):
        try:
            check_source(name, uri, REQUIRED)
        except ValueError as exc:
            raise UsageError(f"bard curate: {exc}") from None
    if args.benchmarks and not Path(args.benchmarks).is_dir():
        raise UsageError(f"bard curate: --benchmarks {args.benchmarks}: not a directory")
    overrides = _pairs(args.set, "curate", "--set")
    try:
        get_recipe(args.recipe, overrides)
    except ValueError as exc:
        raise UsageError(f"bard curate: {exc}") from None
    from flows.curate import CurateParams, curate_flow
    from flows.local_server import ensure_flow_server

    params = CurateParams(sources=sources, out=str(Path(args.out).resolve()), recipe=args.recipe, overrides=overrides,
                          benchmarks_dir=str(Path(args.benchmarks).resolve()) if args.benchmarks else None,
                          processor=args.processor)
    ensure_flow_server()
    result = curate_flow(params)
    counts = result["counts"]
    lines = [f"curated {result['num_rows']} rows into {result['uri']}",
             f"  rows in {counts['rows_in']} = kept {counts['kept']} + rejected {counts['rejected']}"]
    lines += [f"  {reason}: {n}" for reason, n in sorted(counts["rejected_by_reason"].items())]
    _emit(result, args.json, lines)
    return 0


def cmd_train(args) -> int:
    from bard_core.recipes import get_recipe

    overrides = _pairs(args.set, "train", "--set")
    try:
        recipe = get_recipe(args.recipe, overrides)
    except ValueError as exc:
        raise UsageError(f"bard train: {exc}") from None
    data = Path(args.data)
    if not (data / "manifest.json").exists():
        raise UsageError(f"bard train: --data {args.data} is not a curated dataset (no manifest.json); run `bard curate`")
    _existing_dir(args.init, "train", "--init")
    if args.teacher:
        _existing_dir(args.teacher, "train", "--teacher")
    if args.anchor:
        _existing_dir(args.anchor, "train", "--anchor")
    if args.objective == "diffusion" and not args.block_size:
        raise UsageError("bard train: --block-size is required for the diffusion objective")
    from tasks.refs import checkpoint_ref, resolve_anchor

    try:
        anchor = resolve_anchor(checkpoint_ref(args.init), checkpoint_ref(args.anchor) if args.anchor else None,
                                recipe.train.uses_base, args.objective)
    except ValueError as exc:
        raise UsageError(f"bard train: {exc}") from None
    if args.dry_run:
        from flows.train_plan import dry_run_plan

        payload, refused = dry_run_plan(recipe, objective=args.objective, block_size=args.block_size,
                                        workers=args.workers, init=Path(args.init), data=data,
                                        teacher=bool(args.teacher), anchor=anchor, gpu_gib=args.gpu_memory)
        if refused:
            raise UsageError(f"bard train: {refused}")
        _emit(payload, args.json, [f"dry run: {json.dumps(payload)}"])
        return 0
    from tasks.refs import DatasetRef
    from tasks.train import run_stage

    try:
        teacher = checkpoint_ref(args.teacher) if args.teacher else None
        ref = run_stage(DatasetRef.from_manifest(data, json.loads((data / "manifest.json").read_text())),
                        checkpoint_ref(args.init), args.out, args.recipe, overrides, block_size=args.block_size,
                        teacher=teacher, objective=args.objective, workers=args.workers, anchor=anchor)
    except ValueError as exc:
        raise UsageError(f"bard train: {exc}") from None
    payload = {"uri": ref.uri, "block_size": ref.block_size, "step": ref.step, "parent": ref.parent,
               "fingerprint": ref.fingerprint}
    _emit(payload, args.json, [f"stage written to {ref.uri} (B={ref.block_size}, {ref.step} steps)"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    from bard_core.config import CONVERSATION_FORMATS

    parser = _Parser(prog="bard", description="AR Qwen3-VL -> block-diffusion VLM pipeline (BARD-VL).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("synth", help="write the shapes world: two sources with planted defects, five benchmarks")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=600, help="clean conversations per source")
    p.add_argument("--bench-size", type=int, default=60, help="images per benchmark")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("tiny-model", help="write a random-initialised tiny Qwen3-VL HF directory")
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a ModelConfig field")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tiny_model)
    p = sub.add_parser("curate", help="Ray Data curation of LLaVA-OV-1.5 / FineVision sources (a Prefect flow)")
    p.add_argument("--source", action="append", metavar="NAME=URI",
                   help="llava_ov=URI or finevision=URI (local parquet dir/file, hf://NAME?subsets=..&split=.., stream://DIR)")
    p.add_argument("--benchmarks", default=None, help="benchmark dir to decontaminate against")
    p.add_argument("--out", required=True)
    p.add_argument("--recipe", default="tiny")
    p.add_argument("--processor", default=None, help="processor dir for token estimates (default: the recipe's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override, e.g. data.min_rating=4")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_curate)

    p = sub.add_parser("train", help="one training stage on Ray Train (merge -> distill, or the AR objective)")
    p.add_argument("--recipe", default="tiny")
    p.add_argument("--data", required=True, help="curated dataset directory (from `bard curate`)")
    p.add_argument("--init", required=True, help="checkpoint to start from")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--teacher", default=None, help="checkpoint to distil from (the last promoted stage)")
    p.add_argument("--anchor", default=None,
                   help="AR checkpoint for the recipe's AR anchor (train.anchor_weight; default: --init when it is AR, "
                        "else the anchor recorded in --init's bard.json)")
    p.add_argument("--objective", choices=["diffusion", "ar"], default="diffusion")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: the recipe's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override, e.g. train.merge_steps=100")
    p.add_argument("--dry-run", action="store_true", help="print the resolved training plan (with the memory per GPU "
                                                          "it needs) and exit; exit 2 when it cannot fit")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB",
                   help="memory of one GPU for --dry-run's fit check (default 80: H100)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain-tiny", help="next-token SFT of the tiny model on the shapes world (the AR base)")
    p.add_argument("--out", required=True)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=None, help="wall-clock budget (default 60)")
    budget.add_argument("--steps", type=int, default=None,
                        help="optimizer-step budget instead (the same run on a busy or an idle machine)")
    p.add_argument("--resume", action="store_true", help="continue training the checkpoint in --out")
    p.add_argument("--weight", action="append", metavar="FAMILY=W",
                   help="sampling weight of a question family in the training stream (repeatable)")
    p.add_argument("--formats", choices=CONVERSATION_FORMATS, default="single",
                   help="single-turn conversations, or also the sources' formats (multi-turn, image after "
                        "the question, two-image comparisons)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=float, default=300.0, help="seconds between evaluations/checkpoints")
    p.add_argument("--eval-every-steps", type=int, default=None,
                   help="steps between evaluations/checkpoints instead of --eval-every's seconds")
    p.add_argument("--eval-per-family", type=int, default=40)
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a ModelConfig field")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pretrain_tiny)

    from flows import cli_ablate, cli_decode, cli_eval, cli_pipeline, cli_ui

    cli_pipeline.add_commands(sub)
    cli_ablate.add_commands(sub)
    cli_ui.add_commands(sub)
    cli_decode.add_commands(sub)
    cli_eval.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the stage's checkpoints, the cache and the registry stay (docs/reliability.md)
        print("bard: interrupted; finished work is kept (the cache under the run root, the stage's last checkpoint, "
              "the registry): run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":  # `python -m flows.cli`: run the importable module, whose UsageError cli_eval raises
    from flows.cli import main as _main

    sys.exit(_main())
