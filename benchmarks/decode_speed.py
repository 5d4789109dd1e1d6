"""AR vs block-diffusion decoding in the same engine, on the long-answer benchmark (shapes_extract).

Both decoders run the same batches of the same items on the same machine, one after the other, and
report accuracy (the benchmark's metric), tokens to first EOS, forwards (NFE), tokens per forward
(TPF), tokens/s and the speed-up over AR. Diffusion rows: every stage checkpoint (B = 4…32) at
several thresholds τ.

Checkpoints: the shipped tiny AR base and `--stages DIR` holding B4 … B32. Without `--stages`, the
block-diffusion checkpoints are trained here by the pipeline flow (`benchmarks/chain.py`: a shapes world,
curation, the stages with their gates opened), cached under `--work` (default `runs/decode_bench/`) —
the output says which checkpoints it measured. The default chain (mask noise, 1500/2500/2000/1500 merge
steps for B4/B8/B16/B32) takes about 25 minutes on 2 cores, once: in-block parallelism (high TPF at AR
accuracy) is learned late — at 600 steps per stage the later stages decode nearly left to right — and
mask noise learns it faster than mixed noise at this scale.

    python -m benchmarks.decode_speed [--limit 60] [--thresholds 0.5,0.7,0.9] [--stages DIR | --steps 1500:0,...]
                                      [--batch-sizes 1,16] [--modes dynamic,speculative]

The lossless mode (``speculative``, `bard_core/speculative.py`) is measured beside: its TPF, tokens/s, drafted
tokens accepted per step, and the share of answers identical to the stage's own AR greedy answers (1.0 by
construction; anything less is a bug or a floating-point tie).

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bard_core import checkpoint
from bard_core.config import DecodeConfig
from bard_core.shapes import suite

ROOT = Path(__file__).resolve().parents[1]


def stage_checkpoints(args) -> dict[int, Path]:
    if args.stages:
        found = {int(p.name[1:]): p for p in Path(args.stages).glob("B*") if (p / "config.json").exists()}
        if not found:
            raise SystemExit(f"no B<size> checkpoints under {args.stages}")
        return dict(sorted(found.items()))
    from benchmarks.chain import parse_steps, run_chain

    report = run_chain(args.work, seed=args.seed, size=args.size, limit=max(args.limit, 4), steps=parse_steps(args.steps),
                       overrides={"noise.kind": args.noise})
    return {s["block_size"]: Path(s["checkpoint"]) for s in report["stages"]}


def main() -> None:
    from bard_core.assets import shipped_base

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=None, help="directory with B4..B32 block-diffusion checkpoints")
    parser.add_argument("--benchmarks-dir", default=None, help="synth output's benchmarks/ (default: synthesised)")
    parser.add_argument("--benchmark", default="shapes_extract")
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--thresholds", default="0.5,0.7,0.9,0.95")
    parser.add_argument("--batch-sizes", default="16", help="comma-separated; each measured side by side with AR")
    parser.add_argument("--verifier", default=None, help="speculative rows: verify with this model (e.g. the AR "
                        "base) instead of the stage's own weights; 'same' then compares with its answers")
    parser.add_argument("--modes", default="dynamic,speculative",
                        help="block decoding at each tau (dynamic) and the lossless mode (speculative)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--steps", default="1500:0,2500:0,2000:0,1500:0",
                        help="merge:distill steps per stage B4,B8,… when training here (cached)")
    parser.add_argument("--noise", default="mask", help="noise kind when training here (mask or mixed)")
    parser.add_argument("--size", type=int, default=2000, help="clean conversations per shapes source when training here")
    parser.add_argument("--seed", type=int, default=11, help="shapes world seed when training here")
    parser.add_argument("--work", default=str(ROOT / "runs" / "decode_bench"), help="where the trained chain is cached")
    args = parser.parse_args()
    args.ar_model = str(shipped_base())
    thresholds = [float(t) for t in args.thresholds.split(",")]
    torch.set_num_threads(max(1, torch.get_num_threads()))

    bench_dir = args.benchmarks_dir
    if bench_dir is None:
        from bard_core.shapes.synth import synth

        bench_dir = Path(tempfile.mkdtemp()) / "world"
        synth(bench_dir, seed=99, size=20, bench_size=max(args.limit, 4))
        bench_dir = bench_dir / "benchmarks"
    items = suite.load_items(bench_dir, args.benchmark, args.limit)

    checkpoints = stage_checkpoints(args)
    ar_model, processor, ar_meta = checkpoint.load(args.ar_model)
    prompts = suite.prompts_for(items, processor)
    ar_ids = checkpoint.token_ids(processor.tokenizer, ar_meta, require_mask=False)
    verifier = checkpoint.load(args.verifier)[0] if args.verifier else None
    batches = [int(b) for b in args.batch_sizes.split(",")]
    modes = args.modes.split(",")
    ars, rows = {}, []
    for bs in batches:  # every batch size side by side: AR base, then each stage's rows
        ars[bs] = suite.run_ar(ar_model, processor, args.benchmark, items, prompts, args.max_new_tokens, bs, ar_ids)
        for B, path in checkpoints.items():
            model, _, meta = checkpoint.load(path)
            ids = checkpoint.token_ids(processor.tokenizer, meta)
            settings = [("dynamic", tau) for tau in thresholds] if "dynamic" in modes else []
            settings += [("speculative", None)] if "speculative" in modes else []
            own = None  # the causal greedy answers of these weights: what the lossless mode must reproduce
            for mode, tau in settings:
                cfg = DecodeConfig(block_size=B, mode=mode, threshold=tau or 0.9, max_new_tokens=args.max_new_tokens,
                                   batch_size=bs, label_shift=bool(meta.get("label_shift", False)))
                d = suite.run_diffusion(model, processor, args.benchmark, items, prompts, cfg, ids,
                                        verifier if mode == "speculative" else None)
                row = {"mode": mode, "batch": bs, "block_size": B, "threshold": tau, "checkpoint": str(path),
                       "accuracy": d.accuracy["accuracy"], "scores": d.accuracy, "tokens": d.tokens, "nfe": d.nfe,
                       "tpf": d.tpf, "tok_s": d.tok_s, "edits": d.edits, "speedup": d.tok_s / ars[bs].tok_s}
                if mode == "speculative":
                    own = own or suite.run_ar(verifier or model, processor, args.benchmark, items, prompts,
                                              args.max_new_tokens, bs, ids)
                    row["identical"] = sum(a == b for a, b in zip(d.outputs, own.outputs)) / len(items)
                    row["accepted_mean"] = sum(d.accepted) / max(1, len(d.accepted))
                rows.append(row)
    print_table(args, items, ars, rows)
    within = [r for r in rows if r["mode"] == "dynamic" and r["batch"] == batches[-1]
              and r["accuracy"] >= ars[batches[-1]].accuracy["accuracy"] - 0.01]
    plain = [r for r in rows if r["mode"] == "dynamic" and r["batch"] == batches[-1]]
    best = (max(within, key=lambda r: r["tok_s"]) if within else max(plain, key=lambda r: r["accuracy"])) \
        if plain else None
    if best:
        print(f"fastest block setting within 1 point of AR (batch {batches[-1]}): B={best['block_size']} "
              f"tau={best['threshold']} TPF={best['tpf']:.2f} speed-up={best['speedup']:.2f}x" if within else
              "no block setting within 1 point of AR; reporting the most accurate one")
    spec = {str(bs): max((r for r in rows if r["mode"] == "speculative" and r["batch"] == bs),
                         key=lambda r: r["tok_s"], default=None) for bs in batches}
    ar = ars[batches[-1]]
    print(json.dumps({
        "benchmark": args.benchmark, "items": len(items), "within_1_point": bool(within), "batch": batches[-1],
        "block_size": best and best["block_size"], "threshold": best and best["threshold"],
        "ar_accuracy": ar.accuracy["accuracy"], "diffusion_accuracy": best and best["accuracy"],
        "tpf": best and best["tpf"], "ar_tok_s": ar.tok_s, "diffusion_tok_s": best and best["tok_s"],
        "speedup": best and best["speedup"], "ar_tok_s_by_batch": {str(b): m.tok_s for b, m in ars.items()},
        "speculative": spec, "ar_checkpoint": args.ar_model,
        "checkpoints": {str(b): str(p) for b, p in checkpoints.items()}, "rows": rows,
    }))


def print_table(args, items, ars: dict, rows: list[dict]) -> None:
    print(f"decode speed — {args.benchmark}, {len(items)} items, torch threads {torch.get_num_threads()}, "
          f"AR model {args.ar_model}; 'same' = share of answers identical to the stage's own AR greedy answers")
    print(f"{'decoder':<12} {'batch':>5} {'B':>3} {'tau':>5} {'accuracy':>8} {'exact':>6} {'tokens':>7} {'NFE':>6} "
          f"{'TPF':>5} {'tok/s':>7} {'speed-up':>8} {'accept':>6} {'same':>5}")
    for bs, ar in ars.items():
        print(f"{'AR':<12} {bs:>5} {'-':>3} {'-':>5} {ar.accuracy['accuracy']:>8.3f} "
              f"{ar.accuracy.get('exact_match', 0):>6.3f} {ar.tokens:>7} {ar.nfe:>6} {ar.tpf:>5.2f} {ar.tok_s:>7.1f} "
              f"{1.0:>8.2f}")
        for r in (r for r in rows if r["batch"] == bs):
            tau = f"{r['threshold']:>5.2f}" if r["threshold"] is not None else f"{'-':>5}"
            spec = (f" {r['accepted_mean']:>6.2f} {r['identical']:>5.2f}" if r["mode"] == "speculative" else "")
            print(f"{r['mode']:<12} {bs:>5} {r['block_size']:>3} {tau} {r['accuracy']:>8.3f} "
                  f"{r['scores'].get('exact_match', 0):>6.3f} {r['tokens']:>7} {r['nfe']:>6} {r['tpf']:>5.2f} "
                  f"{r['tok_s']:>7.1f} {r['speedup']:>8.2f}{spec}")


if __name__ == "__main__":
    main()
