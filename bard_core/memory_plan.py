"""Per-GPU memory of one training stage, estimated before any work (`bard train --dry-run`).

Standard library only: the model's size comes from its safetensors headers (exact parameter counts,
no weights read) and its ``config.json`` (hidden size, layers, vocabulary). The estimate follows the
code's own layout (`tasks/train_worker.py`, `bard_core/parallel.py`): DDP holds the whole model, its
gradients, DDP's gradient buckets and AdamW's two moments in the model dtype on every GPU; FSDP2
shards fp32 master weights, gradients and moments over the workers and gathers one block at a time
in the compute dtype; a distillation teacher is one more frozen copy (sharded under FSDP). A frozen
vision tower (``train.vision_lr_scale`` 0) has no gradients or moments. Activations are an upper
bound for a (micro-)batch of the longest rows: ~34 bytes per token, layer and hidden unit in 16-bit
(Korthikanti et al., 2022), or with activation checkpointing each block's input plus one block's
activations; plus fp32 logits and their gradient at the loss positions. Numbers and the model they come from: docs/memory_plan.md.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEADROOM = 0.9  # a plan must fit in this share of the GPU (allocator fragmentation, CUDA context, NCCL buffers)
_BLOCK = re.compile(r"^(.*?\.(?:layers|blocks)\.\d+)\.")


@dataclass(frozen=True)
class ModelShape:
    params: int  # every tensor's element count, from the safetensors headers
    vision_params: int  # of those, the vision tower's (names containing "visual")
    largest_block: int  # the largest decoder/vision block: what FSDP gathers at once
    hidden: int
    layers: int
    vocab: int


def _headers(model_dir: Path) -> list[dict]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(model_dir.glob("*.safetensors"))]
    headers = []
    for name in files:
        with open(model_dir / name, "rb") as f:
            size = f.read(8)
            if len(size) != 8:
                raise ValueError(f"{model_dir / name}: not a safetensors file (shorter than its header size)")
            (n,) = struct.unpack("<Q", size)
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError(f"{model_dir / name}: not a safetensors file (unreadable header)") from None
        headers.append({k: v for k, v in header.items() if k != "__metadata__"})
    return headers


def read_shape(model_dir: str | Path) -> ModelShape | None:
    """The model's size from its directory, or None when it holds no safetensors weights."""
    model_dir = Path(model_dir)
    headers = _headers(model_dir)
    if not headers:
        return None
    config = json.loads((model_dir / "config.json").read_text())
    text = config.get("text_config", config)
    return shape_of(((name, entry["shape"]) for header in headers for name, entry in header.items()),
                    int(text["hidden_size"]), int(text["num_hidden_layers"]), int(text["vocab_size"]))


def shape_of(tensors, hidden: int, layers: int, vocab: int) -> ModelShape:
    """A `ModelShape` from ``(name, shape)`` pairs (a safetensors header's, or a live model's parameters)."""
    total = vision = 0
    blocks: dict[str, int] = {}
    for name, shape in tensors:
        count = math.prod(shape)
        total += count
        vision += count if "visual" in name else 0
        block = _BLOCK.match(name)
        if block:
            blocks[block.group(1)] = blocks.get(block.group(1), 0) + count
    return ModelShape(total, vision, max(blocks.values(), default=total), hidden, layers, vocab)


def stage_memory(shape: ModelShape, *, parallel: str, workers: int, dtype: str, use_gpu: bool, batch_size: int,
                 row_tokens: int, vision_frozen: bool, teacher: bool, micro_batches: int = 1,
                 recompute: bool = False, pull: bool = False) -> dict:
    """GiB per worker of a stage's training step (see module docstring); `row_tokens`: the longest packed
    row (prompt + response + its noisy copy); `micro_batches`: ``train.grad_accum_steps`` (activations are
    one micro-batch's); `recompute`: ``train.activation_checkpointing`` (each block keeps only its input,
    one block's activations live at a time); `pull`: ``train.base_pull`` > 0 (a copy of the trained weights'
    starting values, laid out like the weights)."""
    d = DTYPE_BYTES[dtype] if use_gpu else 4  # CPU stages train in fp32
    trainable = shape.params - (shape.vision_params if vision_frozen else 0)
    per_worker = max(1, batch_size // workers)
    if parallel == "fsdp":
        weights = 4 * shape.params / workers + 2 * d * shape.largest_block  # shards + this and the next block
        grads = 4 * trainable / workers
        optimizer = 8 * trainable / workers
        copy = d * shape.params / workers + d * shape.largest_block if teacher else 0
        start = 4 * trainable / workers if pull else 0  # fp32 shards, like the master weights
    else:
        weights = d * shape.params
        grads = 2 * d * trainable  # the gradients and DDP's buckets
        optimizer = 2 * d * trainable
        copy = d * shape.params if teacher else 0
        start = d * trainable if pull else 0
    rows = max(1, per_worker // micro_batches)
    tokens = rows * row_tokens
    per_block = tokens * shape.hidden * 17 * d
    activations = tokens * shape.hidden * d * shape.layers + per_block if recompute else per_block * shape.layers
    logits = 2 * 4 * rows * (row_tokens // 2) * shape.vocab  # loss positions: at most the noisy half
    parts = {"weights": weights, "grads": grads, "optimizer": optimizer, "teacher": copy, "pull": start,
             "activations": activations, "logits": logits}
    out = {f"{k}_gib": round(v / GIB, 2) for k, v in parts.items()}
    out.update(total_gib=round(sum(parts.values()) / GIB, 2), per_worker_batch=per_worker, micro_batch=rows,
               activation_checkpointing=recompute, row_tokens=row_tokens,
               params=shape.params, trainable_params=trainable)
    return out


def refusal(memory: dict, gpu_gib: float) -> str | None:
    """Why a plan cannot fit a GPU of `gpu_gib` (None when it fits), with the numbers."""
    limit = HEADROOM * gpu_gib
    if memory["total_gib"] <= limit:
        return None
    states = memory["total_gib"] - memory["activations_gib"] - memory["logits_gib"]
    hint = ("train.grad_accum_steps, train.activation_checkpointing=true, more workers, a smaller batch "
            "(train.batch_size) or shorter rows (data.max_tokens)"
            if states <= limit else "FSDP (train.parallel=fsdp) or more workers: the weights and optimizer state "
            "alone do not fit")
    return (f"the plan needs ~{memory['total_gib']:.1f} GiB per GPU (weights {memory['weights_gib']:.1f}, grads "
            f"{memory['grads_gib']:.1f}, optimizer {memory['optimizer_gib']:.1f}, teacher {memory['teacher_gib']:.1f}, "
            f"pull {memory['pull_gib']:.1f}, "
            f"activations {memory['activations_gib']:.1f}, logits {memory['logits_gib']:.1f} for "
            f"{memory['micro_batch']} rows of {memory['row_tokens']} tokens at a time) and {HEADROOM:.0%} of a "
            f"{gpu_gib:g} GiB GPU is {limit:.1f}: use {hint}")
