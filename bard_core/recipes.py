"""Named recipes (standard library only, so flows import it cheaply).

A *recipe* bundles every setting of one pipeline run (`bard_core.config.Recipe`). Recipes are plain
functions (`tiny()`, `qwen3_vl_4b()`, ...); variants are `dataclasses.replace` of a base, and
`get_recipe(name, overrides)` applies dotted overrides such as ``{"train.lr": 1e-4}`` (`bard_core.overrides`).
"""

from __future__ import annotations

import dataclasses
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
    """The embedded default: a tiny Qwen3-VL on the shapes world, 2 CPU cores (why each setting: NOTES)."""
    return Recipe(
        name="tiny",
        model=ModelConfig(base="tiny"),
        train=TrainConfig(lr=1e-3, vision_lr_scale=0.0, distill_lr_scale=0.3, warmup_steps=20,
                          batch_size=32, merge_steps=200, distill_steps=60, checkpoint_every=100, label_shift=True,
                          anchor_weight=2.0, keep_loss_weight=1.0,
                          stages={4: {"merge_steps": 450, "distill_steps": 0, "lr": 2.5e-4},
                                  8: {"merge_steps": 100, "distill_steps": 40, "lr": 2e-4},
                                  16: {"merge_steps": 100, "distill_steps": 40, "lr": 2e-4},
                                  32: {"merge_steps": 420, "distill_steps": 60, "lr": 2e-4}}),
        decode=DecodeConfig(max_new_tokens=96, batch_size=32),
        gate=GateConfig(limit=None, thresholds=(0.9,), min_tpf={4: 1.05, 8: 1.05, 16: 1.05, 32: 1.05}),
        data=DataConfig(max_tokens=512, min_image_side=32),
    )


def tiny_long() -> Recipe:
    """Issue 21's long profile: the tiny recipe trained ~6× longer at 1e-3 to draft many tokens a step, each stage
    promoted as the AR base's drafter (`gate.drafter`: the base's answers); ~35 minutes of training on 2 CPU cores.
    What it reaches and misses: docs/stage_budget.md, The long profile."""
    base = tiny()
    return dataclasses.replace(
        base, name="tiny-long",
        noise=dataclasses.replace(base.noise, kind="mask", prefix_prob=0.0),
        train=dataclasses.replace(base.train, long_share=0.5,
                                  stages={4: {"merge_steps": 1500, "distill_steps": 0},
                                          8: {"merge_steps": 2500, "distill_steps": 0},
                                          16: {"merge_steps": 2000, "distill_steps": 0},
                                          32: {"merge_steps": 1500, "distill_steps": 0}}),
        decode=dataclasses.replace(base.decode, draft="wide"),
        gate=dataclasses.replace(base.gate, drafter=True, min_tpf={4: 1.8, 8: 3.1, 16: 3.7, 32: 4.0}),
    )


def _qwen3_vl(size: str) -> Recipe:
    """METHOD.md's method at scale; what departs from it or from the tiny recipe, and why: NOTES."""
    return Recipe(
        name=f"qwen3-vl-{size.lower()}",
        model=ModelConfig(base=f"Qwen/Qwen3-VL-{size}-Instruct", dtype="bfloat16",
                          mask_token_id=QWEN3_VL_MASK_TOKEN_ID),
        noise=NoiseConfig(kind="mixed", prefix_prob=0.0),
        train=TrainConfig(batch_size=256, num_workers=8, use_gpu=True, merge_steps=2000, distill_steps=500,
                          parallel="ddp" if size == "2B" else "fsdp", label_shift=False, keep_loss_weight=0.0,
                          anchor_weight=0.0, grad_accum_steps=8, activation_checkpointing=True),
        decode=DecodeConfig(fallback="confident", sure_eos=False),
        gate=GateConfig(
            benchmarks=("mmmu_val", "mmmu_pro", "mme", "realworldqa", "mmstar", "ai2d", "chartqa", "ocrbench"),
            speed_benchmark="chartqa",
            default_tolerance=0.01,
            thresholds=(0.9, 0.7, 0.5),
        ),
    )


def qwen3_vl_2b() -> Recipe:
    return _qwen3_vl("2B")


def qwen3_vl_4b() -> Recipe:
    return _qwen3_vl("4B")


def qwen3_vl_8b() -> Recipe:
    return _qwen3_vl("8B")


RECIPES = {"tiny": tiny, "tiny-long": tiny_long, "qwen3-vl-2b": qwen3_vl_2b, "qwen3-vl-4b": qwen3_vl_4b,
           "qwen3-vl-8b": qwen3_vl_8b}


def get_recipe(name: str, overrides: dict[str, Any] | None = None) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
    return apply_overrides(RECIPES[name](), overrides)



