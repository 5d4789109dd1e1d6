"""Settings as frozen dataclasses (standard library only, so flows import it cheaply).

A `Recipe` bundles every setting of one pipeline run: the model family, noise, training stages,
decoding and gates (`bard_core.config_eval`, re-exported here) and curation; the named recipes and the
override parser are in `bard_core.recipes`. Every dataclass checks itself in ``__post_init__``
(`bard_core.config_checks`). Measurements behind the defaults are in docs/ (each field's comment says where).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from bard_core.config_checks import check_choice, check_positive, fail
from bard_core.config_eval import (  # noqa: F401  (re-exported: every reader imports the settings from here)
    DECODE_FALLBACKS,
    DECODE_MODES,
    DRAFT_WIDTHS,
    DecodeConfig,
    GateConfig,
)

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|mask|>",
)
MASK_TOKEN = "<|mask|>"
EOS_TOKEN = "<|im_end|>"
QWEN3_VL_MASK_TOKEN_ID = 151671  # an unused row of the 151936-row Qwen3-VL embedding

NOISE_KINDS = ("mask", "mixed")
PROMPT_MASKS = ("causal", "block")
CONVERSATION_FORMATS = ("single", "sources")  # shapes-world training streams (bard_core.shapes.data)
TEACHERS = ("previous", "ar", "none")  # a stage's distillation teacher (TrainConfig.teacher)
TARGETS = ("data", "base")  # whose answers a stage trains on (TrainConfig.targets)
PARALLEL = ("ddp", "fsdp")  # data parallel with replicas, or fully sharded (params, grads, optimizer state)
OBJECTIVES = ("ar", "diffusion")
DTYPES = ("float32", "bfloat16", "float16")
RECIPE_SECTIONS = ("model", "noise", "train", "decode", "gate", "data")  # a Recipe's dataclass parts (dotted keys)
# what `TrainConfig.stages` may set per block size
STAGE_FIELDS = ("merge_steps", "distill_steps", "lr", "long_share")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to start from. `base` is a hub id, a local HF directory, or "tiny" (built here)."""

    base: str = "tiny"
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    mask_token: str = MASK_TOKEN
    mask_token_id: int | None = None  # None: look `mask_token` up in the tokenizer
    # Tiny-family architecture (ignored when `base` is a pretrained checkpoint).
    vocab_size: int = 512
    hidden_size: int = 128
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    mrope_section: tuple[int, int, int] = (6, 5, 5)
    vision_depth: int = 2
    vision_hidden_size: int = 96
    vision_num_heads: int = 3
    vision_intermediate_size: int = 192
    patch_size: int = 16
    spatial_merge_size: int = 2
    deepstack_visual_indexes: tuple[int, ...] = ()
    # Learned vision position table, side² entries. 36 = the 6×6 patch grid of a 96-px shapes image,
    # so every patch gets its own row; other sizes are interpolated by the model.
    vision_num_position_embeddings: int = 36
    pos_embed_std: float = 0.5
    max_position_embeddings: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        c = "ModelConfig"
        check_choice(c, "dtype", self.dtype, DTYPES)
        # Eager attention adds a boolean mask to the scores, i.e. masks nothing (METHOD.md §1); transformers 5.24's
        # Qwen3-VL refuses flex_attention at load time, so SDPA is the one that works
        check_choice(c, "attn_implementation", self.attn_implementation, ("sdpa",))
        check_positive(
            c,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            vision_depth=self.vision_depth,
            vision_hidden_size=self.vision_hidden_size,
            patch_size=self.patch_size,
            spatial_merge_size=self.spatial_merge_size,
            pos_embed_std=self.pos_embed_std,
        )
        if self.num_attention_heads % self.num_key_value_heads:
            fail(c, "num_key_value_heads", self.num_key_value_heads,
                 f"a divisor of num_attention_heads={self.num_attention_heads}")
        if len(self.mrope_section) != 3 or sum(self.mrope_section) * 2 != self.head_dim:
            fail(c, "mrope_section", self.mrope_section, f"three ints summing to head_dim/2={self.head_dim // 2}")
        if self.vision_hidden_size % self.vision_num_heads:
            fail(c, "vision_num_heads", self.vision_num_heads, "a divisor of vision_hidden_size")
        if any(not 0 <= i < self.vision_depth for i in self.deepstack_visual_indexes):
            fail(c, "deepstack_visual_indexes", self.deepstack_visual_indexes, f"layer indexes < {self.vision_depth}")
        if self.vocab_size < len(SPECIAL_TOKENS) + 256:
            fail(c, "vocab_size", self.vocab_size, f">= {len(SPECIAL_TOKENS) + 256} (bytes + specials)")


