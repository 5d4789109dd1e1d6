"""Lossless mode: self-speculative block decoding (``DecodeConfig.mode = "speculative"``).

One set of weights is both drafter and verifier, on one KV cache. Each step, per row:

1. **Draft** (one forward, block-diffusion mask): ``[ctx ‖ B masks]`` where ``ctx`` holds the exact tokens
   not yet in the cache (the prompt first, then the last step's bonus token). ``ctx`` attends causally and
   never sees the masks, so its last hidden state is the AR model's: the first drafted token is AR's greedy
   token, exact. The masks propose the next B−1 (argmax; label shift as the checkpoint was trained). Only
   ``ctx``'s K/V are kept.
2. **Verify** (one forward, causal mask): the B drafted tokens. The hidden state after drafted token j is
   AR's prediction for token j+1; drafted tokens are accepted while they equal it, and the prediction after
   the last accepted one is the *bonus* token (exact: it becomes the next step's ``ctx``). All B K/V are
   written; the rejected ones stay in the cache as holes the attention mask hides, so rows of a batch
   accept different lengths and still share one cache.

The draft is ``DecodeConfig.draft`` wide: B masks, or (adaptive, the default) from 8 up to B as the rows
accept (`_next_width`); B below stands for that width.

Per step a row gains 2 + a exact tokens (the first draft, a accepted drafts, the bonus) for 2 forwards: never
fewer tokens per forward than AR. With ``fuse``, after a step in which every row accepted every draft, the verify
forward also carries B masks that see every drafted token; when every row accepts every draft again, they are the
next step's drafts (after the bonus) and its draft forward is skipped (``look_ahead="always"``: in every step,
the rule before 2026-12-07). With another model as verifier (the AR base), see `_with_verifier`.

With greedy decoding the output is the verifier's `engine.ar_generate_cached` answer token for token, up to
ties that floating-point summation order can break (docs/decoding.md "Lossless mode").
"""

from __future__ import annotations

import time

import torch

from bard_core.config import DecodeConfig
from bard_core.engine import (
    Generation,
    TokenIds,
    _Context,
    _finished,
    _forward,
    _prompt_rows_mask,
    _Rows,
    _text_positions,
    _truncate,
)
from bard_core.inputs import EncodedSample


def _greedy(model, h: torch.Tensor, mask_id: int) -> torch.Tensor:
    logits = model.lm_head(h).float()
    logits[..., mask_id] = float("-inf")  # as ar_generate_cached: the mask token is never a token
    return logits.argmax(dim=-1).cpu()


def draft_states(h: torch.Tensor, c: int, B: int, label_shift: bool) -> torch.Tensor:
    """The hidden states B drafted tokens are read from, after a ``[ctx ‖ B masks]`` forward: the first at ctx's
    last (causal) position, the others at the masks (label shift as the checkpoint was trained: token j read at
    position j−1)."""
    return torch.cat([h[:, c - 1:c], h[:, c:c + B - 1]], 1) if label_shift else \
        torch.cat([h[:, c - 1:c], h[:, c + 1:c + B]], 1)


def _draft(model, h: torch.Tensor, c: int, B: int, cfg: DecodeConfig, mask_id: int) -> torch.Tensor:
    return _greedy(model, draft_states(h, c, B, cfg.label_shift), mask_id)


