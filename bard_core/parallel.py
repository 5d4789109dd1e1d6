"""Sharded data parallelism for the training loop (plain PyTorch; the caller owns the process group).

`shard` wraps a `LogitsAtLossPositions` runner in FSDP2 (`fully_shard`); `full_state` gathers what a
checkpoint saves, and `load_optimizer_state` puts a full optimizer state back, re-sharded. Under DDP
(`fsdp=False`) the last two are the optimizer's own `state_dict` / `load_state_dict`, so one loop
serves both strategies. Ray Train's loop (`tasks/train_worker.py`) and the GPU check
(`benchmarks/gpu_fsdp.py`) call these same functions.
"""

from __future__ import annotations

import torch


def shard(runner: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """FSDP2 over `runner` (a LogitsAtLossPositions): one unit per decoder layer and per vision block,
    then the root (embeddings, patch embedding, merger, norm, LM head). Below fp32, parameters are
    gathered in `dtype` for compute while the sharded masters and the gradient reduction stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {} if dtype == torch.float32 else {"mp_policy": MixedPrecisionPolicy(param_dtype=dtype,
                                                                                   reduce_dtype=torch.float32)}
    inner = runner.vlm.model
    for unit in [*inner.language_model.layers, *inner.visual.blocks]:
        fully_shard(unit, **kwargs)
    fully_shard(runner, **kwargs)
    return runner


def full_state(model, runner, optimizer, fsdp: bool) -> tuple[dict | None, dict]:
    """(model state for save_pretrained or None for the model's own, optimizer state) to checkpoint.
    Under FSDP every rank must call this (it all-gathers); only rank 0 receives the tensors."""
    if not fsdp:
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(runner, optimizer, options=options))


def load_optimizer_state(runner, optimizer, state: dict, fsdp: bool) -> None:
    """Restore a full optimizer state (from `full_state`) into this rank's optimizer."""
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # torch lays out the local state by taking a zero-lr step on zero gradients, and skips that when a
    # parameter still holds a gradient (a fresh optimizer after steps in the same process), then fails
    # with "Expected device to be set". A restored optimizer starts clean either way.
    optimizer.zero_grad(set_to_none=True)
    set_optimizer_state_dict(runner, optimizer, state, options=StateDictOptions(full_state_dict=True))
