"""What verifying a drafter's second choices would buy: tokens per forward of the two-model path (a stage drafts,
the AR base verifies) if each verify forward checked a tree of drafts instead of one chain, simulated exactly.

    python -m benchmarks.draft_tree --checkpoint STAGE_DIR --verifier AR_DIR [--items 16] [--block 32]

With greedy decoding the verifier accepts drafts while they equal its own answer, so the AR answer decides every
step: the drafter drafts B tokens from the prompt and the answer so far (one forward, as `bard_core/speculative.py`
drafts), a chain is accepted up to its first miss, and a tree also along a branch — the drafter's 2nd (or 3rd)
choice at a depth, followed by the chain's next L drafts — where the miss is that choice. A step gains the accepted
drafts and the bonus token for two forwards. The chain row is checked against the engine's own ``draft="block"``
decoding of the same prompts. Prints a table and one JSON line; the finding: docs/decoding.md "Draft trees".
"""

from __future__ import annotations

import argparse
import json

import torch

from bard_core import checkpoint
from bard_core.config import DecodeConfig
from bard_core.engine import _Context, _forward, _prompt_rows_mask, _Rows, _text_positions, ar_generate_cached
from bard_core.inputs import EncodedSample, encode_sample
from bard_core.shapes.data import conversations
from bard_core.speculative import draft_states, speculative_generate


def drafter_top(drafter, prompt: EncodedSample, answer: list[int], B: int, ids, label_shift: bool, k: int):
    """The drafter's top-k tokens [B, k] and top-1 probability [B] for the B tokens after `answer`."""
    e = EncodedSample(torch.cat([prompt.prompt_ids, torch.tensor(answer, dtype=torch.long)]),
                      torch.cat([prompt.prompt_mm_types, torch.zeros(len(answer), dtype=torch.long)]),
                      prompt.response_ids, prompt.pixel_values, prompt.image_grid_thw)
    rows = _Rows(drafter, [e], ids.pad)
    ctx = _Context(rows.ids, rows.positions, rows.types, rows.valid, _prompt_rows_mask(rows.valid))
    new = ctx.then(torch.full((1, B), ids.mask, dtype=torch.long), _text_positions(rows.next_pos, B))
    h = _forward(drafter, None, new.ids, new.positions, torch.zeros(1, 0, dtype=torch.bool), new.mask,
                 next(drafter.parameters()).device, rows.pixel_values, rows.image_grid_thw, new.types)
    logits = drafter.lm_head(draft_states(h, ctx.ids.shape[1], B, label_shift)).float()[0]
    logits[:, ids.mask] = float("-inf")
    return logits.topk(k, dim=-1).indices, torch.softmax(logits, -1).max(-1).values


def branched(sure, choices: int, depths: int | None) -> list[int]:
    """The depths with branches: none for a chain, every depth but the last (None), or the `depths` least sure."""
    B = sure.shape[0]
    return [] if choices < 2 else list(range(B - 1)) if depths is None else sure[:B - 1].argsort()[:depths].tolist()


def tree_tokens(B: int, choices: int, cont: int, at: list[int]) -> int:
    """The verify forward's width: the chain, and at each branched depth j its other choices, each followed by up
    to `cont` chain drafts (as many as the block has after j)."""
    return B + sum((choices - 1) * (1 + min(cont, B - 1 - j)) for j in at)


def accepted(top, sure, target: list[int], choices: int, cont: int, depths: int | None) -> int:
    """Drafts accepted: the chain to its first miss; then, where that depth has a branch (`branched`) holding the
    right token among its `choices`, that branch's chain drafts, up to `cont` of them."""
    chain, B = top[:, 0].tolist(), top.shape[0]
    a = 0
    while a < min(B, len(target)) and chain[a] == target[a]:
        a += 1
    if a >= min(B, len(target)) or a not in branched(sure, choices, depths) \
            or target[a] not in top[a, 1:choices].tolist():
        return a
    b = a + 1
    while b < min(B, a + 1 + cont, len(target)) and chain[b] == target[b]:
        b += 1
    return b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="the drafting stage")
    parser.add_argument("--verifier", required=True, help="the AR model whose answers decide")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args()
    if args.items < 1 or args.block < 2:
        parser.error("--items must be positive and --block at least 2")
    drafter, processor, meta = checkpoint.load(args.checkpoint)
    verifier = checkpoint.load(args.verifier)[0]
    ids, B, shift = checkpoint.token_ids(processor.tokenizer, meta), args.block, bool(meta.get("label_shift", False))
    prompts = []
    for s in conversations(args.items, seed=5, families=["extract"]):
        enc = encode_sample(s, processor, 512)
        enc.response_ids = enc.response_ids[:0]
        prompts.append(enc)
    answers = [g.token_ids for p in prompts for g in ar_generate_cached(verifier, [p], args.max_new_tokens, ids)]
    cfg = DecodeConfig(block_size=B, mode="speculative", draft="block", max_new_tokens=args.max_new_tokens,
                       label_shift=shift)
    engine = [g for p in prompts for g in speculative_generate(drafter, [p], cfg, ids, verifier=verifier)]
    # (name, choices, branch continuation, branched depths); the verify forward's tokens: mean per step
    trees = [("chain", 1, 0, None), ("2nd choice, every depth, +4", 2, 4, None), ("2nd choice, every depth, +8", 2, 8, None),
             (f"2nd choice, every depth, +{B}", 2, B, None), ("3rd choice too, every depth, +8", 3, 8, None),
             ("2nd choice, 2 least sure, +8", 2, 8, 2), ("2nd choice, 4 least sure, +8", 2, 8, 4),
             ("2nd choice, 8 least sure, +8", 2, 8, 8)]
    rows = []
    for name, choices, cont, depths in trees:
        tokens = steps = width = 0
        for prompt, answer in zip(prompts, answers):
            p = 0
            while p < len(answer):
                top, sure = drafter_top(drafter, prompt, answer[:p], B, ids, shift, max(choices, 1))
                width += tree_tokens(B, choices, cont, branched(sure, choices, depths))
                # and the bonus token, where the answer has not ended (its EOS accepted as a draft)
                gained = min(accepted(top, sure, answer[p:], choices, cont, depths) + 1, len(answer) - p)
                p, tokens, steps = p + gained, tokens + gained, steps + 1
        rows.append({"tree": name, "verify_tokens": width / steps, "tpf": tokens / (2 * steps)})
    engine_tpf = sum(g.tokens for g in engine) / sum(g.nfe for g in engine)
    print(f"{'drafts verified per step':<34} {'tokens':>6} {'TPF':>5} {'× chain':>7}  ({args.items} extract "
          f"prompts, B{B}; the engine's draft=block: TPF {engine_tpf:.2f})")
    for r in rows:
        print(f"{r['tree']:<34} {r['verify_tokens']:>6.0f} {r['tpf']:>5.2f} {r['tpf'] / rows[0]['tpf']:>7.2f}")
    print(json.dumps({"checkpoint": args.checkpoint, "verifier": args.verifier, "items": args.items, "block": B,
                      "engine_block_tpf": engine_tpf, "rows": rows}))


if __name__ == "__main__":
    main()
