"""One short training step of the GPU recipes' strategies on a Qwen3-VL-4B-shaped model (random weights).

The same packed batch (one image-heavy sample, block size B) through the training loop's own code
(`bard_core.train.train_step`, `bard_core.parallel`), side by side:
- replica: the model in bf16 with bf16 AdamW state, what each DDP worker holds (the 2B recipe);
- fsdp: fp32 master weights sharded with FSDP2 (`bard_core.parallel.shard`), compute in bf16, fp32
  gradient reduction (the 4B/8B recipes).
Each runs `--steps` merge steps, one distillation step with a teacher of the same shape (sharded too
under FSDP) and one more merge step. Before that last step FSDP gathers the full state a checkpoint
saves (`full_state`, CPU offload) and puts the optimizer state back into a fresh optimizer
(`load_optimizer_state`), as a restart does. Reported per strategy:
median step seconds (first step excluded), peak GPU memory beside `bard train --dry-run`'s estimate of it
(`bard_core.memory_plan`), losses, gradient norms, gather seconds.

The process group has one rank (a single GPU): FSDP then shards nothing, but every collective, the
mixed-precision policy and the gather run as they do on N ranks.

    python -m benchmarks.gpu_fsdp                         # 4B shape on CUDA (the device machine)
    python -m benchmarks.gpu_fsdp --shape tiny --device cpu   # the same path on CPU (gloo, fp32)

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist

from bard_core.config import NoiseConfig, TrainConfig
from bard_core.layout import NoiseSpec, pack
from bard_core.memory_plan import shape_of, stage_memory
from bard_core.parallel import full_state, load_optimizer_state, shard
from bard_core.train import LogitsAtLossPositions, Teacher, build_optimizer, to_device, train_step
from benchmarks.layout_memory import SPECIALS, build_model, synthetic_sample


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gib(n: int) -> float:
    return n / 2**30


def init_group(device: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1,
                            **({"device_id": torch.device("cuda", 0)} if device == "cuda" else {}))


def run_strategy(name: str, args, batch, cfg: TrainConfig) -> dict:
    device, low = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, _ = build_model(args.shape, device)  # built in the shape's dtype; masters below
    teacher_model = copy.deepcopy(model).eval().requires_grad_(False)
    keys = set(model.state_dict())
    if name == "fsdp":
        model.float()
        teacher_model.float()
        runner = shard(LogitsAtLossPositions(model), low)
        teacher = Teacher(shard(LogitsAtLossPositions(teacher_model), low).eval(), args.teacher_block_size)
    else:
        model.to(low)
        teacher_model.to(low)
        runner = LogitsAtLossPositions(model)
        teacher = Teacher(teacher_model, args.teacher_block_size)
    params = sum(p.numel() for p in model.parameters())
    text = model.config.text_config
    shape = shape_of(((n, tuple(p.shape)) for n, p in model.named_parameters()), text.hidden_size,
                     text.num_hidden_layers, text.vocab_size)
    # `bard train --dry-run`'s estimate of this step (the replica is not DDP-wrapped: no bucket copy here)
    plan = stage_memory(shape, parallel="fsdp" if name == "fsdp" else "ddp", workers=1, dtype="bfloat16",
                        use_gpu=device == "cuda", batch_size=args.batch, row_tokens=batch.input_ids.shape[1],
                        vision_frozen=cfg.vision_lr_scale == 0, teacher=True)
    optimizer = build_optimizer(runner, cfg)
    times, history = [], []

    def timed_step(with_teacher: bool) -> dict:
        sync(device)
        t0 = time.perf_counter()
        metrics = train_step(runner, batch, optimizer, cfg, teacher=teacher if with_teacher else None)
        sync(device)
        times.append(time.perf_counter() - t0)
        history.append({k: metrics[k] for k in ("loss", "grad_norm") if k in metrics} | (
            {"kd": metrics["kd"]} if "kd" in metrics else {}))
        return metrics

    for _ in range(args.steps):
        timed_step(False)
    distill = timed_step(True)
    result = {"strategy": name, "params_b": params / 1e9, "master_dtype": str(next(model.parameters()).dtype),
              "step_s": statistics.median(times[1:args.steps]) if args.steps > 1 else times[0],
              "first_step_s": times[0], "distill_step_s": times[args.steps], "history": history,
              "kd": distill["kd"], "plan_gib": plan["total_gib"]}
    if name == "fsdp":
        sync(device)
        t0 = time.perf_counter()
        model_state, optim_state = full_state(model, runner, optimizer, True)
        result["gather_s"] = time.perf_counter() - t0
        result["gathered_tensors"] = len(model_state)
        result["gathered_keys_match"] = set(model_state) == keys
        result["gathered_gib"] = gib(sum(t.numel() * t.element_size() for t in model_state.values()))
        result["gathered_on_cpu"] = all(t.device.type == "cpu" for t in model_state.values())
        result["optimizer_entries"] = len(optim_state["state"])
        optimizer = build_optimizer(runner, cfg)  # a fresh optimizer, as after a restart
        load_optimizer_state(runner, optimizer, optim_state, True)
        result["restored_step"] = int(next(iter(optimizer.state.values()))["step"])
    timed_step(False)  # one more merge step (under FSDP on the restored optimizer): same loss as the replica's
    result["last_loss"] = history[-1]["loss"]
    if device == "cuda":
        result["peak_gib"] = gib(torch.cuda.max_memory_allocated())
    result["finite"] = all(math.isfinite(v) for h in history for v in h.values()) and all(
        bool(torch.isfinite(p.detach().float()).all()) for p in runner.parameters())
    return result  # the models go with this frame (main collects them before the next strategy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["tiny", "4b"], default="4b")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--strategies", default="replica,fsdp")
    parser.add_argument("--steps", type=int, default=3, help="merge steps before the distillation step")
    parser.add_argument("--prompt", type=int, default=1300)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--image-tokens", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--teacher-block-size", type=int, default=16)
    args = parser.parse_args()
    strategies = args.strategies.split(",")
    if unknown := set(strategies) - {"replica", "fsdp"}:
        parser.error(f"--strategies: unknown {sorted(unknown)} (replica, fsdp)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.steps < 1 or args.block_size % args.teacher_block_size:
        parser.error("--steps must be ≥ 1 and --teacher-block-size must divide --block-size")

    init_group(args.device)
    vocab = 512 if args.shape == "tiny" else 151936
    spec = NoiseSpec(kind="mixed", t_min=NoiseConfig().t_min, mask_token_id=SPECIALS["mask"],
                     substitute_ids=torch.arange(16, vocab), eos_id=SPECIALS["eos"], pad_id=SPECIALS["pad"])
    g = torch.Generator().manual_seed(0)
    samples = [synthetic_sample(args.prompt, args.response, args.image_tokens, vocab, g) for _ in range(args.batch)]
    probe, _ = build_model(args.shape, "meta")  # `pack` reads only the config (rope index), no weights
    batch = to_device(pack(samples, probe, args.block_size, spec, label_shift=True,
                           generator=torch.Generator().manual_seed(1)), args.device)
    cfg = TrainConfig(lr=2e-5, vision_lr_scale=0.1, label_shift=True)
    rows = []
    for name in strategies:
        rows.append(run_strategy(name, args, batch, cfg))
        gc.collect()
    dist.destroy_process_group()

    print(f"train step — shape={args.shape} device={args.device} tokens={batch.input_ids.numel()} "
          f"(P={args.prompt}, R={args.response}, image tokens {args.image_tokens}, batch {args.batch}) "
          f"B={args.block_size} teacher B={args.teacher_block_size}")
    print(f"{'strategy':>8} {'masters':>14} {'step s':>7} {'1st s':>6} {'distill s':>9} {'peak GiB':>8} {'plan':>6} "
          f"{'loss first→last':>17} {'kd':>6} {'gather s':>8} {'loss after':>10} {'finite':>6}")
    for r in rows:
        h = r["history"]
        print(f"{r['strategy']:>8} {r['master_dtype']:>14} {r['step_s']:7.3f} {r['first_step_s']:6.2f} "
              f"{r['distill_step_s']:9.3f} {r.get('peak_gib', float('nan')):8.1f} {r['plan_gib']:6.1f} "
              f"{h[0]['loss']:8.3f}→{h[args.steps - 1]['loss']:<8.3f} {r['kd']:6.3f} "
              f"{r.get('gather_s', float('nan')):8.2f} {r['last_loss']:10.4f} {str(r['finite']):>6}")
    print(json.dumps({"benchmark": "gpu_fsdp", "shape": args.shape, "device": args.device,
                      "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
                      "tokens": batch.input_ids.numel(), "rows": rows}))


if __name__ == "__main__":
    main()