def _next_width(width: int, gained: torch.Tensor, B: int, draft: str, first: bool = False) -> int:
    """The next step's draft width (``DecodeConfig.draft``): B, or adaptive — doubled (up to B) when every row
    accepted every draft (`gained`: per row, how many of its drafted tokens were exact), halved (down to 8, or B
    if smaller) when the rows gained a quarter of the width or less on average; ``"wide"``: its `first` step at B,
    then B again if every row accepted all of it, else adaptive from 8. A wider draft widens every row's forward
    and rarely pays on a CPU past an answer's opening (docs/decoding.md "Draft width")."""
    if draft == "block":
        return B
    if bool((gained >= width).all()):
        return min(B, 2 * width)
    if draft == "wide" and first:
        return min(B, 8)
    if float(gained.float().mean()) <= width / 4:
        return max(min(B, 8), width // 2)
    return width


@torch.no_grad()
def speculative_generate(model, prompts: list[EncodedSample], cfg: DecodeConfig, ids: TokenIds,
                         verifier=None, fuse: bool = True, look_ahead: str = "after_full") -> list[Generation]:
    """Greedy speculative decoding of a batch (module docstring): `model` drafts; `verifier` (default: the same
    weights) decides, and the output is its greedy answer. ``Generation.accepted`` holds, per step, the drafted
    tokens accepted (after the exact first one, with the same weights)."""
    from transformers import DynamicCache

    if ids.mask is None:
        raise ValueError("speculative decoding drafts with the mask token: the checkpoint needs one")
    if verifier is not None and verifier is not model:
        return _with_verifier(model, verifier, prompts, cfg, ids)
    model.eval()
    device = next(model.parameters()).device
    B, n = cfg.block_size, len(prompts)
    rows = _Rows(model, prompts, ids.pad)
    out = [Generation([], 0, 0, 0.0) for _ in range(n)]
    active = torch.arange(n)
    cache = DynamicCache(config=model.config.get_text_config())
    kept_valid = torch.zeros(n, 0, dtype=torch.bool)
    ctx = _Context(rows.ids, rows.positions, rows.types, rows.valid, _prompt_rows_mask(rows.valid))
    pixels, grids = rows.pixel_values, rows.image_grid_thw
    next_pos = rows.next_pos.clone()  # position of the first drafted token
    ahead = None  # the next step's drafts, read from the last verify forward when every row accepted all
    # look ahead only after a step in which every row accepted every draft: otherwise the B masks rarely pay
    # (at B = 32 almost never) and the verify forward carries 2B positions for nothing (docs/decoding.md)
    if look_ahead not in ("after_full", "always"):
        raise ValueError(f"look_ahead: 'after_full' or 'always', got {look_ahead!r}")
    all_accepted = True
    W, first = (B if cfg.draft in ("block", "wide") else min(B, 8)), True  # this step's draft width
    start = time.perf_counter()
    while True:
        m = active.numel()
        if ahead is None:  # 1. draft: [ctx ‖ W masks]; ctx is committed (its K/V kept), the masks' K/V dropped
            c = ctx.ids.shape[1]
            new = ctx.then(torch.full((m, W), ids.mask, dtype=torch.long), _text_positions(next_pos, W))
            h = _forward(model, cache, new.ids, new.positions, kept_valid, new.mask, device, pixels, grids, new.types)
            kept_valid = torch.cat([kept_valid, ctx.valid], dim=1)
            _truncate(cache, kept_valid.shape[1])
            pixels = grids = None
            draft, first_new = _draft(model, h, c, W, cfg, ids.mask), 0  # the first is AR's: exact
        else:  # drafted already; its first token is the last step's bonus (exact, output already)
            draft, first_new = ahead, 1
        W = draft.shape[1]
        # 2. verify: the drafted tokens under the causal mask (AR's prediction after each), followed — with
        # fuse — by masks that see them all: the next step's drafts if every drafted token is accepted
        ahead_masks = fuse and (all_accepted or look_ahead == "always")
        wide = _next_width(W, torch.full((m,), W), B, cfg.draft, first)  # the next width after a fully accepted step
        q = W + wide if ahead_masks else W
        mask = torch.zeros(q, q, dtype=torch.bool)
        mask[:W, :W] = torch.ones(W, W, dtype=torch.bool).tril()
        mask[W:] = True
        ids_v = torch.cat([draft, torch.full((m, q - W), ids.mask, dtype=torch.long)], 1)
        hv = _forward(model, cache, ids_v, _text_positions(next_pos, q), kept_valid, mask[None].expand(m, q, q),
                      device)
        predicted = _greedy(model, hv[:, :W], ids.mask)  # [m, W]: the token after each drafted one
        agree = (draft[:, 1:] == predicted[:, :-1]).long()
        accepted = agree.cumprod(dim=1).sum(dim=1)  # drafted tokens accepted after the exact first one
        kept_valid = torch.cat([kept_valid, torch.arange(W)[None, :] <= accepted[:, None]], dim=1)
        _truncate(cache, kept_valid.shape[1])  # the look-ahead masks' K/V
        bonus = predicted[torch.arange(m), accepted]
        ahead = None
        all_accepted = bool((accepted == W - 1).all())
        if ahead_masks and all_accepted:  # the bonus sits where the masks begin
            read = hv[:, W:W + wide - 1] if cfg.label_shift else hv[:, W + 1:W + wide]
            ahead = torch.cat([bonus[:, None], _greedy(model, read, ids.mask)], 1)
        finished = torch.zeros(m, dtype=torch.bool)
        now = time.perf_counter() - start
        for i in range(m):
            g = out[int(active[i])]
            g.nfe += 2 - first_new
            g.accepted.append(int(accepted[i]))
            g.token_ids += draft[i, first_new:int(accepted[i]) + 1].tolist() + [int(bonus[i])]
            if ids.eos in g.token_ids or len(g.token_ids) >= cfg.max_new_tokens:
                finished[i], g.seconds = True, now
        keep = torch.nonzero(~finished).flatten()
        if keep.numel() == 0:
            break
        W, first = _next_width(W, accepted[keep] + 1, B, cfg.draft, first), False  # a look-ahead's drafts keep theirs
        if keep.numel() < m:  # finished rows leave the batch and the cache
            cache.batch_select_indices(keep.to(device))
            kept_valid, bonus, accepted = kept_valid[keep], bonus[keep], accepted[keep]
            active, next_pos = active[keep], next_pos[keep]
            ahead = ahead[keep] if ahead is not None else None
        last_pos = next_pos + accepted + 1  # the bonus token's position
        if ahead is None:
            ctx = _Context.block(bonus[:, None], _text_positions(last_pos, 1))
            next_pos = last_pos + 1
        else:
            next_pos = last_pos  # the next drafts start with the bonus
    return _finished(out, ids.eos, cfg.max_new_tokens, start)


def _same_tower(a, b) -> bool:
    """Whether two models' vision towers are the same weights (a stage trained with its tower frozen,
    ``train.vision_lr_scale=0``, and its base)."""
    sa, sb = a.model.visual.state_dict(), b.model.visual.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and sa[k].device == sb[k].device and torch.equal(sa[k], sb[k]) for k in sa)