@dataclass(frozen=True)
class NoiseConfig:
    """Corruption of the noisy response copy (METHOD.md §3)."""

    kind: str = "mixed"
    t_min: float = 0.05
    # share of blocks corrupted as a left-to-right decoder sees them (a clean prefix, the rest masked), which
    # the i.i.d. schedules almost never draw in a large block (docs/stage_budget.md, "Noise")
    prefix_prob: float = 0.5

    def __post_init__(self) -> None:
        check_choice("NoiseConfig", "kind", self.kind, NOISE_KINDS)
        if not 0.0 < self.t_min <= 1.0:
            fail("NoiseConfig", "t_min", self.t_min, "a number in (0, 1]")
        if not 0.0 <= self.prefix_prob <= 1.0:
            fail("NoiseConfig", "prefix_prob", self.prefix_prob, "a probability in [0, 1]")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and layout settings for every training phase."""

    block_sizes: tuple[int, ...] = (4, 8, 16, 32)
    base_steps: int = 600  # AR base training (tiny recipe only)
    merge_steps: int = 300
    distill_steps: int = 100
    batch_size: int = 32
    lr: float = 2e-5  # merge (and AR) peak learning rate
    # the other rates are multiples of `lr`, so overriding train.lr moves every phase and parameter group
    # together (as absolutes, a lower train.lr left the vision tower and distillation at the old rates)
    vision_lr_scale: float = 0.1  # vision tower: lr × this, in every phase (reference 2e-6 / 2e-5); 0 freezes it
    distill_lr_scale: float = 0.3  # distillation peak: lr × this (reference 6e-6 / 2e-5)
    weight_decay: float = 0.0
    # after every step, each trained weight moves lr × this of the way back to the stage's starting weights
    # (a decoupled L2-SP pull; `train.BasePull`): bounds how far a high rate drifts from what the start knew
    # (docs/stage_budget.md, "A pull towards the start"); 0: off
    base_pull: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine floor for merge; distillation uses distill_min_lr_ratio
    distill_min_lr_ratio: float = 0.5
    grad_clip: float = 1.0
    prompt_mask: str = "causal"
    label_shift: bool = False
    pad_loss_weight: float = 0.0  # weight of <|im_end|> padding positions in the CE (0 or 0.5)
    # weight of the noisy copy's kept real tokens in the CE, relative to a corrupted one (both × 1/t): with
    # loss on corrupted tokens only (METHOD.md §3) the model learns that a visible token is wrong and the
    # correction step replaces right tokens (docs/stage_budget.md, "Kept-token loss")
    keep_loss_weight: float = 0.0
    ce_weight: float = 1.0
    kd_weight: float = 0.5
    kd_top_k: int = 16
    kd_temperature: float = 1.0
    # AR anchor (needs label_shift): top-K KD from the frozen AR base where a position's context is exactly an
    # AR model's (a block's first token); keeps one-token answers from drifting down the chain
    # (docs/stage_budget.md, "AR anchor"). Computed once per chain (tasks/base_targets.py); 0: off
    anchor_weight: float = 0.0
    # the distillation teacher: the previous stage (progressive, METHOD.md §4), the AR base (its causal view of
    # prompt ‖ clean; the released code's fixed teacher), or none (no distill phase). Tested in docs/ablation.md
    teacher: str = "previous"
    # the answers a diffusion stage learns: the curated data's, or the chain's AR base's own greedy answers to the
    # same prompts (sequence-level self-distillation, tasks/base_targets.py; docs/stage_budget.md)
    targets: str = "data"
    checkpoint_every: int = 100
    # per block size, the stage's own merge_steps / distill_steps / lr (`for_stage`); an override of one of
    # those fields (train.lr, ...) sets it for every stage, replacing the per-stage values
    stages: dict[int, dict[str, float]] = field(default_factory=dict)
    # per Ray Train worker: keep encoded samples in memory up to this size, by sample_id, so later epochs
    # skip encoding what is kept (every epoch still reads the shard: see tasks/train_worker.EncodedStream);
    # 0 turns it off
    encode_cache_mb: int = 1024
    # batches of similar lengths (`layout.length_grouped`): less padding, 19–30% faster steps
    # (docs/stage_budget.md, "Length-grouped batches")
    group_by_length: bool = True
    # share of every batch buffer given to rows whose response spans more than one block of the stage
    # (repeated from the buffer, short rows subsampled; 0: the data's own mix). Parallel decoding of long
    # answers is learned from those rows only (docs/stage_budget.md, "Long rows")
    long_share: float = 0.0
    # each step's batch as this many equal micro-batches, gradients accumulated (`train.train_step`): the
    # same step in less activation memory (bard train --dry-run, docs/memory_plan.md)
    grad_accum_steps: int = 1
    # recompute each block's activations in the backward (`train.enable_activation_checkpointing`)
    activation_checkpointing: bool = False
    # driver: a curated dataset up to this size on disk is read once per Ray session into the object store
    # and shared by every stage trained on it (each fit() then skips the read pipeline's start, ~4 s on 2
    # cores); a larger one streams from its files in every stage; 0 turns it off
    dataset_cache_mb: int = 512
    num_workers: int = 2
    use_gpu: bool = False
    # ddp: every worker holds the whole model; fsdp: FSDP2 `fully_shard` per decoder/vision block, fp32
    # master weights, compute in the model dtype (bf16 on GPU), full-state checkpoints gathered on rank 0.
    parallel: str = "ddp"
    seed: int = 0

    @property
    def distill_lr(self) -> float:
        return self.lr * self.distill_lr_scale

    @property
    def uses_base(self) -> bool:
        """Whether a diffusion stage reads the chain's AR base: the anchor's targets, or the base's answers."""
        return self.anchor_weight > 0 or self.targets == "base"

    def for_stage(self, block_size: int | None) -> TrainConfig:
        """The settings of the stage at `block_size` (its entry in `stages` applied)."""
        return dataclasses.replace(self, stages={}, **self.stages.get(block_size, {}))

    def __post_init__(self) -> None:
        c = "TrainConfig"
        try:  # block sizes and values arrive as strings from JSON overrides (CLI, UI forms)
            stages = {int(b): {k: (int(v) if k.endswith("_steps") else float(v)) for k, v in entry.items()}
                      for b, entry in self.stages.items()}
        except (TypeError, ValueError, AttributeError):
            fail(c, "stages", self.stages, f"a map of block size -> {{{', '.join(STAGE_FIELDS)}}}")
        object.__setattr__(self, "stages", stages)
        bad = {k for entry in stages.values() for k in entry} - set(STAGE_FIELDS)
        if bad or any(b < 1 for b in stages):
            fail(c, "stages", self.stages, f"entries per block size setting only {', '.join(STAGE_FIELDS)}")
        for entry in stages.values():
            dataclasses.replace(self, stages={}, **entry)  # each stage's settings are valid settings
        if not self.block_sizes or any(b < 1 for b in self.block_sizes):
            fail(c, "block_sizes", self.block_sizes, "a non-empty tuple of positive ints")
        if list(self.block_sizes) != sorted(set(self.block_sizes)):
            fail(c, "block_sizes", self.block_sizes, "strictly increasing block sizes (progressive merging)")
        check_positive(c, batch_size=self.batch_size, lr=self.lr, grad_accum_steps=self.grad_accum_steps,
                        kd_top_k=self.kd_top_k, kd_temperature=self.kd_temperature,
                        num_workers=self.num_workers, checkpoint_every=self.checkpoint_every)
        if not (math.isfinite(self.base_pull) and 0.0 <= self.base_pull and self.lr * self.base_pull < 1.0):
            fail(c, "base_pull", self.base_pull, f"a number in [0, 1/lr) (lr {self.lr:g}: a step never moves a "
                                                 "weight past its start)")
        for name in ("base_steps", "merge_steps", "distill_steps", "warmup_steps", "encode_cache_mb",
                     "dataset_cache_mb"):
            if getattr(self, name) < 0:
                fail(c, name, getattr(self, name), "a non-negative int")
        check_choice(c, "prompt_mask", self.prompt_mask, PROMPT_MASKS)
        check_choice(c, "parallel", self.parallel, PARALLEL)
        check_choice(c, "teacher", self.teacher, TEACHERS)
        check_choice(c, "targets", self.targets, TARGETS)
        if self.pad_loss_weight not in (0.0, 0.5):
            fail(c, "pad_loss_weight", self.pad_loss_weight, "0.0 (padding ignored) or 0.5 (reference)")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            fail(c, "betas", self.betas, "two numbers in [0, 1)")
        if not 0.0 <= self.min_lr_ratio <= 1.0 or not 0.0 <= self.distill_min_lr_ratio <= 1.0:
            fail(c, "min_lr_ratio", (self.min_lr_ratio, self.distill_min_lr_ratio), "ratios in [0, 1]")
        if self.vision_lr_scale < 0 or self.distill_lr_scale <= 0:
            fail(c, "vision_lr_scale/distill_lr_scale", (self.vision_lr_scale, self.distill_lr_scale),
                 "vision_lr_scale >= 0 (0 freezes the vision tower) and distill_lr_scale > 0")
        if self.keep_loss_weight < 0:
            fail(c, "keep_loss_weight", self.keep_loss_weight, "a non-negative weight (0: corrupted tokens only)")
        if not 0.0 <= self.long_share < 1.0:
            fail(c, "long_share", self.long_share, "a share in [0, 1) (0: the data's own mix)")
        if self.anchor_weight < 0:
            fail(c, "anchor_weight", self.anchor_weight, "a non-negative weight (0 turns the AR anchor off)")
        if self.anchor_weight > 0 and not self.label_shift:
            fail(c, "anchor_weight", self.anchor_weight, "0 without label_shift (unshifted labels read every "
                 "prediction from a noisy block, so no position has an AR model's context)")
        if self.ce_weight < 0 or self.kd_weight < 0 or self.ce_weight + self.kd_weight == 0:
            fail(c, "ce_weight/kd_weight", (self.ce_weight, self.kd_weight), "non-negative, not both zero")


