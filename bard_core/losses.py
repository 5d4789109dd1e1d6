"""Losses (METHOD.md §4), each returning a small result so logging never recomputes.

- ``diffusion_ce``: ``ℓ_k = CE(logits_k, x0_k) / t_k`` over corrupted noisy positions, summed per
  sample, divided by the sample's real response length, averaged over samples (fp32).
- ``distill_kd``: forward KL to the teacher's top-K: ``mean_k Σ_{j∈topK} q_kj · (−log softmax(s_k/T)_j)``
  with ``q_k`` the teacher's renormalised top-K softmax at temperature T.
- ``ar_ce``: next-token CE on response tokens, averaged over tokens (or per sample, then over samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossResult:
    loss: torch.Tensor  # scalar, differentiable
    per_sample: torch.Tensor  # [N] detached
    num_positions: int


def diffusion_ce(logits_KV: torch.Tensor, labels_K: torch.Tensor, weights_K: torch.Tensor,
                 sample_K: torch.Tensor, real_lens_N: list[int] | torch.Tensor) -> LossResult:
    real = torch.as_tensor(real_lens_N, dtype=torch.float32, device=logits_KV.device)
    ce = F.cross_entropy(logits_KV.float(), labels_K, reduction="none") * weights_K
    per_sample = torch.zeros_like(real).index_add(0, sample_K, ce) / real
    return LossResult(per_sample.mean(), per_sample.detach(), int(labels_K.numel()))


def top_k_targets(teacher_KV: torch.Tensor, top_k: int = 16,
                  temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-K token ids [K, k] and their softmax at `temperature`, renormalised over the k."""
    teacher_KV = teacher_KV.detach().float()
    top_logits, top_ids = teacher_KV.topk(min(top_k, teacher_KV.shape[-1]), dim=-1)
    return top_ids, torch.softmax(top_logits / temperature, dim=-1)


def distill_kd(student_KV: torch.Tensor, teacher_KV: torch.Tensor, top_k: int = 16,
               temperature: float = 1.0) -> LossResult:
    return soft_ce(student_KV, *top_k_targets(teacher_KV, top_k, temperature), temperature)


def soft_ce(student_KV: torch.Tensor, ids_Kk: torch.Tensor, q_Kk: torch.Tensor, temperature: float = 1.0) -> LossResult:
    """``mean_k Σ_j q_kj · (−log softmax(s_k/T)_{ids_kj})``: KD to precomputed top-K targets."""
    log_p = torch.log_softmax(student_KV.float() / temperature, dim=-1).gather(-1, ids_Kk.long())
    per_position = -(q_Kk.float() * log_p).sum(-1)
    loss = per_position.mean() if per_position.numel() else student_KV.sum() * 0.0
    return LossResult(loss, per_position.detach(), int(per_position.numel()))


def ar_ce(logits_KV: torch.Tensor, labels_K: torch.Tensor, sample_K: torch.Tensor | None = None) -> LossResult:
    """Mean over tokens, or with `sample_K` mean over samples of each sample's token mean (so a
    2-token answer weighs as much as a 60-token listing)."""
    ce = F.cross_entropy(logits_KV.float(), labels_K, reduction="none")
    if sample_K is None:
        return LossResult(ce.mean(), ce.detach(), int(labels_K.numel()))
    n = int(sample_K.max()) + 1
    sums = torch.zeros(n, device=ce.device).index_add(0, sample_K, ce)
    counts = torch.zeros(n, device=ce.device).index_add(0, sample_K, torch.ones_like(ce))
    per_sample = sums / counts.clamp(min=1)
    return LossResult(per_sample.mean(), per_sample.detach(), int(labels_K.numel()))
