"""Block-diffusion attention masks (METHOD.md §2), as pure functions of lengths and block size.

``attention_mask(P, R, B)`` is the training mask over ``[prompt (P) ‖ clean (R) ‖ noisy (R)]``;
``attention_mask(P, R, B, with_noisy=False)`` is the inference mask over ``[prompt ‖ response]``,
where the last block is the one being denoised. True = may attend. For P=2, B=2, R=4::

    q\\k  p0 p1 | c0 c1 c2 c3 | n0 n1 n2 n3
    p0    1  . |  .  .  .  . |  .  .  .  .
    p1    1  1 |  .  .  .  . |  .  .  .  .
    c0    1  1 |  1  1  .  . |  .  .  .  .
    c1    1  1 |  1  1  .  . |  .  .  .  .
    c2    1  1 |  1  1  1  1 |  .  .  .  .
    c3    1  1 |  1  1  1  1 |  .  .  .  .
    n0    1  1 |  .  .  .  . |  1  1  .  .
    n1    1  1 |  .  .  .  . |  1  1  .  .
    n2    1  1 |  1  1  .  . |  .  .  1  1
    n3    1  1 |  1  1  .  . |  .  .  1  1

Clean rows never see noisy tokens (the reference code lets them: a train/inference mismatch), so
the K/V of committed blocks are exactly what decoding caches. ``prompt_mask="block"`` makes the
prompt block-causal in chunks of B (the reference's choice) instead of causal.
"""

from __future__ import annotations

import torch

PROMPT, CLEAN, NOISY, PAD = 0, 1, 2, 3


def segments(prompt_len: int, response_len: int, with_noisy: bool = True, total_len: int | None = None):
    """Per position: segment id (PROMPT/CLEAN/NOISY/PAD) and index within the segment. Shapes [L]."""
    parts = [(PROMPT, prompt_len), (CLEAN, response_len)] + ([(NOISY, response_len)] if with_noisy else [])
    used = sum(n for _, n in parts)
    total_len = used if total_len is None else total_len
    if total_len < used:
        raise ValueError(f"total_len={total_len} < prompt+response(s)={used}")
    parts.append((PAD, total_len - used))
    seg = torch.cat([torch.full((n,), s, dtype=torch.long) for s, n in parts])
    idx = torch.cat([torch.arange(n) for _, n in parts])
    return seg, idx


def attention_mask(prompt_len: int, response_len: int, block_size: int, prompt_mask: str = "causal",
                   with_noisy: bool = True, total_len: int | None = None) -> torch.Tensor:
    """Bool mask [L, L] (True = may attend); see the module docstring. Padding rows see only themselves."""
    if block_size < 1 or prompt_len < 0 or response_len < 0:
        raise ValueError(f"bad lengths: P={prompt_len} R={response_len} B={block_size}")
    if prompt_mask not in ("causal", "block"):
        raise ValueError(f"prompt_mask={prompt_mask!r}: expected 'causal' or 'block'")
    seg, idx = segments(prompt_len, response_len, with_noisy, total_len)
    block = idx // block_size
    q_seg, k_seg = seg[:, None], seg[None, :]
    q_idx, k_idx = idx[:, None], idx[None, :]
    q_blk, k_blk = block[:, None], block[None, :]

    if prompt_mask == "causal":
        prompt_rows = k_idx <= q_idx
    else:
        prompt_rows = k_blk <= q_blk
    mask = (q_seg == PROMPT) & (k_seg == PROMPT) & prompt_rows
    response_rows = (q_seg == CLEAN) | (q_seg == NOISY)
    mask |= response_rows & (k_seg == PROMPT)
    mask |= (q_seg == CLEAN) & (k_seg == CLEAN) & (k_blk <= q_blk)
    mask |= (q_seg == NOISY) & (k_seg == CLEAN) & (k_blk < q_blk)
    mask |= (q_seg == NOISY) & (k_seg == NOISY) & (k_blk == q_blk)
    # Padding attends to itself only: a fully masked row gives NaN gradients on some GPU kernels.
    mask |= (q_seg == PAD) & (k_seg == PAD) & (q_idx == k_idx)
    return mask


def batch_attention_mask(prompt_lens: list[int], response_lens: list[int], total_len: int, block_size: int,
                         prompt_mask: str = "causal", with_noisy: bool = True) -> torch.Tensor:
    """Stack per-sample masks, right-padded to `total_len`: bool [N, 1, L, L]."""
    return torch.stack([
        attention_mask(p, r, block_size, prompt_mask, with_noisy, total_len)
        for p, r in zip(prompt_lens, response_lens)
    ])[:, None]
