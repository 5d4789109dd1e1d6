"""One training step in plain PyTorch (no Ray, no Prefect): forward, loss, backward, clip, step.

``train_step(model, batch, optimizer, cfg, teacher=None)`` dispatches on the batch type:
``PackedBatch`` → block-diffusion CE (+ top-K KD when a ``Teacher`` is given, + top-K KD from the
frozen AR base at the positions with an AR context when an ``anchor`` is given), ``ARBatch`` →
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
from bard_core.layout import ARBatch, PackedBatch, ar_batch
from bard_core.losses import ar_ce, diffusion_ce, distill_kd, soft_ce, top_k_targets


@dataclass
class Teacher:
    model: torch.nn.Module
    block_size: int | None  # None: an AR model, read through the batch's causal view (`ar_teacher_view`)


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


def compute_loss(model, batch, cfg: TrainConfig, teacher: Teacher | None = None,
                 anchor: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict]:
    """The batch's loss and float metrics. `anchor`: the frozen AR base, for ``cfg.anchor_weight``."""
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
            if teacher.block_size is None:
                teacher_logits = packed_logits(teacher.model, batch.ar_teacher_view(cfg.label_shift))
            else:
                teacher_logits = packed_logits(teacher.model, batch, batch.mask_for(teacher.block_size))
        kd = distill_kd(logits, teacher_logits, cfg.kd_top_k, cfg.kd_temperature)
        loss = loss + cfg.kd_weight * kd.loss
        metrics["kd"] = kd.loss.item()
    if cfg.anchor_weight > 0 and (batch.anchor_ids is not None or anchor is not None):
        exact = batch.ar_exact()
        if batch.anchor_ids is not None:  # precomputed with `anchor_targets`
            ids, probs = batch.anchor_ids, batch.anchor_probs
        else:
            anchor.eval()
            with torch.no_grad():
                ids, probs = top_k_targets(packed_logits(anchor, batch.ar_view(exact)), cfg.kd_top_k,
                                           cfg.kd_temperature)
        kd = soft_ce(logits[exact], ids, probs, cfg.kd_temperature)
        loss = loss + cfg.anchor_weight * kd.loss
        metrics["anchor"] = kd.loss.item()
    metrics["loss"] = loss.item()
    return loss, metrics


class BasePull:
    """Moves each trained weight `strength` × its group's current rate of the way back to its value at the
    stage's start after every step (``train.base_pull``): L2-SP decoupled from Adam's scaling, as AdamW decouples
    weight decay, so the pull is the same whatever a weight's gradient history.

    `start` maps parameter names (as ``model.named_parameters()`` gives them) to the starting weights, laid out
    like the model's (sharded alike under FSDP); `None` takes the model's current weights."""

    def __init__(self, model: torch.nn.Module, strength: float, start: dict[str, torch.Tensor] | None = None):
        own = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if start is not None and (missing := sorted(set(own) - set(start))):
            raise ValueError(f"BasePull: no starting weights for {missing[:3]} ({len(missing)} parameters)")
        self.strength = strength
        # a given start is the caller's and never trained: kept as it is, not copied a second time
        self.start = {id(p): p.detach().clone() if start is None else start[name].detach() for name, p in own.items()}

    @torch.no_grad()
    def __call__(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            rate = group["lr"] * self.strength
            for p in group["params"]:
                p.sub_((p - self.start[id(p)]) * rate)


def train_step(model, batch, optimizer, cfg: TrainConfig, teacher: Teacher | None = None,
               scheduler=None, anchor: torch.nn.Module | None = None, pull: BasePull | None = None) -> dict:
    """One optimisation step; returns float metrics (loss, ce, kd, anchor, grad_norm, lr, positions).

    `batch` may be a list of equal-sized micro-batches (``train.grad_accum_steps``): their gradients are
    accumulated, each loss divided by their number, and synchronised across workers on the last one only.
    The CE, a mean over samples, is then exactly the whole batch's; KD and anchor terms are means over
    positions, so theirs are the mean of the micro-batches' means."""
    model.train()
    micro = batch if isinstance(batch, list) else [batch]
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    for i, part in enumerate(micro):
        with _gradient_sync(model, i == len(micro) - 1):
            loss, metrics = compute_loss(model, part, cfg, teacher, anchor)  # `model`: a VLM or its runner
            (loss / len(micro)).backward()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
    metrics = {k: (v if k == "positions" else v / len(micro)) for k, v in sums.items()}
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    if pull is not None:
        pull(optimizer)
    if scheduler is not None:
        scheduler.step()
    metrics["grad_norm"] = float(grad_norm)
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    return metrics


def _gradient_sync(model, sync: bool):
    """A context in which `model`'s backward all-reduces its gradients only when `sync` (DDP's `no_sync`;
    FSDP2's `set_requires_gradient_sync`); a plain module has nothing to synchronise."""
    import contextlib

    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    elif not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder and vision block's activations in the backward instead of keeping them
    (``train.activation_checkpointing``): per block, only its input is kept. Call before wrapping."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


@torch.no_grad()
def anchor_targets(model, samples: list, pad_id: int, top_k: int, temperature: float = 1.0) -> list:
    """Attach the AR anchor's targets to each sample (``anchor_ids``/``anchor_probs``: the AR model's top-K
    next-token distribution at every response token, from one causal forward). They depend on the sample
    alone, not on the noise or the block size, so a chain computes them once for all its stages."""
    batch = ar_batch(samples, pad_id)
    model.eval()
    device = next(model.parameters()).device
    ids, probs = top_k_targets(ar_logits(model, to_device(batch, device)), top_k, temperature)
    for sample, i, p in zip(samples, ids.cpu().split(batch.real_lens), probs.cpu().split(batch.real_lens)):
        sample.anchor_ids, sample.anchor_probs = i.int(), p
    return samples


def freeze_fixed(model, cfg: TrainConfig):
    """Freeze the vision tower when its rate is 0 (`TrainConfig.vision_lr_scale`): no gradient and no
    backward through it, rather than gradients computed for a zero step. Call before wrapping (DDP/FSDP)."""
    if cfg.vision_lr_scale == 0:
        for name, param in model.named_parameters():
            if ".visual." in f".{name}":
                param.requires_grad_(False)
    return model


def build_optimizer(model, cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW with the vision tower in its own group at `cfg.vision_lr_scale` × the phase's rate."""
    lr = cfg.lr if lr is None else lr
    vision_lr = lr * cfg.vision_lr_scale
    vision, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (vision if ".visual." in f".{name}" else rest).append(param)
    groups = [{"params": rest, "lr": lr}] + ([{"params": vision, "lr": vision_lr}] if vision and vision_lr else [])
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