@dataclass(frozen=True)
class DataConfig:
    """Curation: filters, dedup, decontamination and mixing (DESIGN.md §3)."""

    weights: dict[str, float] = field(default_factory=lambda: {"llava_ov": 1.0, "finevision": 1.0})
    target_size: int | None = None  # None: keep everything that passes
    max_tokens: int = 8192  # a sample's prompt + answer tokens: longer rows are rejected, in curation and training
    min_rating: int = 3  # FineVision *_min ratings below this are rejected
    # two images are near-identical within this many pHash bits AND chroma levels per grid cell (curation/dedup.py;
    # measured in docs/curation.md)
    phash_threshold: int = 14
    colour_threshold: int = 27
    # rows showing the very same images merge into one multi-turn row (as FineVision's rows are); off: each
    # conversation stays its own row
    merge_same_image: bool = False
    ngram: int = 13  # question n-gram length (words) for text decontamination
    min_image_side: int = 28
    max_aspect_ratio: float = 200.0
    max_image_pixels: int = 4096 * 4096
    seed: int = 0

    def __post_init__(self) -> None:
        c = "DataConfig"
        if not self.weights or any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) == 0:
            fail(c, "weights", self.weights, "non-negative per-source weights, not all zero")
        if self.target_size is not None and self.target_size <= 0:
            fail(c, "target_size", self.target_size, "None or a positive int")
        if not 0 <= self.phash_threshold < 32:
            fail(c, "phash_threshold", self.phash_threshold, "an int in [0, 32)")
        if not 0 <= self.colour_threshold <= 255:
            fail(c, "colour_threshold", self.colour_threshold, "an int in [0, 255] (chroma levels)")
        if not 1 <= self.min_rating <= 5:
            fail(c, "min_rating", self.min_rating, "an int in [1, 5]")
        check_positive(c, max_tokens=self.max_tokens, ngram=self.ngram, min_image_side=self.min_image_side,
                        max_aspect_ratio=self.max_aspect_ratio, max_image_pixels=self.max_image_pixels)


@dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelConfig = field(default_factory=ModelConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ray_address: str | None = None  # None: RAY_ADDRESS or a local Ray

    def __post_init__(self) -> None:
        if not self.name:
            fail("Recipe", "name", self.name, "a non-empty name")
        missing = set(self.gate.min_tpf) - set(self.train.block_sizes)
        if missing:
            fail("Recipe", "gate.min_tpf", sorted(missing), f"block sizes among train.block_sizes {self.train.block_sizes}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
