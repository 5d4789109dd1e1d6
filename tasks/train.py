"""Ray Train per stage: one `TorchTrainer.fit()` runs a stage's phases — merge (block-diffusion CE at
B), then distill (CE + top-K KD from the teacher) — or the AR objective for a base. With
``train.anchor_weight`` every diffusion phase also distils the chain's frozen AR base at the positions
whose context is an AR model's (`resolve_anchor` finds that base).

The loop is bard_core's (`bard_core/train_loop.py`); Ray adds only the process group and `prepare_model` (DDP over
gloo on CPU, NCCL on GPUs), the dataset shard and `ray.train.report` with checkpoints. With
``train.parallel = "fsdp"`` the model is instead sharded with FSDP2 (`fully_shard` per decoder layer
and vision block, then the root): fp32 master weights, compute in the recipe's dtype, and the full
state gathered to rank 0 for every checkpoint, so checkpoints are the same HF directories either way.
A checkpoint is an HF directory (+ processor, `bard.json`, optimizer state) every `checkpoint_every` steps; a worker failure
restarts the group from the latest one (`FailureConfig`), and calling the task again with the same
inputs returns the finished checkpoint without training. This module is the driver side; the loop every
worker runs is `tasks/train_worker.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import threading
from pathlib import Path

from prefect import task

from bard_core import checkpoint
from bard_core.config import OBJECTIVES, TrainConfig
from bard_core.files import CorruptFile, staged_dir
from bard_core.recipes import get_recipe
from bard_core.train_loop import as_dicts, plan
from tasks.base_targets import BaseTargets
from tasks.locks import locked
from tasks.ray_session import init_ray
from tasks.refs import EVAL_SETTINGS, CheckpointRef, DatasetRef, checkpoint_ref, code_version, resolve_anchor
from tasks.train_progress import ProgressBoard, ProgressLog, watching
from tasks.train_worker import train_loop_per_worker

_DATASETS: dict = {}  # (driver's Ray worker id, data fingerprint) → materialized Dataset; one entry at most
_DATASETS_LOCK = threading.Lock()


def training_dataset(data: DatasetRef, cache_mb: int, anchor: CheckpointRef | None = None,
                     train: TrainConfig | None = None, workers: int = 1, dtype: str = "float32",
                     max_tokens: int = 8192):
    """The Ray Dataset a stage trains on. Up to `cache_mb` on disk it is materialized once and reused by
    the next stages on the same data (a chain trains four stages on one curated set); the entry belongs
    to this driver's Ray connection, whose object store holds the blocks, and a new connection or other
    data replaces it. Larger data streams from its parquet files.

    With `anchor` (the chain's AR base), a `map_batches` step (`workers` actors, `BaseTargets`) replaces every
    row's answer by the base's (``train.targets=base``) and adds the AR anchor's targets (``train.anchor_weight``):
    they depend on the row and the base only, so a chain on cached data computes them once for all four
    stages instead of once per training step."""
    import ray

    data.verify()  # the shards' digests against the manifest, before any worker reads them
    files = Path(data.uri) / "data"

    def build():
        ds = ray.data.read_parquet(str(files))
        ds.context.execution_options.preserve_order = True  # the same batches on every run (docs/stage_budget.md)
        if anchor is None:
            return ds
        gpu = bool(train.use_gpu)
        # a small curated set is one or two files: without blocks to share, one actor would do all the work
        # one actor pool for both steps: two pools would hold every CPU and starve the read that feeds them
        return ds.repartition(4 * workers).map_batches(
            BaseTargets, batch_format="pyarrow", batch_size=64, compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=0 if gpu else 1, num_gpus=1 if gpu else 0,
            fn_constructor_kwargs={"base": anchor.uri, "max_tokens": max_tokens, "answers": train.targets == "base",
                                   "top_k": train.kd_top_k if train.anchor_weight > 0 else 0,
                                   "temperature": train.kd_temperature, "dtype": dtype})

    size = sum(f.stat().st_size for f in files.rglob("*") if f.is_file())
    if size > cache_mb << 20:
        return build()
    key = (ray.get_runtime_context().get_worker_id(), data.fingerprint,
           None if anchor is None else (anchor.fingerprint, max_tokens, train.kd_top_k, train.kd_temperature,
                                        train.anchor_weight > 0, train.targets))
    with _DATASETS_LOCK:
        if key not in _DATASETS:
            _DATASETS.clear()
            _DATASETS[key] = build().materialize()
        return _DATASETS[key]


def training_payload(recipe, block_size: int | None, objective: str = "diffusion") -> str:
    """What of a recipe a stage's weights depend on: the model, the noise and the stage's training settings
    (gate and decode settings do not retrain a stage)."""
    train = recipe.train.for_stage(block_size if objective == "diffusion" else None)
    settings = dataclasses.asdict(train)
    settings.pop("teacher")  # which teacher is the stage's teacher argument, fingerprinted beside this
    return json.dumps({"model": dataclasses.asdict(recipe.model), "noise": dataclasses.asdict(recipe.noise),
                       "train": settings}, sort_keys=True, default=str)


# not followed by the stage key: the decode and gate settings, the GPU's static cache (the same tokens as the
# dynamic one, tests/test_static_kv.py) and the progress reporting, so a change to any of them retrains nothing
STAGE_CODE_SKIP = EVAL_SETTINGS + ("bard_core.static_kv", "tasks.train_progress")


def stage_fingerprint(data: DatasetRef, init: CheckpointRef, block_size: int | None, teacher: CheckpointRef | None,
                      recipe_payload: str, objective: str, anchor: CheckpointRef | None = None) -> str:
    code = code_version("tasks.train", skip=STAGE_CODE_SKIP)
    payload = json.dumps([data.fingerprint, init.fingerprint, block_size, teacher.fingerprint if teacher else None,
                          recipe_payload, objective, code] + ([anchor.fingerprint] if anchor else []), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def stage_key(data: DatasetRef, init: CheckpointRef, recipe_name: str, overrides: dict | None = None, *,
              block_size: int | None = None, teacher: CheckpointRef | None = None, objective: str = "diffusion",
              anchor: CheckpointRef | None = None) -> str:
    """The fingerprint of a stage's inputs (the one the stage's bard.json records, and the pipeline's cache
    entry is named by): data, init, teacher and anchor checkpoints, the recipe's training payload, the code."""
    recipe = get_recipe(recipe_name, overrides)
    train = recipe.train.for_stage(block_size if objective == "diffusion" else None)
    anchor = resolve_anchor(init, anchor, train.uses_base, objective)
    return stage_fingerprint(data, init, block_size, teacher, training_payload(recipe, block_size, objective),
                             objective, anchor)


