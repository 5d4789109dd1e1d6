"""Block-diffusion decoding, batched, on one KV cache (METHOD.md §6); the AR baseline beside it (`engine.py`).

``generate(model, prompts, cfg, ids)`` decodes a batch of prompts block by block:

1. The prompt is prefilled (causal) into the cache; the first denoising forward of block 0 rides
   along (``[prompt ‖ B masks]`` in one forward; the masks' K/V are then dropped).
2. Each denoising forward reads the cache and never keeps what it writes: the cache is truncated
   back to the committed length afterwards. Per masked position: argmax and its fp32 probability
   (the mask token's logit is −inf). *dynamic*: accept every masked position above ``threshold``,
   and when none is, the leftmost masked one (``fallback="leftmost"``) or the most confident one
   (``"confident"``); *static*: accept the ``tokens_per_step`` most confident. With ``sure_eos``
   an ``<|im_end|>`` is proposed only above ``threshold`` (else the position's best other token):
   it ends the answer for good, where any other token can still be corrected.
   *Correction*: a visible, not yet committed token whose argmax differs with probability above
   ``edit_threshold`` is replaced, at most ``max_edits_per_position`` times per position.
3. A full block is committed — its K/V kept — fused with the next block's first denoising forward
   (``[block b ‖ B masks]``: one forward instead of two; ``fuse=False`` commits separately).
   With ``label_shift`` (checkpoints trained so), token j is read at position j−1 and a block's
   first token at the last committed position.
4. A row stops after the block holding its first ``<|im_end|>``; finished rows leave the batch
   (and the cache) while the others continue. With ``finish_at_eos`` a row stops denoising its block
   as soon as every position up to a visible ``<|im_end|>`` is visible (the rest is discarded).

The prompt batch, the cache, the stop rule and the AR baseline (``ar_generate_cached``, re-exported here)
are `bard_core/engine.py`'s, shared with the speculative mode (`bard_core/speculative.py`).
"""

from __future__ import annotations

import time

import torch

from bard_core.config import DecodeConfig
from bard_core.engine import (  # noqa: F401  (TokenIds, Generation, ar_generate_cached: re-exported for readers)
    Generation,
    TokenIds,
    _Context,
    _finished,
    _forward,
    _prompt_rows_mask,
    _Rows,
    _text_positions,
    _truncate,
    ar_generate_cached,
)
from bard_core.inputs import EncodedSample
from bard_core.static_kv import new_cache