@torch.no_grad()
def _with_verifier(drafter, verifier, prompts: list[EncodedSample], cfg: DecodeConfig,
                   ids: TokenIds) -> list[Generation]:
    """Two models, two caches: the drafter drafts B tokens (``[ctx_d ‖ B masks]``), the verifier checks all B
    in one causal forward (``[ctx_v ‖ drafts]``) and adds its bonus token; a accepted drafts give a + 1 tokens
    for 2 forwards. ``ctx_d`` is what the drafter has not seen yet (the accepted drafts and the bonus: ragged
    per row, left-padded like a prompt batch), ``ctx_v`` the bonus. Where both have one vision tower
    (`_same_tower`), the prompts' images are encoded once, as AR decoding does."""
    from transformers import DynamicCache

    drafter.eval()
    verifier.eval()
    device = next(drafter.parameters()).device
    B, n = cfg.block_size, len(prompts)
    rows = _Rows(drafter, prompts, ids.pad)
    out = [Generation([], 0, 0, 0.0) for _ in range(n)]
    active = torch.arange(n)
    caches = [DynamicCache(config=m.config.get_text_config()) for m in (drafter, verifier)]
    valid = [torch.zeros(n, 0, dtype=torch.bool), torch.zeros(n, 0, dtype=torch.bool)]  # drafter's, verifier's
    prompt_ctx = _Context(rows.ids, rows.positions, rows.types, rows.valid, _prompt_rows_mask(rows.valid))
    ctx_d = ctx_v = prompt_ctx
    pixels, grids = rows.pixel_values, rows.image_grid_thw
    encoded = None  # with one tower, the images are encoded once for both prompt forwards
    if pixels is not None and _same_tower(drafter, verifier):
        encoded = verifier.model.get_image_features(pixels.to(device), grids.to(device), return_dict=True)
        pixels = None
    next_pos = rows.next_pos.clone()
    W, first = (B if cfg.draft in ("block", "wide") else min(B, 8)), True  # this step's draft width
    start = time.perf_counter()
    while True:
        m = active.numel()
        draft_pos = _text_positions(next_pos, W)
        c = ctx_d.ids.shape[1]
        new = ctx_d.then(torch.full((m, W), ids.mask, dtype=torch.long), draft_pos)
        h = _forward(drafter, caches[0], new.ids, new.positions, valid[0], new.mask, device, pixels, grids, new.types,
                     encoded)
        valid[0] = torch.cat([valid[0], ctx_d.valid], dim=1)
        _truncate(caches[0], valid[0].shape[1])
        draft = _draft(drafter, h, c, W, cfg, ids.mask)
        cv = ctx_v.ids.shape[1]
        new = ctx_v.then(draft, draft_pos)
        causal = new.mask & torch.ones_like(new.mask).tril()  # the drafts causal too: an AR forward
        hv = _forward(verifier, caches[1], new.ids, new.positions, valid[1], causal, device, pixels, grids, new.types,
                      encoded)
        pixels = grids = encoded = None
        predicted = _greedy(verifier, hv[:, cv - 1:], ids.mask)  # [m, W+1]: the token at next_pos + j
        accepted = (draft == predicted[:, :W]).long().cumprod(dim=1).sum(dim=1)
        valid[1] = torch.cat([valid[1], ctx_v.valid, torch.arange(W)[None, :] < accepted[:, None]], dim=1)
        bonus = predicted[torch.arange(m), accepted]
        finished = torch.zeros(m, dtype=torch.bool)
        now = time.perf_counter() - start
        for i in range(m):
            g = out[int(active[i])]
            g.nfe += 2
            g.accepted.append(int(accepted[i]))
            g.token_ids += draft[i, :int(accepted[i])].tolist() + [int(bonus[i])]
            if ids.eos in g.token_ids or len(g.token_ids) >= cfg.max_new_tokens:
                finished[i], g.seconds = True, now
        keep = torch.nonzero(~finished).flatten()
        if keep.numel() == 0:
            break
        if keep.numel() < m:
            for cache in caches:
                cache.batch_select_indices(keep.to(device))
            valid = [v[keep] for v in valid]
            draft, accepted, bonus, active, next_pos = draft[keep], accepted[keep], bonus[keep], active[keep], \
                next_pos[keep]
        m = active.numel()
        # the drafter has not seen the accepted drafts nor the bonus: left-padded to the longest row's, like a
        # prompt batch (not to W + 1: at batch 1 that made the draft forward up to twice as wide)
        width = int(accepted.max()) + 1
        pad = width - (accepted + 1)
        seq = torch.cat([draft, bonus[:, None]], dim=1)  # bonus at column W; accepted drafts at 0..a-1
        col = torch.arange(width)[None, :] - pad[:, None]  # index into seq's row, per column
        real = col >= 0
        take = torch.where(col >= accepted[:, None], torch.full_like(col, W), col).clamp(min=0)
        ids_d = torch.where(real, seq.gather(1, take), torch.full_like(take, ids.pad))
        pos = (next_pos[:, None] + col).clamp(min=0)
        ctx_d = _Context(ids_d, pos[None].expand(3, -1, -1).clone(), torch.zeros_like(ids_d), real,
                         _prompt_rows_mask(real))
        last_pos = next_pos + accepted  # the bonus token's position
        ctx_v = _Context.block(bonus[:, None], _text_positions(last_pos, 1))
        next_pos = last_pos + 1
        W, first = _next_width(W, accepted, B, cfg.draft, first), False  # `accepted`: the drafts that were exact
    return _finished(out, ids.eos, cfg.max_new_tokens, start)
