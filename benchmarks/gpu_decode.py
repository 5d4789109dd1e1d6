"""Decode costs on a GPU for a Qwen3-VL-4B-shaped model (random weights, bf16).

Part 1: one forward over q = 1…64 new tokens on a cached context of 1k–4k tokens, the way the
engine runs denoising passes (read the cache, keep nothing): median ms and the ratio to q = 1.
Part 2: end to end, the AR engine vs block decoding at fixed steps per block (static mode), same
prompt, same number of new tokens, batch 1 and 8, each with the dynamic cache's eager forwards and with
the static cache's CUDA graphs: tokens/s and speed-up. Random weights never stop, so both decode
exactly `--new-tokens` tokens.

    python -m benchmarks.gpu_decode            # needs CUDA; last line is one JSON object
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bard_core.config import DecodeConfig
from bard_core.decode import generate
from bard_core.engine import TokenIds, _forward, _truncate, ar_generate_cached
from bard_core.inputs import EncodedSample
from benchmarks.layout_memory import build_model

MASK_ID = 151671


def sync():
    torch.cuda.synchronize()


def forward_costs(model, contexts, queries, reps) -> list[dict]:
    from transformers import DynamicCache

    rows = []
    for ctx in contexts:
        cache = DynamicCache(config=model.config.get_text_config())
        ids = torch.randint(100, 150000, (1, ctx))
        pos = torch.arange(ctx)[None, None].expand(3, 1, ctx).clone()
        valid = torch.ones(1, ctx, dtype=torch.bool)
        with torch.no_grad():
            _forward(model, cache, ids, pos, torch.zeros(1, 0, dtype=torch.bool),
                     torch.ones(ctx, ctx, dtype=torch.bool).tril()[None], "cuda")
        base = None
        for q in queries:
            new = torch.randint(100, 150000, (1, q))
            qpos = (ctx + torch.arange(q))[None, None].expand(3, 1, q).clone()
            times = []
            for _ in range(reps + 2):
                sync()
                t0 = time.perf_counter()
                with torch.no_grad():
                    h = _forward(model, cache, new, qpos, valid, torch.ones(1, q, q, dtype=torch.bool), "cuda")
                    model.lm_head(h)
                sync()
                times.append(time.perf_counter() - t0)
                _truncate(cache, ctx)
            ms = statistics.median(times[2:]) * 1000
            base = base or ms
            rows.append({"context": ctx, "q": q, "ms": ms, "ratio_to_q1": ms / base})
    return rows


def _timed(run) -> tuple[list, float]:
    run(8)  # warm-up (kernels; the static cache's graphs are captured per call)
    sync()
    t0 = time.perf_counter()
    gens = run(None)
    sync()
    return gens, time.perf_counter() - t0


def end_to_end(model, prompt_len, new_tokens, batch, block_size, steps_list) -> list[dict]:
    """AR and block decoding (fixed steps per block), each with the dynamic cache's eager forwards and with the
    static cache's CUDA graphs (bard_core/static_kv.py), side by side; speed-ups against AR of the same cache."""
    ids = TokenIds(mask=MASK_ID, eos=-1, pad=0)
    prompts = [EncodedSample(torch.randint(100, 150000, (prompt_len,)), torch.zeros(prompt_len, dtype=torch.long),
                             torch.zeros(0, dtype=torch.long), None, None) for _ in range(batch)]
    rows = []
    for static in (False, True):
        cache = "static+graphs" if static else "dynamic, eager"
        gens, ar_s = _timed(lambda k, static=static: ar_generate_cached(model, prompts, k or new_tokens, ids,
                                                                        static=static))
        ar_tok_s = sum(g.tokens for g in gens) / ar_s
        rows.append({"decoder": "ar", "cache": cache, "batch": batch, "tokens": sum(g.tokens for g in gens),
                     "nfe": sum(g.nfe for g in gens), "seconds": ar_s, "tok_s": ar_tok_s, "tpf": 1.0, "speedup": 1.0})
        for steps in steps_list:
            def run(k, steps=steps, static=static):
                cfg = DecodeConfig(block_size=block_size, mode="static", tokens_per_step=block_size // steps,
                                   max_new_tokens=block_size if k else new_tokens, batch_size=batch)
                return generate(model, prompts, cfg, ids, static=static)

            gens, s = _timed(run)
            tok_s = sum(g.tokens for g in gens) / s
            rows.append({"decoder": f"block B={block_size} steps={steps}", "cache": cache, "batch": batch,
                         "tokens": sum(g.tokens for g in gens), "nfe": sum(g.nfe for g in gens), "seconds": s,
                         "tok_s": tok_s, "tpf": sum(g.tokens for g in gens) / sum(g.nfe for g in gens),
                         "speedup": tok_s / ar_tok_s})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="1024,2048,4096")
    parser.add_argument("--queries", default="1,2,4,8,16,32,64")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--steps", default="4,8,16", help="denoising steps per block (static mode)")
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    torch.manual_seed(0)
    model, _ = build_model("4b", "cuda")
    model.eval()
    costs = forward_costs(model, [int(c) for c in args.contexts.split(",")], [int(q) for q in args.queries.split(",")],
                          args.reps)
    print(f"GPU {torch.cuda.get_device_name()} — one forward over q new tokens on a cached context (bf16, 4B shapes)")
    print(f"{'context':>7} {'q':>3} {'ms':>7} {'x q=1':>6}")
    for r in costs:
        print(f"{r['context']:>7} {r['q']:>3} {r['ms']:>7.2f} {r['ratio_to_q1']:>6.2f}")
    e2e = []
    for batch in (int(b) for b in args.batches.split(",")):
        e2e += end_to_end(model, args.prompt_len, args.new_tokens, batch, args.block_size,
                          [int(s) for s in args.steps.split(",")])
    print(f"end to end: prompt {args.prompt_len}, {args.new_tokens} new tokens")
    print(f"{'decoder':<24} {'cache':<15} {'batch':>5} {'tokens':>7} {'NFE':>6} {'TPF':>5} {'s':>7} {'tok/s':>8} "
          f"{'x AR':>6}")
    for r in e2e:
        print(f"{r['decoder']:<24} {r['cache']:<15} {r['batch']:>5} {r['tokens']:>7} {r['nfe']:>6} {r['tpf']:>5.2f} "
              f"{r['seconds']:>7.2f} {r['tok_s']:>8.1f} {r['speedup']:>6.2f}")
    print(json.dumps({"device": torch.cuda.get_device_name(), "forward_costs": costs, "end_to_end": e2e}))


if __name__ == "__main__":
    main()