# Why each recipe departs from METHOD.md or its reference (a real recipe: the tiny one; the tiny recipe: the
# settings' defaults): one reason per setting, shown by
# `bard recipe NAME`; tests/test_recipes.py fails on a departure without a reason or a reason without a departure.
_LONG = "docs/stage_budget.md, The long profile"
NOTES: dict[str, dict[str, str]] = {
    "tiny": {
        "noise.prefix_prob": "half the blocks as a clean prefix + masks: without it B32 lost 2.8–3.2 points of "
                             "shapes_extract (docs/stage_budget.md, Noise)",
        "train.batch_size": "32 rows a step: ~0.3 s on 2 CPU cores, so the chain fits the demo's budget",
        "train.lr": "the tiny base learns the objective in hundreds of steps, not thousands; the stages' own rates are in train.stages",
        "train.stages": "the budget chain's schedule: B4 learns the objective, short bridges at B8/B16, the largest "
                        "share for B32 at a gentle rate (docs/stage_budget.md)",
        "train.merge_steps": "the stages' own counts are in train.stages (these apply to other block sizes)",
        "train.distill_steps": "the stages' own counts are in train.stages (these apply to other block sizes)",
        "train.vision_lr_scale": "frozen vision tower: the median B4 step 0.378 s → 0.311 s at the same scores "
                                 "(docs/pipeline.md)",
        "train.warmup_steps": "20 of a stage's 100–450 steps",
        "train.label_shift": "300 B4 steps reach 0.72 masked-token accuracy with shifted labels vs 0.47 without: "
                             "the tiny AR head re-learns an unshifted output slowly",
        "train.keep_loss_weight": "without it the correction step replaced right tokens (docs/stage_budget.md, "
                                  "Kept-token loss)",
        "train.anchor_weight": "keeps one-letter answers from drifting down the chain (docs/stage_budget.md, "
                               "AR anchor)",
        "decode.fallback": "leftmost: shapes_extract 0.974 vs 0.937 for confident on B32 (docs/decoding.md)",
        "decode.sure_eos": "22 of 37 imperfect listings had stopped early at P(EOS) 0.53–0.62 (docs/decoding.md)",
        "decode.max_new_tokens": "shapes_extract's answers are ~45 tokens",
        "decode.batch_size": "the gate's batch on 2 cores",
        "gate.min_tpf": "more than one token per forward: the demo chain's stages reach 1.13–1.17 in their "
                        "speculative mode, block decoding at τ 0.9 1.00 (docs/evaluation.md, Speed minimums)",
        "data.max_tokens": "shapes conversations are < 512 tokens",
        "data.min_image_side": "the shapes world's images are 96 px; smaller ones are planted defects",
    },
    "tiny-long": {
        "noise.kind": f"mask-only: it learns in-block parallelism in fewer steps than mixed noise on this base ({_LONG})",
        "noise.prefix_prob": f"no clean-prefix blocks: they favour the left-to-right fill that keeps TPF near 1 ({_LONG})",
        "train.lr": f"1e-3 in every stage: at the tiny recipe's 2e-4–2.5e-4 the blocks still fill one token per "
                    f"forward after thousands of steps ({_LONG})",
        "train.stages": f"1,500 / 2,500 / 2,000 / 1,500 merge steps at 1e-3 (~35 min on 2 cores): as drafters TPF 2.0 "
                        f"/ 3.6 / 4.1 / 4.2 ({_LONG})",
        "train.long_share": f"half of each batch from the long answers, where parallel filling is learned ({_LONG})",
        "decode.draft": "the first step drafts the whole block, then adapts from 8: B32 drafters' opening drafts "
                        "run 18–31 tokens, the later ones about 8 (docs/decoding.md, An answer's opening)",
        "gate.drafter": f"the stages lose 6–9 points of mcq in their own answers at this rate; as the base's drafters "
                        f"they answer as the base does ({_LONG})",
        "gate.min_tpf": f"about a tenth under each stage's lowest drafter TPF on worlds 11–13 (B4 1.98–2.05, B8 "
                        f"3.47–3.57; with draft=wide, worlds 12–13: B16 4.15–4.51, B32 4.43–5.03) ({_LONG})",
    },
}


def _qwen3_notes(size: str) -> dict[str, str]:
    notes = {
        "model.base": "the hub checkpoint this recipe converts",
        "model.dtype": "bf16 compute on GPUs (the tiny model trains in fp32 on CPU)",
        "model.mask_token_id": "the hub tokenizer has no <|mask|>: row 151671 is unused in the 151936-row "
                               "embedding (METHOD.md §1)",
        "train.merge_steps": "not measured at this scale and not in METHOD.md: a first budget of 512k rows a merge "
                             "at batch 256",
        "train.distill_steps": "not measured at this scale and not in METHOD.md: 128k rows a distillation",
        "train.stages": "one schedule for every stage (the tiny recipe's per-stage counts fit the demo's budget)",
        "train.grad_accum_steps": "8 micro-batches of 4 rows per GPU: a batch of 256 on 8 80-GiB GPUs is ~190 GiB "
                                  "of activations per GPU at 1k-token rows otherwise (docs/memory_plan.md)",
        "train.activation_checkpointing": "recompute each block in the backward, for the same memory reason",
        "train.num_workers": "one Ray Train worker per GPU of an 8-GPU node (--set train.num_workers=N)",
        "train.use_gpu": "CUDA workers",
        "decode.max_new_tokens": "DecodeConfig's default; lm-eval tasks cap their answers with max_gen_toks",
        "decode.batch_size": "DecodeConfig's default; a GPU gate decodes larger batches with --set",
        "gate.benchmarks": "the paper's evaluation suite, through lm-eval",
        "gate.speed_benchmark": "long-enough answers among them for tokens per forward to mean something",
        "gate.default_tolerance": "one point of each benchmark, the users' regression budget",
        "gate.thresholds": "the gate promotes the fastest passing τ; the tiny recipe evaluates one for the demo's "
                           "time budget",
        "gate.min_tpf": "targets, not yet measured at this scale: the first real run's report replaces them",
        "data.min_image_side": "DataConfig's default: Qwen3-VL's 28-px patch merge window",
    }
    if size != "2B":  # the 2B recipe trains data-parallel like the tiny one
        notes["train.parallel"] = ("fsdp: an 8B student with fp32 master weights and AdamW state is ~128 GB before "
                                   "activations, and distillation adds the teacher; 2B fits a replica per GPU (ddp)")
    return notes


NOTES.update({f"qwen3-vl-{s.lower()}": _qwen3_notes(s) for s in ("2B", "4B", "8B")})
