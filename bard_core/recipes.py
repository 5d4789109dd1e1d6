"""Named recipes (standard library only, so flows import it cheaply).

A *recipe* bundles every setting of one pipeline run (`bard_core.config.Recipe`). Recipes are plain
functions (`tiny()`, `qwen3_vl_4b()`, ...); variants are `dataclasses.replace` of a base, and
`get_recipe(name, overrides)` applies dotted overrides such as ``{"train.lr": 1e-4}`` (`bard_core.overrides`).
"""

from __future__ import annotations

from typing import Any

from bard_core.config import (
    QWEN3_VL_MASK_TOKEN_ID,
    DataConfig,
    DecodeConfig,
    GateConfig,
    ModelConfig,
    NoiseConfig,
    Recipe,
    TrainConfig,
)
from bard_core.overrides import apply_overrides


def tiny() -> Recipe:
    """The embedded default: a tiny Qwen3-VL on the shapes world, 2 CPU cores."""
    return Recipe(
        name="tiny",
        model=ModelConfig(base="tiny"),
        # label_shift: measured on the shipped base, 300 B4 steps reach 0.72 masked-token accuracy with
        # shifted labels vs 0.47 without (the tiny AR head re-learns an unshifted output slowly).
        # vision_lr_scale 0: the vision tower stays the base's (no backward through it; the demo's budget,
        # docs/pipeline.md); checkpoint_every 100: ~45 s of steps lost at most on a crash
        # stages: the budget chain's schedule (benchmarks/stage_budget.py, docs/evaluation.md): B4 learns the
        # objective, short bridges at B8/B16, the largest share for B32, all at a gentle rate
        train=TrainConfig(lr=1e-3, vision_lr_scale=0.0, distill_lr_scale=0.3, warmup_steps=20,
                          batch_size=32, merge_steps=200, distill_steps=60, checkpoint_every=100, label_shift=True,
                          anchor_weight=2.0, keep_loss_weight=1.0,
                          stages={4: {"merge_steps": 450, "distill_steps": 0, "lr": 2.5e-4},
                                  8: {"merge_steps": 100, "distill_steps": 40, "lr": 2e-4},
                                  16: {"merge_steps": 100, "distill_steps": 40, "lr": 2e-4},
                                  32: {"merge_steps": 420, "distill_steps": 60, "lr": 2e-4}}),
        decode=DecodeConfig(max_new_tokens=96, batch_size=32),
        # min_tpf: what the chain reaches today, about one token per forward at every stage (docs/evaluation.md;
        # what was tried to raise it: docs/stage_budget.md, "Tokens per forward"); one threshold: lower ones
        # lost accuracy for ≤ 0.02 more TPF and cost 3× the gate's time (docs/pipeline.md)
        gate=GateConfig(limit=None, thresholds=(0.9,), min_tpf={4: 0.95, 8: 0.95, 16: 0.95, 32: 0.95}),
        data=DataConfig(max_tokens=512, min_image_side=32),
    )


def _qwen3_vl(size: str) -> Recipe:
    # 2B: a bf16 replica plus AdamW state (~16 GB) fits each GPU, so DDP; 4B/8B shard with FSDP (an 8B
    # student with fp32 master weights and AdamW state is ~128 GB before activations, and distillation
    # adds the teacher).
    parallel = "ddp" if size == "2B" else "fsdp"
    return Recipe(
        name=f"qwen3-vl-{size.lower()}",
        model=ModelConfig(base=f"Qwen/Qwen3-VL-{size}-Instruct", dtype="bfloat16",
                          mask_token_id=QWEN3_VL_MASK_TOKEN_ID),
        # the paper's objective: the tiny recipe's departures (AR anchor, kept-token loss, label shift, prefix
        # noise; docs/stage_budget.md) were measured on the shapes world only, not at this scale (issue 24)
        noise=NoiseConfig(kind="mixed", prefix_prob=0.0),
        # 8 micro-batches of 4 rows per GPU, blocks recomputed: the batch of 256 on 8 80-GiB GPUs is ~190 GiB of
        # activations per GPU at 1k-token rows otherwise (bard train --dry-run, docs/memory_plan.md)
        train=TrainConfig(batch_size=256, num_workers=8, use_gpu=True, merge_steps=2000, distill_steps=500,
                          parallel=parallel, label_shift=False, keep_loss_weight=0.0, anchor_weight=0.0,
                          grad_accum_steps=8, activation_checkpointing=True),
        gate=GateConfig(
            benchmarks=("mmmu_val", "mmmu_pro", "mme", "realworldqa", "mmstar", "ai2d", "chartqa", "ocrbench"),
            speed_benchmark="chartqa",
            default_tolerance=0.01,
        ),
    )


def qwen3_vl_2b() -> Recipe:
    return _qwen3_vl("2B")


def qwen3_vl_4b() -> Recipe:
    return _qwen3_vl("4B")


def qwen3_vl_8b() -> Recipe:
    return _qwen3_vl("8B")


RECIPES = {"tiny": tiny, "qwen3-vl-2b": qwen3_vl_2b, "qwen3-vl-4b": qwen3_vl_4b, "qwen3-vl-8b": qwen3_vl_8b}


def get_recipe(name: str, overrides: dict[str, Any] | None = None) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
    return apply_overrides(RECIPES[name](), overrides)