def run_stage(data: DatasetRef, init: CheckpointRef, out: str | Path, recipe_name: str = "tiny",
              overrides: dict | None = None, *, block_size: int | None = None, teacher: CheckpointRef | None = None,
              objective: str = "diffusion", workers: int | None = None,
              anchor: CheckpointRef | None = None, on_progress=None) -> CheckpointRef:
    """Train one stage with Ray Train and write its checkpoint to `out` (skipped if already there).
    `anchor`: the AR base for ``train.anchor_weight`` (default: see `resolve_anchor`); `on_progress`: called
    every few seconds with the last step's ``{"step", "total", "phase", "loss"}`` while it trains."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: expected one of {', '.join(OBJECTIVES)}")
    if objective == "diffusion" and not block_size:
        raise ValueError("a diffusion stage needs a block size")
    if teacher is not None and (block_size is None or (teacher.block_size and block_size % teacher.block_size)):
        raise ValueError(f"teacher block size {teacher.block_size} must divide the stage's block size {block_size}")
    recipe = get_recipe(recipe_name, overrides)
    train = recipe.train.for_stage(block_size if objective == "diffusion" else None)
    out = Path(out).resolve()
    anchor = resolve_anchor(init, anchor, train.uses_base, objective)
    fingerprint = stage_key(data, init, recipe_name, overrides, block_size=block_size, teacher=teacher,
                            objective=objective, anchor=anchor)
    meta_file = out / "bard.json"

    def finished() -> bool:
        return meta_file.exists() and json.loads(meta_file.read_text()).get("fingerprint") == fingerprint

    if finished():
        return checkpoint_ref(out)
    # another run training this very stage (same inputs, same cache entry): wait for it, then reuse its result
    with locked(out.with_name(out.name + ".lock")):
        if finished():
            return checkpoint_ref(out)
        return _fit(out, fingerprint, data, init, teacher, anchor, recipe, train, objective, block_size, workers,
                    on_progress)


def _fit(out: Path, fingerprint: str, data: DatasetRef, init: CheckpointRef, teacher: CheckpointRef | None,
         anchor: CheckpointRef | None, recipe, train: TrainConfig, objective: str, block_size: int | None,
         workers: int | None, on_progress) -> CheckpointRef:
    """The stage's `fit()` and the atomic move of its last checkpoint to `out` (under the stage's lock)."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer


    phases = as_dicts(plan(objective, train, teacher is not None))
    total = sum(p["steps"] for p in phases)
    if total < 1:
        raise ValueError("the stage has no steps to run (check the recipe's step counts)")
    workers = workers or train.num_workers
    if (train.batch_size // workers) % train.grad_accum_steps or train.batch_size < workers * train.grad_accum_steps:
        raise ValueError(f"train.batch_size {train.batch_size} over {workers} workers does not split into "
                         f"{train.grad_accum_steps} equal micro-batches (train.grad_accum_steps)")
    meta = {"fingerprint": fingerprint, "block_size": block_size if objective == "diffusion" else None,
            "objective": objective, "parent": init.uri, "teacher": teacher.uri if teacher else None,
            "teacher_block_size": teacher.block_size if teacher else None, "data": data.uri,
            "data_fingerprint": data.fingerprint, "recipe": recipe.name, "phases": phases, "total_steps": total,
            "label_shift": train.label_shift, "prompt_mask": train.prompt_mask, "noise": recipe.noise.kind,
            "prefix_prob": recipe.noise.prefix_prob, "anchor": anchor.uri if anchor else None, "targets": train.targets,
            "anchor_weight": train.anchor_weight if anchor else 0.0, "keep_loss_weight": train.keep_loss_weight,
            "long_share": train.long_share, "grad_accum_steps": train.grad_accum_steps,
            "activation_checkpointing": train.activation_checkpointing}
    config = {
        "init": init.uri, "teacher": teacher.uri if teacher else None,
        "anchor": anchor.uri if anchor and train.anchor_weight > 0 else None,
        "teacher_block_size": teacher.block_size if teacher else None, "block_size": block_size,
        "objective": objective, "phases": phases, "total_steps": total, "train": dataclasses.asdict(train),
        "noise": dataclasses.asdict(recipe.noise), "mask_token_id": recipe.model.mask_token_id, "meta": meta,
        "dtype": recipe.model.dtype if train.use_gpu else "float32",
        "attn_implementation": recipe.model.attn_implementation,
        "threads": max(1, (os.cpu_count() or 2) // workers), "max_tokens": recipe.data.max_tokens,
    }
    init_ray(recipe.ray_address)
    dataset = training_dataset(data, train.dataset_cache_mb, anchor, train, workers, config["dtype"],
                               recipe.data.max_tokens)
    meta["target_counts"] = BaseTargets.counts(dataset) if train.targets == "base" else None
    storage = out.with_name(out.name + ".ray")
    _discard_unusable_resume(storage / f"stage-{fingerprint}")
    board = ray.remote(num_cpus=0)(ProgressBoard).remote() if on_progress else None
    config["progress"] = board
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config, datasets={"train": dataset},
        # the order kept: the split hands each worker the same rows on every run, not blocks to whoever asks first
        dataset_config=ray.train.DataConfig(execution_options=ray.data.ExecutionOptions(preserve_order=True)),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=train.use_gpu),
        run_config=ray.train.RunConfig(storage_path=str(storage), name=f"stage-{fingerprint}",
                                       failure_config=ray.train.FailureConfig(max_failures=2),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    with watching(board, on_progress), _interruptible():
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"stage produced no checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d, staged_dir(out, "stage checkpoint") as tmp:
        shutil.copytree(d, tmp, dirs_exist_ok=True)
        final = checkpoint.verify(tmp)  # Ray's copy of it, checked against the digests the worker recorded
        if final["step"] != total:
            raise RuntimeError(f"stage ended at step {final['step']} of {total}")
        checkpoint.drop_training_state(tmp)
    shutil.rmtree(storage, ignore_errors=True)
    return checkpoint_ref(out)


def _discard_unusable_resume(run_dir: Path) -> None:
    """Start the stage over rather than resume from a state that cannot be trusted: Ray's checkpoint snapshot
    torn (it rewrites it in place after every checkpoint), or naming a checkpoint that is gone or fails its
    digests. Ray would otherwise refuse the run directory, or hand a torn checkpoint to every restart."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return
    why = None
    try:
        text = snapshot.read_text()
        json.loads(text)
        for name in sorted(set(re.findall(r"checkpoint_\d{4}-\d\d-\d\d_[\d.-]+", text))):
            checkpoint.verify(run_dir / name)  # a checkpoint directory without its bard.json fails too
            if not (run_dir / name / checkpoint.META).exists():
                raise CorruptFile(f"{run_dir / name / checkpoint.META}: missing")
    except (ValueError, OSError, CorruptFile) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if why:
        print(f"stage storage {run_dir}: not resumable ({why}); starting the stage over")
        shutil.rmtree(run_dir)


@contextlib.contextmanager
def _interruptible():
    """Ctrl-C during `fit()` is a KeyboardInterrupt, as everywhere else: Ray Train's SIGINT handler aborts the run
    and then ends it with SystemExit(0) (an interrupted stage would exit 0) and stays installed after `fit()`."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    except SystemExit as exc:
        raise KeyboardInterrupt(f"stage training interrupted (Ray Train exit {exc.code})") from None
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


@task(name="train-stage", task_run_name="train {objective} B={block_size}")
def train_stage(data: DatasetRef, init: CheckpointRef, out: str, recipe_name: str = "tiny",
                overrides: dict | None = None, block_size: int | None = None, teacher: CheckpointRef | None = None,
                objective: str = "diffusion", anchor: CheckpointRef | None = None) -> CheckpointRef:
    """Prefect task: one Ray Train stage (merge → distill, or the AR objective), with a progress artifact
    fed by its training steps and a log line a minute (`tasks.train_progress.ProgressLog`)."""
    from prefect import get_run_logger
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    name = f"B{block_size}" if objective == "diffusion" else objective
    artifact = create_progress_artifact(0.0, key=f"train-{name.lower()}",
                                        description=f"stage {name}: training steps done (merge, then distill)")
    progress = ProgressLog(name, get_run_logger().info, lambda percent: update_progress_artifact(artifact, percent))
    ref = run_stage(data, init, out, recipe_name, overrides, block_size=block_size, teacher=teacher,
                    objective=objective, anchor=anchor, on_progress=progress)
    update_progress_artifact(artifact, 100.0)
    progress.done()
    return ref
