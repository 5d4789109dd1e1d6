"""A 2-process gloo job (spawned by test_train_stage) that trains the same model on the same per-rank
batches with DDP and with FSDP2 (`bard_core.parallel.shard`), each once on whole batches and once on the
same batches as two accumulated micro-batches (``train.grad_accum_steps``), and writes the results."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

STEPS = 3


def _batches(processor, model, rank: int, micro: bool = False):
    """Per step, 4 samples packed as one batch, or (`micro`) as two batches of 2 with the same noise draws."""
    import torch

    from bard_core.inputs import encode_sample
    from bard_core.layout import noise_spec_for, pack
    from bard_core.shapes.data import conversations

    spec = noise_spec_for(processor.tokenizer, "mixed", 0.05)
    samples = [encode_sample(s, processor, 512) for s in conversations(4 * STEPS, seed=100 + rank)]
    generator = torch.Generator().manual_seed(rank)

    def packed(part):
        return pack(part, model, 4, spec, prompt_mask="causal", label_shift=True, pad_loss_weight=0.0,
                    generator=generator)

    step = [samples[4 * k:4 * k + 4] for k in range(STEPS)]
    return [[packed(s[:2]), packed(s[2:])] if micro else packed(s) for s in step]


def _same_optimizer_state(a: dict, b: dict) -> bool:
    import torch

    if a["state"].keys() != b["state"].keys():
        return False
    return all(torch.equal(torch.as_tensor(a["state"][k][n]).cpu(), torch.as_tensor(b["state"][k][n]).cpu())
               for k in a["state"] for n in a["state"][k])


def run(rank: int, world: int, model_dir: str, out: str, port: int) -> None:
    import torch
    import torch.distributed as dist

    from bard_core import checkpoint
    from bard_core.config import TrainConfig
    from bard_core.parallel import full_state, load_optimizer_state, shard
    from bard_core.train import LogitsAtLossPositions, build_optimizer, train_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = TrainConfig(lr=1e-3, vision_lr_scale=1.0, label_shift=True)
    results = {}
    for name in ("ddp", "fsdp", "ddp-accum", "fsdp-accum"):
        strategy = name.split("-")[0]
        model, processor, _ = checkpoint.load(model_dir)
        batches = _batches(processor, model, rank, micro=name.endswith("accum"))
        if strategy == "ddp":
            runner = torch.nn.parallel.DistributedDataParallel(LogitsAtLossPositions(model),
                                                               find_unused_parameters=True)
        else:
            runner = shard(LogitsAtLossPositions(model), torch.float32)
        optimizer = build_optimizer(runner.module if strategy == "ddp" else runner, cfg)
        losses = [train_step(runner, b, optimizer, cfg)["loss"] for b in batches]
        state, optim = full_state(model, runner, optimizer, strategy == "fsdp")
        state = state if state is not None else model.state_dict()
        # a fresh optimizer (as after a restart, but with the last step's gradients still on the
        # parameters) takes the full state back from the checkpoint file, and gathers to the same state
        saved = Path(out) / f"{name}-optimizer.pt"
        if rank == 0:
            torch.save(optim, saved)  # only rank 0 holds the gathered state, as when checkpointing
        dist.barrier()
        fresh = build_optimizer(runner.module if strategy == "ddp" else runner, cfg)
        load_optimizer_state(runner, fresh, checkpoint.read_training_state(saved), strategy == "fsdp")
        again = full_state(model, runner, fresh, strategy == "fsdp")[1]
        if rank == 0:
            torch.save({k: v.detach().cpu() for k, v in state.items()}, Path(out) / f"{name}.pt")
            results[name] = {"losses": losses, "optimizer_entries": len(optim["state"]),
                                 "restored_equal": _same_optimizer_state(optim, again)}
    if rank == 0:
        (Path(out) / "results.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    model_dir, out, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mp.spawn(run, args=(2, model_dir, out, port), nprocs=2)
