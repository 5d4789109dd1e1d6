"""`bard train --dry-run`: the resolved plan of one stage — parallelism, dtypes, rates, steps, attention
implementation and the estimated memory per GPU (`bard_core.memory_plan`) — and why a plan that cannot
fit is refused. No torch here: sizes come from the checkpoint's safetensors headers, row lengths from the
curated data's ``num_tokens`` column."""

from __future__ import annotations

from pathlib import Path


def longest_row(data: Path) -> int | None:
    """The largest ``num_tokens`` (prompt + answer) of a curated dataset, or None without its files."""
    import pyarrow.parquet as pq

    files = sorted((data / "data").glob("*.parquet"))
    longest = [max(pq.read_table(f, columns=["num_tokens"]).column("num_tokens").to_pylist(), default=0)
               for f in files]
    return max(longest, default=0) or None


def dry_run_plan(recipe, *, objective: str, block_size: int | None, workers: int | None, init: Path, data: Path,
                 teacher: bool, anchor, gpu_gib: float) -> tuple[dict, str | None]:
    """(the plan, why it cannot fit or None)."""
    from bard_core.memory_plan import read_shape, refusal, stage_memory

    train = recipe.train.for_stage(block_size if objective == "diffusion" else None)
    workers = workers or train.num_workers
    dtype = recipe.model.dtype if train.use_gpu else "float32"
    plan = {"recipe": recipe.name, "objective": objective, "block_size": block_size, "workers": workers,
            "use_gpu": train.use_gpu, "parallel": train.parallel, "backend": "nccl" if train.use_gpu else "gloo",
            "dtype": dtype, "master_weights": "float32" if train.parallel == "fsdp" or not train.use_gpu
            else recipe.model.dtype, "attn_implementation": recipe.model.attn_implementation,
            "batch_size": train.batch_size, "grad_accum_steps": train.grad_accum_steps,
            "activation_checkpointing": train.activation_checkpointing,
            "lr": {"merge": train.lr, "vision": train.lr * train.vision_lr_scale,
                   "distill": train.distill_lr if teacher else None},
            "steps": {"merge": train.merge_steps, "distill": train.distill_steps if teacher else 0,
                      "ar": train.base_steps},
            "anchor": {"uri": anchor.uri, "weight": train.anchor_weight} if anchor else None,
            "targets": train.targets}
    per_worker = train.batch_size // workers
    if per_worker < train.grad_accum_steps or per_worker % train.grad_accum_steps:
        return plan, (f"train.batch_size {train.batch_size} over {workers} workers ({per_worker} rows each) does not "
                      f"split into {train.grad_accum_steps} equal micro-batches (train.grad_accum_steps)")
    shape = read_shape(init)
    if shape is None:
        plan["memory"] = None
        plan["memory_note"] = f"{init} holds no safetensors weights: its size is unknown"
        return plan, None
    row = min(longest_row(data) or recipe.data.max_tokens, recipe.data.max_tokens)
    packed = 2 * row if objective == "diffusion" else row  # the response's noisy copy doubles a diffusion row
    plan["memory"] = stage_memory(shape, parallel=train.parallel, workers=workers, dtype=dtype, use_gpu=train.use_gpu,
                                  batch_size=train.batch_size, row_tokens=packed,
                                  vision_frozen=train.vision_lr_scale == 0, teacher=teacher,
                                  micro_batches=train.grad_accum_steps, recompute=train.activation_checkpointing,
                                  pull=train.base_pull > 0)
    plan["memory"]["gpu_gib"] = gpu_gib if train.use_gpu else None
    return plan, refusal(plan["memory"], gpu_gib) if train.use_gpu else None
