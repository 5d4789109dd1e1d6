"""Ray Train per stage: one `TorchTrainer.fit()` runs a stage's phases — merge (block-diffusion CE at
B), then distill (CE + top-K KD from the teacher) — or the AR objective for a base.

The loop is bard_core's `train_step`; Ray adds only the process group and `prepare_model` (DDP over
gloo on CPU, NCCL on GPUs), the dataset shard and `ray.train.report` with checkpoints. With
``train.parallel = "fsdp"`` the model is instead sharded with FSDP2 (`fully_shard` per decoder layer
and vision block, then the root): fp32 master weights, compute in the recipe's dtype, and the full
state gathered to rank 0 for every checkpoint, so checkpoints are the same HF directories either way.
A checkpoint is an HF directory (+ processor, `bard.json`, optimizer state) every `checkpoint_every` steps; a worker failure
restarts the group from the latest one (`FailureConfig`), and calling the task again with the same
inputs returns the finished checkpoint without training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from prefect import task

from bard_core.config import NoiseConfig, TrainConfig, get_recipe
from tasks.curate import init_ray
from tasks.refs import CODE_VERSION, CheckpointRef, DatasetRef

OBJECTIVES = ("ar", "diffusion")


def _phases(objective: str, train: TrainConfig, has_teacher: bool) -> list[dict]:
    if objective == "ar":
        return [{"name": "ar", "steps": train.base_steps, "lr": train.lr, "min_ratio": train.min_lr_ratio}]
    phases = [{"name": "merge", "steps": train.merge_steps, "lr": train.lr, "min_ratio": train.min_lr_ratio}]
    if has_teacher and train.distill_steps:
        phases.append({"name": "distill", "steps": train.distill_steps, "lr": train.distill_lr,
                       "min_ratio": train.distill_min_lr_ratio})
    return phases


def _nbytes(sample) -> int:
    return sum(t.numel() * t.element_size() for t in vars(sample).values() if hasattr(t, "element_size"))


class EncodedStream:
    """A worker's endless stream of encoded samples, epoch after epoch, in a fresh local order each time.

    The first epoch streams the Ray Data shard and encodes every row (`encode(row)` returns None for a
    rejected row, which is counted once in `skipped`). While the encoded shard fits in `cache_bytes`
    it is kept, and later epochs replay it from memory instead of re-reading and re-encoding: on the
    tiny recipe encoding was ~30% of a step. A shard too large for the budget is streamed every epoch.
    """

    def __init__(self, shard, encode, seed: int, cache_bytes: int):
        self.shard, self.encode, self.cache_bytes = shard, encode, cache_bytes
        self.rng = random.Random(seed)
        self.skipped, self.epochs, self.cached = 0, 0, None  # `cached`: the whole encoded shard, once known

    def __iter__(self):
        while True:
            if self.cached is not None:
                order = list(self.cached)
                self.rng.shuffle(order)
                yield from order
            else:
                yield from self._stream_epoch()
            self.epochs += 1

    def _stream_epoch(self):
        keep, size, buffer, kept, streamed = self.cache_bytes > 0, 0, [], [], 0
        for row in self.shard.iter_rows():
            sample = self.encode(row)
            if sample is None:
                self.skipped += self.epochs == 0  # counted in the first epoch only
                continue
            streamed += 1
            if keep:
                size += _nbytes(sample)
                if size <= self.cache_bytes:
                    kept.append(sample)
                else:
                    keep, kept = False, []
            buffer.append(sample)
            if len(buffer) >= 256:
                self.rng.shuffle(buffer)
                yield from buffer
                buffer = []
        if streamed == 0:
            raise RuntimeError(f"the training shard has no usable rows ({self.skipped} rejected by encoding)")
        self.rng.shuffle(buffer)
        yield from buffer
        if keep:
            self.cached = kept


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker (see module docstring)."""
    import ray.train
    import torch
    from ray.train.torch import get_device, prepare_model

    from bard_core import stages
    from bard_core.inputs import RejectedSample, encode_sample
    from bard_core.layout import ar_batch, noise_spec_for, pack
    from bard_core.parallel import full_state, load_optimizer_state, shard
    from bard_core.train import (
        LogitsAtLossPositions,
        Teacher,
        build_optimizer,
        build_scheduler,
        to_device,
        train_step,
    )

    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["train"].items()})
    noise = NoiseConfig(**config["noise"])
    resume = ray.train.get_checkpoint()
    state = {"step": 0, "history": [], "resumed_from": []}
    if resume is not None:
        with resume.as_directory() as d:
            model, processor, meta = stages.load(d)
            state = {"step": meta["step"], "history": meta["history"],
                     "resumed_from": meta.get("resumed_from", []) + [meta["step"]]}
            optimizer_state = torch.load(Path(d) / "optimizer.pt", weights_only=False)
    else:
        model, processor, _ = stages.load(config["init"])
        optimizer_state = None
    device, dtype, fsdp = get_device(), getattr(torch, config["dtype"]), train.parallel == "fsdp"
    if fsdp:  # fp32 master weights, sharded; compute in `dtype`
        runner = shard(LogitsAtLossPositions(model.to(device)), dtype)
    else:
        model.to(dtype)
        runner = prepare_model(LogitsAtLossPositions(model), parallel_strategy_kwargs={"find_unused_parameters": True})
    teacher = None
    if config["teacher"]:
        teacher_model, _, _ = stages.load(config["teacher"])
        for p in teacher_model.parameters():
            p.requires_grad_(False)
        teacher_model.eval()
        if fsdp:
            teacher = Teacher(shard(LogitsAtLossPositions(teacher_model.to(device)), dtype).eval(),
                              config["teacher_block_size"])
        else:
            teacher = Teacher(teacher_model.to(device, dtype), config["teacher_block_size"])
    spec = noise_spec_for(processor.tokenizer, noise.kind, noise.t_min, config["mask_token_id"])
    per_worker = max(1, train.batch_size // world)
    generator = torch.Generator().manual_seed(train.seed + rank + 7919 * state["step"])

    def encode(row):
        try:
            return encode_sample({"images": row["images"], "messages": row["messages"]}, processor, train.max_tokens)
        except RejectedSample:
            return None

    stream = EncodedStream(ray.train.get_dataset_shard("train"), encode, train.seed + 1000 * rank + state["step"],
                           train.encode_cache_mb << 20)
    samples_iter = iter(stream)

    def next_batch():
        samples = [next(samples_iter) for _ in range(per_worker)]
        if config["objective"] == "ar":
            return to_device(ar_batch(samples, spec.pad_id), device)
        return to_device(pack(samples, model, config["block_size"], spec, prompt_mask=train.prompt_mask,
                              label_shift=train.label_shift, pad_loss_weight=train.pad_loss_weight,
                              generator=generator), device)

    done_before = 0
    for phase in config["phases"]:
        start, end = done_before, done_before + phase["steps"]
        done_before = end
        if state["step"] >= end:
            continue
        optimizer = build_optimizer(runner.module if hasattr(runner, "module") else runner, train, phase["lr"])
        scheduler = build_scheduler(optimizer, phase["steps"], min(train.warmup_steps, phase["steps"] // 2),
                                    phase["min_ratio"])
        if optimizer_state is not None and optimizer_state.get("phase") == phase["name"]:
            load_optimizer_state(runner, optimizer, optimizer_state["optimizer"], fsdp)
        for _ in range(state["step"] - start):
            scheduler.step()
        optimizer_state = None
        phase_teacher = teacher if phase["name"] == "distill" else None
        while state["step"] < end:
            if config.get("fail_at_step") == state["step"] + 1 and rank == world - 1:
                marker = Path(config["fail_marker"])
                if not marker.exists():  # fail once, as a crashed worker would
                    marker.write_text("failed once")
                    raise RuntimeError(f"injected worker failure at step {state['step'] + 1}")
            started = time.perf_counter()
            batch = next_batch()
            fetched = time.perf_counter()
            metrics = train_step(runner, batch, optimizer, train, teacher=phase_teacher, scheduler=scheduler)
            state["step"] += 1
            state["history"].append({"step": state["step"], "phase": phase["name"], "loss": metrics["loss"],
                                     **({"kd": metrics["kd"]} if "kd" in metrics else {}),
                                     "data_s": round(fetched - started, 4),
                                     "step_s": round(time.perf_counter() - fetched, 4)})
            last = state["step"] == config["total_steps"]
            if state["step"] % train.checkpoint_every == 0 or state["step"] == end:
                report = {"step": state["step"], "phase": phase["name"], "loss": metrics["loss"], "skipped": stream.skipped,
                          "final": last}
                model_state, optim_state = full_state(model, runner, optimizer, fsdp)  # collective under FSDP
                if rank == 0:
                    with tempfile.TemporaryDirectory() as tmp:
                        meta = {**config["meta"], "step": state["step"], "history": state["history"],
                                "phase": phase["name"], "final": last, "resumed_from": state["resumed_from"],
                                "parallel": train.parallel}
                        stages.save_checkpoint(model, processor, Path(tmp) / "ckpt", meta, state_dict=model_state)
                        torch.save({"phase": phase["name"], "optimizer": optim_state},
                                   Path(tmp) / "ckpt" / "optimizer.pt")
                        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(Path(tmp) / "ckpt"))
                else:
                    ray.train.report(report)


def stage_fingerprint(data: DatasetRef, init: CheckpointRef, block_size: int | None, teacher: CheckpointRef | None,
                      recipe_payload: str, objective: str) -> str:
    payload = json.dumps([data.fingerprint, init.fingerprint, block_size, teacher.fingerprint if teacher else None,
                          recipe_payload, objective, CODE_VERSION], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def checkpoint_ref(path: str | Path) -> CheckpointRef:
    """A CheckpointRef for an existing HF directory (bard.json when present, else a content hash)."""
    path = Path(path).resolve()
    meta_file = path / "bard.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        return CheckpointRef(str(path), meta.get("block_size"), meta.get("step", 0), meta.get("parent"),
                             meta["fingerprint"])
    digest = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(f.name.encode())
        digest.update(hashlib.sha256(f.read_bytes()).digest())
    return CheckpointRef(str(path), None, 0, None, digest.hexdigest()[:20])


def run_stage(data: DatasetRef, init: CheckpointRef, out: str | Path, recipe_name: str = "tiny",
              overrides: dict | None = None, *, block_size: int | None = None, teacher: CheckpointRef | None = None,
              objective: str = "diffusion", fail_at_step: int | None = None, workers: int | None = None) -> CheckpointRef:
    """Train one stage with Ray Train and write its checkpoint to `out` (skipped if already there)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: expected one of {', '.join(OBJECTIVES)}")
    if objective == "diffusion" and not block_size:
        raise ValueError("a diffusion stage needs a block size")
    if teacher is not None and (teacher.block_size is None or block_size is None or block_size % teacher.block_size):
        raise ValueError(f"teacher block size {teacher.block_size} must divide the stage's block size {block_size}")
    recipe = get_recipe(recipe_name, overrides)
    train = recipe.train
    out = Path(out).resolve()
    fingerprint = stage_fingerprint(data, init, block_size, teacher, recipe.fingerprint_payload(), objective)
    meta_file = out / "bard.json"
    if meta_file.exists() and json.loads(meta_file.read_text()).get("fingerprint") == fingerprint:
        return checkpoint_ref(out)

    phases = _phases(objective, train, teacher is not None)
    total = sum(p["steps"] for p in phases)
    if total < 1:
        raise ValueError("the stage has no steps to run (check the recipe's step counts)")
    workers = workers or train.num_workers
    meta = {"fingerprint": fingerprint, "block_size": block_size if objective == "diffusion" else None,
            "objective": objective, "parent": init.uri, "teacher": teacher.uri if teacher else None,
            "teacher_block_size": teacher.block_size if teacher else None, "data": data.uri,
            "data_fingerprint": data.fingerprint, "recipe": recipe.name, "phases": phases, "total_steps": total,
            "label_shift": train.label_shift, "prompt_mask": train.prompt_mask, "noise": recipe.noise.kind}
    config = {
        "init": init.uri, "teacher": teacher.uri if teacher else None,
        "teacher_block_size": teacher.block_size if teacher else None, "block_size": block_size,
        "objective": objective, "phases": phases, "total_steps": total, "train": dataclasses.asdict(train),
        "noise": dataclasses.asdict(recipe.noise), "mask_token_id": recipe.model.mask_token_id, "meta": meta,
        "dtype": recipe.model.dtype if train.use_gpu else "float32",
        "threads": max(1, (os.cpu_count() or 2) // workers), "fail_at_step": fail_at_step,
        "fail_marker": str(out.with_name(out.name + ".failed-once")),
    }
    init_ray(recipe.ray_address)
    dataset = ray.data.read_parquet(str(Path(data.uri) / "data"))
    storage = out.with_name(out.name + ".ray")
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config, datasets={"train": dataset},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=train.use_gpu),
        run_config=ray.train.RunConfig(storage_path=str(storage), name=f"stage-{fingerprint}",
                                       failure_config=ray.train.FailureConfig(max_failures=2),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"stage produced no checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(d, tmp)
    (tmp / "optimizer.pt").unlink(missing_ok=True)
    final = json.loads((tmp / "bard.json").read_text())
    if final["step"] != total:
        raise RuntimeError(f"stage ended at step {final['step']} of {total}")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    shutil.rmtree(storage, ignore_errors=True)
    Path(config["fail_marker"]).unlink(missing_ok=True)
    return checkpoint_ref(out)


@task(name="train-stage", task_run_name="train {objective} B={block_size}")
def train_stage(data: DatasetRef, init: CheckpointRef, out: str, recipe_name: str = "tiny",
                overrides: dict | None = None, block_size: int | None = None, teacher: CheckpointRef | None = None,
                objective: str = "diffusion") -> CheckpointRef:
    """Prefect task: one Ray Train stage (merge → distill, or the AR objective)."""
    return run_stage(data, init, out, recipe_name, overrides, block_size=block_size, teacher=teacher,
                     objective=objective)
