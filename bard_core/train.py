"""One training step in plain PyTorch (no Ray, no Prefect): forward, loss, backward, clip, step.

``train_step(model, batch, optimizer, cfg, teacher=None)`` dispatches on the batch type:
``PackedBatch`` → block-diffusion CE (+ top-K KD when a ``Teacher`` is given), ``ARBatch`` →
next-token CE. Logits are computed only at loss positions (the LM head dominates memory at a
151k vocabulary). The teacher runs under ``torch.no_grad`` in eval mode on the same packed
sequence under its own block-size mask.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from bard_core.config import TrainConfig
from bard_core.layout import ARBatch, PackedBatch
from bard_core.losses import ar_ce, diffusion_ce, distill_kd


@dataclass
class Teacher:
    model: torch.nn.Module
    block_size: int


def to_device(batch, device):
    """A copy of `batch` with every tensor field on `device`."""
    moved = {f.name: (v.to(device) if isinstance(v := getattr(batch, f.name), torch.Tensor) else v)
             for f in dataclasses.fields(batch)}
    return type(batch)(**moved)


class LogitsAtLossPositions(torch.nn.Module):
    """The VLM as a module whose forward returns logits [K, V] at a batch's loss positions.

    Wrapping it (not the bare VLM) in DistributedDataParallel keeps DDP's gradient hooks on the
    path `train_step` takes; the VLM itself stays an unmodified transformers model.
    """

    def __init__(self, vlm):
        super().__init__()
        self.vlm = vlm

    def forward(self, batch, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        inner = self.vlm.model
        if isinstance(batch, ARBatch):
            out = inner(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                        mm_token_type_ids=batch.mm_token_type_ids)
        else:
            out = inner(input_ids=batch.input_ids,
                        attention_mask=batch.attention_mask if attention_mask is None else attention_mask,
                        position_ids=batch.position_ids, pixel_values=batch.pixel_values,
                        image_grid_thw=batch.image_grid_thw, mm_token_type_ids=batch.mm_token_type_ids)
        return self.vlm.lm_head(out.last_hidden_state[batch.loss_sample, batch.loss_pos])


def _runner(model) -> torch.nn.Module:
    if isinstance(model, (LogitsAtLossPositions, torch.nn.parallel.DistributedDataParallel)):
        return model
    return LogitsAtLossPositions(model)


def packed_logits(model, batch: PackedBatch, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [K, V] at the batch's loss positions, under `attention_mask` (default: the batch's own)."""
    return _runner(model)(batch, attention_mask)


def ar_logits(model, batch: ARBatch) -> torch.Tensor:
    return _runner(model)(batch)


def compute_loss(model, batch, cfg: TrainConfig, teacher: Teacher | None = None) -> tuple[torch.Tensor, dict]:
    if isinstance(batch, ARBatch):
        result = ar_ce(ar_logits(model, batch), batch.labels, batch.loss_sample)
        return result.loss, {"loss": result.loss.item(), "ar_ce": result.loss.item(), "positions": result.num_positions}
    logits = packed_logits(model, batch)
    ce = diffusion_ce(logits, batch.labels, batch.weights, batch.loss_sample, batch.real_lens)
    loss = cfg.ce_weight * ce.loss
    metrics = {"ce": ce.loss.item(), "positions": ce.num_positions}
    if teacher is not None:
        teacher.model.eval()
        with torch.no_grad():
            teacher_logits = packed_logits(teacher.model, batch, batch.mask_for(teacher.block_size))
        kd = distill_kd(logits, teacher_logits, cfg.kd_top_k, cfg.kd_temperature)
        loss = loss + cfg.kd_weight * kd.loss
        metrics["kd"] = kd.loss.item()
    metrics["loss"] = loss.item()
    return loss, metrics


def train_step(model, batch, optimizer, cfg: TrainConfig, teacher: Teacher | None = None,
               scheduler=None) -> dict:
    """One optimisation step; returns float metrics (loss, ce, kd, grad_norm, lr, positions)."""
    model.train()
    loss, metrics = compute_loss(model, batch, cfg, teacher)  # `model`: a VLM, or its (DDP-wrapped) runner
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    metrics["grad_norm"] = float(grad_norm)
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    return metrics


def build_optimizer(model, cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW with the vision tower in its own group at `cfg.vision_lr_scale` × the phase's rate."""
    lr = cfg.lr if lr is None else lr
    vision_lr = lr * cfg.vision_lr_scale
    vision, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (vision if ".visual." in f".{name}" else rest).append(param)
    groups = [{"params": rest, "lr": lr}] + ([{"params": vision, "lr": vision_lr}] if vision else [])
    return torch.optim.AdamW(groups, betas=cfg.betas, weight_decay=cfg.weight_decay)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    """LR multiplier: linear warm-up to 1, then cosine down to `min_ratio` at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build_scheduler(optimizer, total_steps: int, warmup_steps: int, min_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps, min_ratio))