def _pick(logits: torch.Tensor, cfg: DecodeConfig, mask_id: int, generator,
          eos_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and its fp32 probability per position; the mask token is never proposed. With
    ``cfg.sure_eos`` in dynamic mode (and `eos_id`), <|im_end|> is proposed only where its probability
    clears ``cfg.threshold``; elsewhere the position proposes its best other token, at that token's
    own (not renormalised) probability."""
    logits = logits.float()
    logits[..., mask_id] = float("-inf")
    probs = torch.softmax(logits / (cfg.temperature or 1.0), dim=-1)
    if cfg.sure_eos and cfg.mode == "dynamic" and eos_id is not None:
        probs[..., eos_id] = torch.where(probs[..., eos_id] <= cfg.threshold, 0.0, probs[..., eos_id])
    if cfg.temperature == 0:
        conf, token = probs.max(dim=-1)
        return token, conf
    probs = probs / probs.sum(-1, keepdim=True)
    if cfg.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < cfg.top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    flat = probs.reshape(-1, probs.shape[-1])
    token = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
    return token, probs.gather(-1, token[..., None])[..., 0]


def _accept(conf, masked, cfg: DecodeConfig, last_step: bool) -> torch.Tensor:
    """Which masked positions take their proposal this step (dynamic threshold or static count)."""
    ranked_conf = torch.where(masked, conf, torch.full_like(conf, -1.0))
    if last_step:  # safety: never leave masks behind
        return masked.clone()
    if cfg.mode == "dynamic":
        accept = masked & (conf > cfg.threshold)
        rows = torch.arange(conf.shape[0])
        pick = masked.int().argmax(dim=1) if cfg.fallback == "leftmost" else ranked_conf.argmax(dim=1)
        accept[rows, pick] |= masked[rows, pick] & ~accept.any(dim=1)  # progress when none is sure
        return accept
    ranked = ranked_conf.topk(min(cfg.tokens_per_step, conf.shape[1]), dim=1).indices
    return torch.zeros_like(masked).scatter(1, ranked, True) & masked


def _finish_at_eos(block: torch.Tensor, visible: torch.Tensor, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose block is visible up to and including a visible EOS are done: the positions after
    that EOS (never read back) become EOS and visible, so the row takes no further forwards."""
    eos_at = visible & (block == eos)
    has_eos = eos_at.any(dim=1)
    first = torch.where(has_eos, eos_at.int().argmax(dim=1), block.shape[1])  # block length: no EOS
    after = torch.arange(block.shape[1])[None, :] > first[:, None]
    done = has_eos & (visible | after).all(dim=1)
    fill = done[:, None] & after
    return torch.where(fill, torch.full_like(block, eos), block), visible | done[:, None]


@torch.no_grad()
def generate(model, prompts: list[EncodedSample], cfg: DecodeConfig, ids: TokenIds, *, use_cache: bool = True,
             fuse: bool = True, generator: torch.Generator | None = None, verifier=None,
             static: bool | None = None) -> list[Generation]:
    """Block-diffusion decoding of a batch of prompts (see module docstring); ``cfg.mode == "speculative"``:
    the lossless mode, whose output is the greedy answer of `verifier` (default: these weights). `static`: the
    static cache and CUDA graphs (default: on CUDA; `bard_core/static_kv.py`)."""
    if ids.mask is None:
        raise ValueError("block-diffusion decoding needs a mask token id (bard.json token_ids or the recipe's "
                         "model.mask_token_id)")
    if cfg.mode == "speculative":  # lossless mode: bard_core/speculative.py
        from bard_core.speculative import speculative_generate

        return speculative_generate(model, prompts, cfg, ids, verifier, fuse)
    model.eval()
    device = next(model.parameters()).device
    B = cfg.block_size
    max_steps = cfg.max_steps_per_block or B
    rows = _Rows(model, prompts, ids.pad)
    n = len(prompts)
    out = [Generation([], 0, 0, 0.0) for _ in range(n)]
    active = torch.arange(n)  # original index of each live row
    blocks = -(-cfg.max_new_tokens // B)  # the cache holds the prompt and the committed blocks; a forward, 2B more
    cache = new_cache(model, n, rows.ids.shape[1] + (blocks + 2) * B, static) if use_cache else None
    kept_valid = torch.zeros(n, 0, dtype=torch.bool)  # which cache slots are real tokens (not left padding)
    ctx: _Context | None = _Context(rows.ids, rows.positions, rows.types, rows.valid, _prompt_rows_mask(rows.valid))
    pixels, grids = rows.pixel_values, rows.image_grid_thw  # ride along while the prompt is in `ctx`
    next_pos = rows.next_pos.clone()
    last_ctx = None  # hidden state of the last committed position (label-shift decoding reads it)
    start = time.perf_counter()

    for _ in range(blocks):
        m = active.numel()
        block = torch.full((m, B), ids.mask, dtype=torch.long)
        visible = torch.zeros(m, B, dtype=torch.bool)
        edits = torch.zeros(m, B, dtype=torch.long)
        steps = torch.zeros(m, dtype=torch.long)
        block_pos = _text_positions(next_pos, B)
        for step in range(max_steps):
            decoding = ~visible.all(dim=1)
            if not decoding.any():
                break
            if ctx is not None:  # [context ‖ block] in one forward; only the context's K/V are kept
                c = ctx.ids.shape[1]
                new = ctx.then(block, block_pos)
                full = _forward(model, cache, new.ids, new.positions, kept_valid, new.mask, device, pixels, grids,
                                new.types)
                h, last_ctx = full[:, c:], full[:, c - 1]
                if use_cache:
                    kept_valid = torch.cat([kept_valid, ctx.valid], dim=1)
                    ctx, pixels, grids = None, None, None
            else:  # a pure denoising forward: reads the cache, keeps nothing
                h = _forward(model, cache, block, block_pos, kept_valid, torch.ones(m, B, B, dtype=torch.bool), device)
            if use_cache:
                _truncate(cache, kept_valid.shape[1])
            if cfg.label_shift:  # token j is read at j-1; token 0 at the last committed (or prompt) position
                h = torch.cat([last_ctx[:, None], h[:, :-1]], dim=1)
            token, conf = (t.cpu() for t in _pick(model.lm_head(h), cfg, ids.mask, generator, ids.eos))
            for i in torch.nonzero(decoding).flatten().tolist():
                out[int(active[i])].nfe += 1
                steps[i] += 1
            masked = ~visible & decoding[:, None]
            accept = _accept(conf, masked, cfg, last_step=step == max_steps - 1)
            edit = (visible & decoding[:, None] & (token != block) & (conf > cfg.edit_threshold)
                    & (edits < cfg.max_edits_per_position))
            block = torch.where(accept | edit, token, block)
            edits += edit.long()
            visible |= accept
            if cfg.finish_at_eos:
                block, visible = _finish_at_eos(block, visible, ids.eos)

        now = time.perf_counter() - start
        finished = torch.zeros(m, dtype=torch.bool)
        for i in range(m):
            g = out[int(active[i])]
            g.steps_per_block.append(int(steps[i]))
            g.edits += int(edits[i].sum())
            g.token_ids += block[i].tolist()
            if ids.eos in block[i].tolist() or len(g.token_ids) >= cfg.max_new_tokens:
                finished[i], g.seconds = True, now
        keep = torch.nonzero(~finished).flatten()
        if keep.numel() == 0:
            break
        if keep.numel() < m:  # finished rows leave the batch and the cache
            if use_cache:
                cache.batch_select_indices(keep.to(device))
            kept_valid, block, block_pos = kept_valid[keep], block[keep], block_pos[:, keep]
            active, next_pos = active[keep], next_pos[keep]
            if ctx is not None:
                ctx = ctx.select(keep)
                pixels, grids = _select_images(prompts, active)
        if not use_cache:
            ctx = ctx.then(block, block_pos)
        elif fuse:
            ctx = _Context.block(block, block_pos)  # committed by the next forward
        else:  # commit now, in a forward of its own
            committed = _Context.block(block, block_pos)
            last_ctx = _forward(model, cache, committed.ids, committed.positions, kept_valid, committed.mask,
                                device)[:, -1]
            kept_valid = torch.cat([kept_valid, committed.valid], dim=1)
            for i in active.tolist():
                out[i].nfe += 1
        next_pos = next_pos + B

    return _finished(out, ids.eos, cfg.max_new_tokens, start)


def _select_images(prompts: list[EncodedSample], rows: torch.Tensor):
    pixels = [prompts[int(i)].pixel_values for i in rows if prompts[int(i)].pixel_values is not None]
    grids = [prompts[int(i)].image_grid_thw for i in rows if prompts[int(i)].image_grid_thw is not None]
    return (torch.cat(pixels) if pixels else None), (torch.cat(grids) if grids else None)


