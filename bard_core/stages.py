"""Stage training in plain PyTorch (METHOD.md §5): merge at block size B, then distil from the last
promoted checkpoint. The Ray Train task wraps `train_phase`; `progressive_local` chains the stages
on one process (benchmarks, and the fallback when no Ray is wanted).

A checkpoint is an HF directory plus ``bard.json``: block size, parent, phase, steps, metrics,
label shift and prompt mask (what decoding must match).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from bard_core.checkpoint import load, save_checkpoint, weights_digest
from bard_core.config import NoiseConfig, TrainConfig
from bard_core.inputs import EncodedSample
from bard_core.layout import NoiseSpec, length_grouped, noise_spec_for, pack
from bard_core.train import Teacher, anchor_targets, build_optimizer, build_scheduler, train_step


def batches(pool: list[EncodedSample], model, block_size: int, spec: NoiseSpec, cfg: TrainConfig,
            seed: int) -> Iterator:
    """Endless packed batches drawn from `pool` (shuffled epochs, fresh noise every time; with
    ``cfg.group_by_length`` each window of 16 batches is grouped by length, see `length_grouped`)."""
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    order: list[EncodedSample] = []
    while True:
        if len(order) < cfg.batch_size:
            order = list(pool)
            rng.shuffle(order)
            if cfg.group_by_length:
                window = 16 * cfg.batch_size
                order = [s for i in range(0, len(order), window)
                         for s in length_grouped(order[i:i + window], cfg.batch_size, rng)]
        chosen, order = order[: cfg.batch_size], order[cfg.batch_size:]
        yield pack(chosen, model, block_size, spec, prompt_mask=cfg.prompt_mask,
                   label_shift=cfg.label_shift, pad_loss_weight=cfg.pad_loss_weight,
                   keep_loss_weight=cfg.keep_loss_weight, generator=generator)


def train_phase(model, batch_iter: Iterator, steps: int, cfg: TrainConfig, *, lr: float, min_ratio: float,
                warmup: int, teacher: Teacher | None = None, on_step: Callable[[int, dict], None] | None = None,
                start_step: int = 0, optimizer=None, scheduler=None) -> dict:
    """Run `steps` optimisation steps; returns the mean metrics of the last 10% of steps."""
    optimizer = optimizer or build_optimizer(model, cfg, lr)
    scheduler = scheduler or build_scheduler(optimizer, steps, min(warmup, steps // 2), min_ratio)
    tail: list[dict] = []
    for step in range(start_step, steps):
        metrics = train_step(model, next(batch_iter), optimizer, cfg, teacher=teacher, scheduler=scheduler)
        tail = (tail + [metrics])[-max(1, steps // 10):]
        if on_step is not None:
            on_step(step + 1, metrics)
    keys = {k for m in tail for k in m}
    return {k: sum(m.get(k, 0.0) for m in tail) / len(tail) for k in keys}


@dataclass
class StageResult:
    path: Path
    block_size: int
    metrics: dict
    seconds: float


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def anchored_pool(pool: list[EncodedSample], base: str | Path, spec: NoiseSpec, cfg: TrainConfig,
                        chunk: int = 32) -> list[EncodedSample]:
    """Copies of the pool's samples carrying the AR anchor's targets from the model at `base`."""
    model, _, _ = load(base)
    out = [copy.copy(s) for s in pool]
    for start in range(0, len(out), chunk):
        anchor_targets(model, out[start:start + chunk], spec.pad_id, cfg.kd_top_k, cfg.kd_temperature)
    return out


def progressive_local(base: str | Path, pool: list[EncodedSample], out_dir: str | Path, cfg: TrainConfig,
                      noise: NoiseConfig, *, log: Callable[[str], None] = print, seed: int = 0,
                      steps: list[tuple[int, int]] | None = None) -> list[StageResult]:
    """B = cfg.block_sizes in order: merge (init = previous stage) then distil from the previous stage.

    `steps` gives (merge, distill) per stage (default: cfg.merge_steps, cfg.distill_steps for all).
    Stages whose checkpoint already exists with the same fingerprint (parent path and weights, steps,
    hyper-parameters, noise, pool size) are loaded, not retrained.
    """
    steps = steps or [(cfg.merge_steps, cfg.distill_steps)] * len(cfg.block_sizes)
    if len(steps) != len(cfg.block_sizes):
        raise ValueError(f"steps has {len(steps)} entries for {len(cfg.block_sizes)} block sizes")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[StageResult] = []
    parent, parent_block = Path(base), None
    anchored = False
    for B, (merge_steps, distill_steps) in zip(cfg.block_sizes, steps):
        key = fingerprint(str(parent), weights_digest(parent), B, merge_steps, distill_steps, cfg.lr,
                          cfg.distill_lr_scale, cfg.vision_lr_scale, cfg.label_shift, cfg.batch_size, noise.kind,
                          noise.t_min, noise.prefix_prob, seed, len(pool), cfg.anchor_weight, cfg.keep_loss_weight)
        target = out_dir / f"B{B}"
        meta_path = target / "bard.json"
        if meta_path.exists() and json.loads(meta_path.read_text()).get("fingerprint") == key:
            meta = json.loads(meta_path.read_text())
            log(f"stage B={B}: cached at {target}")
            results.append(StageResult(target, B, meta["metrics"], meta["seconds"]))
            parent, parent_block = target, B
            continue
        started = time.monotonic()
        model, processor, _ = load(parent)
        spec = noise_spec_for(processor.tokenizer, noise.kind, noise.t_min, prefix_prob=noise.prefix_prob)
        if cfg.anchor_weight > 0 and not anchored:  # the base's targets, once for every stage of the chain
            pool = anchored_pool(pool, base, spec, cfg)
            anchored = True
        it = batches(pool, model, B, spec, cfg, seed + B)
        metrics = {"merge": train_phase(model, it, merge_steps, cfg, lr=cfg.lr, min_ratio=cfg.min_lr_ratio,
                                        warmup=cfg.warmup_steps)}
        if parent_block is not None and distill_steps:
            teacher_model, _, _ = load(parent)
            for p in teacher_model.parameters():
                p.requires_grad_(False)
            metrics["distill"] = train_phase(model, it, distill_steps, cfg, lr=cfg.distill_lr,
                                             min_ratio=cfg.distill_min_lr_ratio, warmup=cfg.warmup_steps,
                                             teacher=Teacher(teacher_model, parent_block))
        seconds = time.monotonic() - started
        meta = {"block_size": B, "parent": str(parent), "teacher": str(parent) if parent_block else None,
                "steps": {"merge": merge_steps, "distill": distill_steps if parent_block else 0},
                "metrics": metrics, "seconds": round(seconds, 1), "fingerprint": key, "objective": "diffusion",
                "label_shift": cfg.label_shift, "prompt_mask": cfg.prompt_mask, "noise": noise.kind,
                "prefix_prob": noise.prefix_prob, "anchor": str(base) if anchored else None,
                "keep_loss_weight": cfg.keep_loss_weight,
                "token_ids": {"mask": spec.mask_token_id, "eos": spec.eos_id, "pad": spec.pad_id}}
        save_checkpoint(model, processor, target, meta)
        log(f"stage B={B}: {json.dumps(metrics)} in {seconds:.0f}s -> {target}")
        results.append(StageResult(target, B, metrics, seconds))
        parent, parent_block = target, B
    return results
