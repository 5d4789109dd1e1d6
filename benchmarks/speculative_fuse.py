"""The lossless mode's settings side by side: the look-ahead fusion (off, after a fully accepted step — the
default —, in every step) and the draft width (the block, or adaptive); long answers (shapes extract).

    python -m benchmarks.speculative_fuse --checkpoint STAGE_DIR [--items 24] [--repeats 2] [--blocks 4,8]
        [--drafts block,adaptive] [--rules off,after_full,always] [--batch 1] [--verifier AR_DIR [--images-twice]]

With ``--verifier`` the stage drafts and that AR model verifies (the two-model path, ``gate.drafter``): AR is the
verifier's own decoding, and there is no look-ahead to set (one row per block and draft).

Runs AR and every (block size, draft, look-ahead) setting interleaved batch by batch, `--repeats` times, on the
same prompts; prints a table and one JSON line. Findings: docs/decoding.md "Lossless mode" and "Draft width".
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bard_core import checkpoint, speculative
from bard_core.config import DRAFT_WIDTHS, DecodeConfig
from bard_core.decode import ar_generate_cached
from bard_core.inputs import encode_sample
from bard_core.shapes.data import conversations
from bard_core.speculative import speculative_generate


def _each_model_encodes(run, batch):
    """`run(batch)` with the drafter and the verifier encoding the prompts' images each (`--images-twice`)."""
    shared = speculative._same_tower
    speculative._same_tower = lambda a, b: False
    try:
        return run(batch)
    finally:
        speculative._same_tower = shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a block-diffusion stage")
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--blocks", default="4,8")
    parser.add_argument("--drafts", default="block", help="draft widths (DecodeConfig.draft), comma-separated")
    parser.add_argument("--rules", default=None,
                        help="look-ahead: off (no fusion), after_full, always; comma-separated (default: all three)")
    parser.add_argument("--verifier", default=None, help="an AR model that verifies the stage's drafts (two models)")
    parser.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--trace", type=int, default=0, help="print the drafts accepted per step for this many prompts")
    parser.add_argument("--images-twice", action="store_true",
                        help="with --verifier: each row again with each model encoding the images (no shared tower)")
    args = parser.parse_args()
    if args.verifier and args.rules:
        parser.error("--rules sets the look-ahead of a stage verifying itself; with --verifier there is none")
    if args.images_twice and not args.verifier:
        parser.error("--images-twice compares the two-model path's image encoding: it needs --verifier")
    drafts = args.drafts.split(",")
    rules = (args.rules or "off,after_full,always").split(",")
    bad = [d for d in drafts if d not in DRAFT_WIDTHS] + [r for r in rules if r not in ("off", "after_full", "always")]
    if args.verifier:  # the two-model path has no look-ahead to choose: one row per draft width
        rules = ["drafter"]
    if bad or args.items < 1 or args.repeats < 1 or args.batch < 1:
        parser.error(f"unknown draft/rule {bad}" if bad else "--items, --repeats and --batch must be positive")
    model, processor, meta = checkpoint.load(args.checkpoint)
    ids = checkpoint.token_ids(processor.tokenizer, meta)
    verifier = checkpoint.load(args.verifier)[0] if args.verifier else None
    prompts = []
    for s in conversations(args.items, seed=5, families=["extract"]):
        enc = encode_sample(s, processor, 512)
        enc.response_ids = enc.response_ids[:0]
        prompts.append(enc)
    runs = {"ar": lambda b: ar_generate_cached(verifier or model, b, args.max_new_tokens, ids)}
    for B in (int(b) for b in args.blocks.split(",")):
        for draft in drafts:
            cfg = DecodeConfig(block_size=B, mode="speculative", max_new_tokens=args.max_new_tokens, draft=draft,
                               label_shift=bool(meta.get("label_shift", False)))
            for rule in rules:
                runs[f"B{B} {draft} {rule}"] = (lambda c, f, r: lambda b: speculative_generate(
                    model, b, c, ids, verifier=verifier, fuse=f, look_ahead=r))(
                        cfg, rule != "off", "always" if rule == "always" else "after_full")
    if args.images_twice:  # each drafter row again, as before the drafter and verifier shared one image encoding
        for name in [n for n in runs if n != "ar"]:
            runs[f"{name} images twice"] = (lambda run: lambda b: _each_model_encodes(run, b))(runs[name])
    batches = [prompts[i:i + args.batch] for i in range(0, len(prompts), args.batch)]
    totals = {name: [0, 0, 0.0] for name in runs}
    answers: dict[str, list] = {name: [] for name in runs}
    steps: dict[str, list] = {name: [] for name in runs}  # drafts accepted per step, per prompt
    for repeat in range(args.repeats):
        for batch in batches:  # every setting on one batch before the next: load changes hit them all alike
            for name, run in runs.items():
                started = time.perf_counter()
                gens = run(batch)
                if repeat == 0:
                    answers[name] += [g.token_ids for g in gens]
                    steps[name] += [g.accepted for g in gens]
                t = totals[name]
                t[0], t[1], t[2] = t[0] + sum(g.tokens for g in gens), t[1] + sum(g.nfe for g in gens), \
                    t[2] + time.perf_counter() - started
    ar_speed = totals["ar"][0] / totals["ar"][2]
    rows = {name: {"tpf": t / n, "tok_s": t / s, "x_ar": t / s / ar_speed} for name, (t, n, s) in totals.items()}
    for name, r in rows.items():  # lossless: every setting answers what AR answers
        r["same_as_ar"] = sum(a == b for a, b in zip(answers[name], answers["ar"])) / len(prompts)
    print(f"{'setting':<26} {'TPF':>5} {'tok/s':>7} {'x AR':>5} {'same':>5}  ({args.items} prompts x {args.repeats}, "
          f"batch {args.batch}, {torch.get_num_threads()} threads)")
    for name, r in rows.items():
        print(f"{name:<26} {r['tpf']:>5.2f} {r['tok_s']:>7.0f} {r['x_ar']:>5.2f} {r['same_as_ar']:>5.2f}")
    if args.trace:
        for name in (n for n in runs if n != "ar"):
            print(f"{name}: drafts accepted per step, first {args.trace} prompts: "
                  + " / ".join(", ".join(map(str, a)) for a in steps[name][:args.trace]))
    print(json.dumps({"checkpoint": args.checkpoint, "verifier": args.verifier, "items": args.items,
                      "repeats": args.repeats,
                      "batch": args.batch, "rows": rows}))


if __name__ == "__main__":
    main()
