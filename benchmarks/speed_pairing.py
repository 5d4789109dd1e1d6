"""A speed-up measured two ways, repeatedly: the AR base's run then the model's (sequential), and the two
interleaved part by part (`tasks.evaluate.measure_speed`, what the gate does). On a shared machine whose load
changes, the sequential ratio compares two moments; the spread of each method over repeats says how much.

    python -m benchmarks.speed_pairing --model STAGE --benchmarks-dir WORLD/benchmarks [--mode speculative]
        [--threshold 0.9] [--items 32] [--batch-size 16] [--repeats 6] [--block-size B]

Prints one row per repeat (both methods' speed-ups at batch 1 and N), the mean and spread of each, and one JSON
line. Findings: docs/evaluation.md "Speed side by side".
"""

from __future__ import annotations

import argparse
import json
import statistics

from bard_core.assets import shipped_base
from bard_core.shapes import suite
from tasks.evaluate import measure_speed
from tasks.lm_model import BardLM


def requests_for(benchmarks_dir: str, items: int, max_new_tokens: int) -> list[tuple]:
    """shapes_extract items as lm-eval hands them to the model: (question, generation settings, images)."""
    import io

    from PIL import Image

    rows = suite.load_items(benchmarks_dir, "shapes_extract", items)
    return [(r["question"], {"until": ["<|im_end|>"], "max_gen_toks": max_new_tokens},
             {"visual": [Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB")]}) for r in rows]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a block-diffusion stage")
    parser.add_argument("--ar-model", default=str(shipped_base()))
    parser.add_argument("--benchmarks-dir", required=True)
    parser.add_argument("--mode", choices=["dynamic", "speculative"], default="speculative")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--block-size", type=int, default=None, help="decode block size (default: the checkpoint's)")
    args = parser.parse_args(argv)
    if min(args.items, args.batch_size, args.repeats) < 1:
        parser.error("--items, --batch-size and --repeats must be at least 1")
    requests = requests_for(args.benchmarks_dir, max(args.items, 4 * args.batch_size), args.max_new_tokens)
    decode = {"threshold": args.threshold, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
    if args.block_size is not None:
        decode["block_size"] = args.block_size
    model = BardLM(args.model, mode="speculative" if args.mode == "speculative" else "diffusion", **decode)
    ar = BardLM(args.ar_model, mode="ar", batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    sizes = ("1", str(args.batch_size))
    rows = []
    for r in range(args.repeats):
        row = {}
        for method in (("sequential", "interleaved") if r % 2 == 0 else ("interleaved", "sequential")):
            if method == "sequential":
                measured = {**measure_speed({"ar": ar}, requests, args.items, args.batch_size),
                            **measure_speed({"own": model}, requests, args.items, args.batch_size)}
            else:
                measured = measure_speed({"own": model, "ar": ar}, requests, args.items, args.batch_size)
            row[method] = {k: measured["own"][k]["tok_s"] / measured["ar"][k]["tok_s"] for k in sizes}
            row[method + "_tpf"] = measured["own"]["1"]["tpf"]
        rows.append(row)
    print(f"speed-up over the AR base, {args.model} ({args.mode}), {args.items} items at batch 1 and "
          f"{4 * args.batch_size} at batch {args.batch_size}, {args.repeats} repeats")
    print(f"{'repeat':>6} {'seq b1':>7} {'int b1':>7} {'seq bN':>7} {'int bN':>7}")
    for i, row in enumerate(rows):
        print(f"{i:>6} " + " ".join(f"{row[m][k]:>7.2f}" for k in sizes for m in ("sequential", "interleaved")))
    summary = {}
    for m in ("sequential", "interleaved"):
        for k in sizes:
            values = [row[m][k] for row in rows]
            summary[f"{m}_b{k}"] = {"mean": statistics.fmean(values),
                                    "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                                    "min": min(values), "max": max(values)}
    for name, s in summary.items():
        print(f"{name:<18} mean {s['mean']:.2f}  sd {s['sd']:.3f}  range {s['min']:.2f}–{s['max']:.2f}")
    print(json.dumps({"model": args.model, "mode": args.mode, "items": args.items, "batch_size": args.batch_size,
                      "tpf": rows[0]["interleaved_tpf"], "rows": rows, "summary": summary}))


if __name__ == "__main__":
    main()
