"""The lossless mode's look-ahead fusion side by side: off, after a fully accepted step (the default), in every
step; batch 1, long answers (shapes extract).

    python -m benchmarks.speculative_fuse --checkpoint STAGE_DIR [--items 24] [--repeats 2] [--blocks 4,8]

Runs AR and every (block size, look-ahead) setting interleaved, `--repeats` times, on the same prompts; prints
a table and one JSON line. Findings: docs/decoding.md "Lossless mode".
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bard_core import checkpoint
from bard_core.config import DecodeConfig
from bard_core.decode import ar_generate_cached
from bard_core.inputs import encode_sample
from bard_core.shapes.data import conversations
from bard_core.speculative import speculative_generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a block-diffusion stage")
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--blocks", default="4,8")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    model, processor, meta = checkpoint.load(args.checkpoint)
    ids = checkpoint.token_ids(processor.tokenizer, meta)
    prompts = []
    for s in conversations(args.items, seed=5, families=["extract"]):
        enc = encode_sample(s, processor, 512)
        enc.response_ids = enc.response_ids[:0]
        prompts.append(enc)
    runs = {"ar": lambda p: ar_generate_cached(model, [p], args.max_new_tokens, ids)[0]}
    for B in (int(b) for b in args.blocks.split(",")):
        cfg = DecodeConfig(block_size=B, mode="speculative", max_new_tokens=args.max_new_tokens,
                           label_shift=bool(meta.get("label_shift", False)))
        for name, fuse, rule in (("off", False, "after_full"), ("after_full", True, "after_full"),
                                 ("always", True, "always")):
            runs[f"B{B} {name}"] = (lambda c, f, r: lambda p: speculative_generate(model, [p], c, ids, fuse=f,
                                                                                   look_ahead=r)[0])(cfg, fuse, rule)
    totals = {name: [0, 0, 0.0] for name in runs}
    answers: dict[str, list] = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            gens = [run(p) for p in prompts]
            answers.setdefault(name, [g.token_ids for g in gens])
            t = totals[name]
            t[0], t[1], t[2] = t[0] + sum(g.tokens for g in gens), t[1] + sum(g.nfe for g in gens), \
                t[2] + time.perf_counter() - started
    ar_speed = totals["ar"][0] / totals["ar"][2]
    rows = {name: {"tpf": t / n, "tok_s": t / s, "x_ar": t / s / ar_speed} for name, (t, n, s) in totals.items()}
    for name, r in rows.items():  # lossless: every setting answers what AR answers
        r["same_as_ar"] = sum(a == b for a, b in zip(answers[name], answers["ar"])) / len(prompts)
    print(f"{'setting':<16} {'TPF':>5} {'tok/s':>7} {'x AR':>5} {'same':>5}  ({args.items} prompts x {args.repeats}, "
          f"batch 1, {torch.get_num_threads()} threads)")
    for name, r in rows.items():
        print(f"{name:<16} {r['tpf']:>5.2f} {r['tok_s']:>7.0f} {r['x_ar']:>5.2f} {r['same_as_ar']:>5.2f}")
    print(json.dumps({"checkpoint": args.checkpoint, "items": args.items, "repeats": args.repeats, "rows": rows}))


if __name__ == "__main__":
    main()
