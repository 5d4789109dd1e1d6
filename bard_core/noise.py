"""Noise: per-block levels and the corruption schedules (METHOD.md §3).

Levels: one ``t`` per response block, stratified over (0, 1) and shuffled:
``t_i = (u_i + i) / n`` with ``u_i ~ U(0, 1)``, permuted, clamped to ``[t_min, 1]`` (bounding the
``1/t`` loss weights; the reference lets them reach ~1e5).

Schedules (``SCHEDULES[name](x0, t, mask_token_id, substitute_ids, generator) -> xt``; ``t`` is per token):
- ``mask``:  each token becomes the mask token with probability ``t``.
- ``mixed``: with ``φ = (π/2)·t``: mask with probability ``1 − cos φ``, a uniformly drawn ordinary
  token with probability ``sin φ + cos φ − 1``, kept with probability ``1 − sin φ``.

Prefix (``prefix_noise``, mixed into either schedule per block with ``NoiseConfig.prefix_prob``): a block keeps
a clean prefix of k tokens, k uniform over its real positions, and the rest is masked, at level 1: the state a
decoder committing left to right is in, which the i.i.d. schedules almost never draw in a large block.
`corrupt` composes the three.
"""

from __future__ import annotations

import math

import torch


def block_levels(n_blocks: int, t_min: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stratified, shuffled, clamped noise levels: float [n_blocks] in [t_min, 1]."""
    if n_blocks < 1:
        raise ValueError(f"n_blocks={n_blocks}: need at least one block")
    u = torch.rand(n_blocks, generator=generator)
    t = (u + torch.arange(n_blocks)) / n_blocks
    t = t[torch.randperm(n_blocks, generator=generator)]
    return t.clamp(min=t_min, max=1.0)


def mixed_probabilities(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p_mask, p_substitute, p_keep) of the mixed schedule at level t; they sum to 1."""
    phi = t * (math.pi / 2)
    p_mask = 1 - torch.cos(phi)
    p_keep = 1 - torch.sin(phi)
    return p_mask, 1 - p_mask - p_keep, p_keep


def mask_noise(x0: torch.Tensor, t: torch.Tensor, mask_token_id: int, substitute_ids: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Each token → mask token with probability t (`substitute_ids` unused; same signature as mixed)."""
    u = torch.rand(x0.shape, generator=generator)
    return torch.where(u < t, torch.full_like(x0, mask_token_id), x0)


def mixed_noise(x0: torch.Tensor, t: torch.Tensor, mask_token_id: int, substitute_ids: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask / substitute / keep with the probabilities of `mixed_probabilities`."""
    if substitute_ids.numel() == 0:
        raise ValueError("mixed noise needs at least one ordinary token to substitute")
    p_mask, p_sub, _ = mixed_probabilities(t)
    u = torch.rand(x0.shape, generator=generator)
    pick = torch.randint(0, substitute_ids.numel(), x0.shape, generator=generator)
    xt = torch.where(u < p_mask + p_sub, substitute_ids[pick], x0)
    return torch.where(u < p_mask, torch.full_like(x0, mask_token_id), xt)


SCHEDULES = {"mask": mask_noise, "mixed": mixed_noise}


def prefix_noise(x0: torch.Tensor, block_size: int, real: int, mask_token_id: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Every block of `x0` (its first `real` tokens the response) as [clean prefix of k ‖ masks], k < the block's
    real tokens, uniform."""
    n_blocks = x0.numel() // block_size
    in_block = (real - torch.arange(n_blocks) * block_size).clamp(1, block_size)
    k = (torch.rand(n_blocks, generator=generator) * in_block).long()
    r = torch.arange(x0.numel())
    return torch.where(r % block_size < k[r // block_size], x0, torch.full_like(x0, mask_token_id))


def corrupt(x0: torch.Tensor, block_size: int, real: int, kind: str, t_min: float, mask_token_id: int,
            substitute_ids: torch.Tensor, prefix_prob: float = 0.0,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The noisy copy of a response `x0` (padded to whole blocks; its first `real` tokens are real) and each
    token's level: per block a level from `block_levels` and the `kind` schedule, or, with probability
    `prefix_prob`, `prefix_noise` at level 1."""
    n_blocks = x0.numel() // block_size
    t = block_levels(n_blocks, t_min, generator).repeat_interleave(block_size)
    xt = get_schedule(kind)(x0, t, mask_token_id, substitute_ids, generator)
    if prefix_prob > 0:
        prefixed = (torch.rand(n_blocks, generator=generator) < prefix_prob).repeat_interleave(block_size)
        xt = torch.where(prefixed, prefix_noise(x0, block_size, real, mask_token_id, generator), xt)
        t = torch.where(prefixed, torch.ones_like(t), t)
    return xt, t


def get_schedule(name: str):
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def ordinary_token_ids(vocab_size: int, special_ids: set[int]) -> torch.Tensor:
    """Token ids a substitution may draw: everything except the special tokens (mask included)."""
    keep = torch.ones(vocab_size, dtype=torch.bool)
    keep[[i for i in special_ids if 0 <= i < vocab_size]] = False
    return torch.nonzero(keep).flatten()
