"""The worker side of a Ray Train stage (`tasks/train.py` is the driver side): the loop every worker runs,
its sample stream, and how it attaches the AR anchor's targets (a column `tasks.base_targets` added) to a sample.

This module imports no Prefect and no Ray at import time: Ray unpickles `train_loop_per_worker` in every
worker process of every `fit()`, so what this module imports is paid once per worker per stage (Prefect
alone was ~0.6 s of the ~1.6 s a 2-worker CPU stage took to launch its training function).
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from bard_core.config import NoiseConfig, TrainConfig


def _nbytes(sample) -> int:
    return sum(t.numel() * t.element_size() for t in vars(sample).values() if hasattr(t, "element_size"))


class EncodedStream:
    """A worker's endless stream of encoded samples, epoch after epoch.

    Every epoch reads the worker's Ray Data shard (`iter_rows`), whatever the cache holds. Ray Train's
    split starts each epoch's read on all workers together, so a worker that replayed an epoch from
    memory while another re-read its shard left that one waiting at the epoch barrier while it waited
    for that one's gradients: a deadlock, hit when one worker's encoded shard fit the budget and the
    other's did not. The cache saves the encoding instead: up to `cache_bytes`, encoded samples are kept
    by the curated `sample_id` and later epochs look them up, so a shard a little
    over the budget is mostly cached rather than not at all. Rows are shuffled through a local buffer
    of `buffer` samples (pulled from the shard as training consumes them, like any streamed read).
    `encode(row)` returns None for a rejected row, counted once in `skipped` and not encoded again; its
    place in the epoch goes to another sample of the same epoch, so every worker yields exactly as many
    samples per epoch as its shard has rows. Ray's equal split gives every worker the same number of
    rows, so all workers end each epoch at the same step even when their rejects differ (a worker with
    more rejects would otherwise reach the next epoch's barrier steps ahead of the others: the same
    deadlock). With `group` (the worker's batch size), every flushed buffer is ordered by
    `length_grouped` instead of shuffled: consecutive runs of `group` samples have similar lengths, and
    streams with one seed over shards of one size put their buffers' batches in the same length order.
    With `long_share` > 0, a buffer whose share of samples with more than `block_size` response tokens is
    below it is rebalanced before ordering (`rebalance`): long samples repeated, short ones subsampled, the
    buffer's size kept, so epochs stay equally long on every worker.
    """

    def __init__(self, shard, encode, seed: int, cache_bytes: int, buffer: int = 256, group: int = 0,
                 long_share: float = 0.0, block_size: int | None = None):
        self.shard, self.encode, self.cache_bytes, self.buffer, self.group = shard, encode, cache_bytes, buffer, group
        self.long_share, self.block_size = (long_share, block_size) if block_size else (0.0, None)
        self.mix_rng = random.Random(seed + 1)  # its own: the batch order's draws stay the same on every rank
        self.rng = random.Random(seed)
        self.skipped, self.epochs = 0, 0
        self.cache: dict = {}  # sample_id -> encoded sample, or None for a rejected row
        self.cached_bytes = 0

    def __iter__(self):
        while True:
            yield from self._epoch()
            self.epochs += 1

    def _sample(self, row):
        key = row.get("sample_id") if self.cache_bytes > 0 else None
        if key is not None and key in self.cache:
            return self.cache[key]
        sample = self.encode(row)
        if sample is None:
            self.skipped += self.epochs == 0  # counted in the first epoch only
        size = 0 if sample is None else _nbytes(sample)
        if key is not None and self.cached_bytes + size <= self.cache_bytes:
            self.cache[key] = sample
            self.cached_bytes += size
        return sample

    def _epoch(self):
        buffer, usable, owed, last = [], 0, 0, None
        for row in self.shard.iter_rows():
            sample = self._sample(row)
            if sample is None:  # a rejected row's place: the last usable sample, or the next one
                if last is None:
                    owed += 1
                    continue
                sample = last
            else:
                usable += 1
                last = sample
                buffer.extend([sample] * owed)
                owed = 0
            buffer.append(sample)
            if len(buffer) >= self.buffer:
                yield from self._order(buffer)
                buffer = []
        if usable == 0:
            raise RuntimeError(f"the training shard has no usable rows ({self.skipped} rejected by encoding)")
        yield from self._order(buffer)

    def _order(self, buffer: list) -> list:
        if self.long_share > 0:
            buffer = rebalance(buffer, lambda s: s.response_ids.numel() > self.block_size, self.long_share,
                               self.mix_rng)
        if self.group > 1:
            from bard_core.layout import length_grouped

            return length_grouped(buffer, self.group, self.rng)
        self.rng.shuffle(buffer)
        return buffer


def rebalance(buffer: list, is_long, share: float, rng: random.Random) -> list:
    """`buffer` with at least round(`share` × its size) samples for which `is_long` holds, as many samples as
    before: every long sample kept, then repeated in a shuffled cycle; short samples drawn without
    replacement for the rest. Unchanged when its long share is already `share` or more, or when it has no
    long or no short sample."""
    long = [s for s in buffer if is_long(s)]
    short = [s for s in buffer if not is_long(s)]
    want = min(len(buffer) - 1, round(share * len(buffer)))
    if not long or not short or len(long) >= want:
        return buffer
    cycle = long[:]
    rng.shuffle(cycle)
    extra = [cycle[i % len(cycle)] for i in range(want - len(long))]
    return long + extra + rng.sample(short, len(buffer) - want)


def with_anchor_targets(sample, row: dict):
    """`sample` with the anchor targets of its row (``anchor_ids``/``anchor_probs``, one list per response token)."""
    import numpy as np
    import torch

    ids, probs = row.get("anchor_ids"), row.get("anchor_probs")
    if ids is None or probs is None or len(ids) != sample.response_ids.numel() or len(probs) != len(ids):
        raise RuntimeError(f"row {row.get('sample_id')}: its anchor targets do not match its encoded response "
                           f"({None if ids is None else len(ids)} vs {sample.response_ids.numel()} tokens)")
    sample.anchor_ids = torch.as_tensor(np.stack([np.asarray(x, dtype=np.int32) for x in ids]))
    sample.anchor_probs = torch.as_tensor(np.stack([np.asarray(x, dtype=np.float32) for x in probs]))
    return sample


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker (see module docstring)."""
    import ray.train
    import torch
    from ray.train.torch import get_device, prepare_model

    from bard_core import checkpoint
    from bard_core.inputs import RejectedSample, encode_sample
    from bard_core.layout import ar_batch, noise_spec_for, pack
    from bard_core.parallel import full_state, load_optimizer_state, shard
    from bard_core.train import (
        LogitsAtLossPositions,
        enable_activation_checkpointing,
        freeze_fixed,
        to_device,
    )
    from bard_core.train_loop import Progress, checkpoint_meta, from_dicts, load_teacher, run_phases

    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["train"].items()})
    noise = NoiseConfig(**config["noise"])
    resume = ray.train.get_checkpoint()
    progress = Progress()
    if resume is not None:
        with resume.as_directory() as d:
            model, processor, meta = checkpoint.load(d, config["attn_implementation"])
            progress = Progress.resumed(meta)
            optimizer_state = checkpoint.read_training_state(Path(d) / checkpoint.TRAINING_STATE)
    else:
        model, processor, _ = checkpoint.load(config["init"], config["attn_implementation"])
        optimizer_state = None
    device, dtype, fsdp = get_device(), getattr(torch, config["dtype"]), train.parallel == "fsdp"
    if train.activation_checkpointing:
        enable_activation_checkpointing(model)
    freeze_fixed(model, train)
    if fsdp:  # fp32 master weights, sharded; compute in `dtype`
        runner = shard(LogitsAtLossPositions(model.to(device)), dtype)
    else:
        model.to(dtype)
        runner = prepare_model(LogitsAtLossPositions(model), parallel_strategy_kwargs={"find_unused_parameters": True})
    teacher = None
    if config["teacher"]:
        teacher = load_teacher(config["teacher"], config["teacher_block_size"], device, dtype, fsdp,
                               config["attn_implementation"])
    start = None
    if train.base_pull > 0 and resume is not None:  # the pull's target is the stage's start, not the resumed weights
        init, _, _ = checkpoint.load(config["init"], config["attn_implementation"])
        freeze_fixed(init, train)
        init_module = (shard(LogitsAtLossPositions(init.to(device)), dtype) if fsdp
                       else LogitsAtLossPositions(init.to(device, dtype)))
        start = {name: p for name, p in init_module.named_parameters() if p.requires_grad}
        del init, init_module  # only the trained weights' starting values stay (memory_plan counts one copy)
    spec = noise_spec_for(processor.tokenizer, noise.kind, noise.t_min, config["mask_token_id"], noise.prefix_prob)
    token_ids = {"mask": spec.mask_token_id, "eos": spec.eos_id, "pad": spec.pad_id}  # every reader's (bard.json)
    per_worker = max(1, train.batch_size // world)
    generator = torch.Generator().manual_seed(train.seed + rank + 7919 * progress.step)

    def encode(row):
        try:
            sample = encode_sample({"images": row["images"], "messages": row["messages"]}, processor, config["max_tokens"])
        except RejectedSample:
            return None
        if config["anchor"]:  # the AR anchor's targets, a column the driver added (BaseTargets)
            return with_anchor_targets(sample, row)
        return sample

    # grouped, the stream's generator only orders each buffer's batches; one seed on every rank puts the
    # workers' k-th shortest batches on the same step, so none waits at the all-reduce for a longer one
    group = per_worker if train.group_by_length else 0
    stream = EncodedStream(ray.train.get_dataset_shard("train"), encode,
                           train.seed + (0 if group else 1000 * rank) + progress.step, train.encode_cache_mb << 20,
                           group=group, long_share=train.long_share,
                           block_size=config["block_size"] if config["objective"] != "ar" else None)
    samples_iter = iter(stream)

    def encode_batch(samples):
        if config["objective"] == "ar":
            return to_device(ar_batch(samples, spec.pad_id), device)
        return to_device(pack(samples, model, config["block_size"], spec, prompt_mask=train.prompt_mask,
                              label_shift=train.label_shift, pad_loss_weight=train.pad_loss_weight,
                              keep_loss_weight=train.keep_loss_weight, generator=generator), device)

    def next_batch():
        samples = [next(samples_iter) for _ in range(per_worker)]
        if train.grad_accum_steps == 1:
            return encode_batch(samples)
        size = per_worker // train.grad_accum_steps  # equal micro-batches (tasks/train.py checks the division)
        return [encode_batch(samples[i:i + size]) for i in range(0, per_worker, size)]

    def restore(phase_name: str, optimizer) -> None:
        if optimizer_state is not None and optimizer_state.get("phase") == phase_name:
            load_optimizer_state(runner, optimizer, optimizer_state["optimizer"], fsdp)

    def on_step(progress, phase, metrics) -> None:
        if rank == 0 and config.get("progress") is not None:  # the driver's progress artifact (fire and forget)
            config["progress"].set.remote({"step": progress.step, "total": config["total_steps"],
                                           "phase": phase.name, "loss": metrics["loss"]})

    def on_checkpoint(progress, phase, optimizer, metrics, final: bool) -> None:
        report = {"step": progress.step, "phase": phase.name, "loss": metrics["loss"], "skipped": stream.skipped,
                  "final": final}
        model_state, optim_state = full_state(model, runner, optimizer, fsdp)  # collective under FSDP
        if rank != 0:
            ray.train.report(report)
            return
        with tempfile.TemporaryDirectory() as tmp:
            meta = checkpoint_meta(config["meta"], progress, phase, final, parallel=train.parallel,
                                   token_ids=token_ids)
            checkpoint.save_checkpoint(model, processor, Path(tmp) / "ckpt", meta, state_dict=model_state,
                                       training_state={"phase": phase.name, "optimizer": optim_state})
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(Path(tmp) / "ckpt"))

    run_phases(runner, from_dicts(config["phases"]), train, next_batch, progress, teacher=teacher, start_weights=start,
               restore=restore, on_step=on_step, on_checkpoint=on_checkpoint)
