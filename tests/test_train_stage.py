"""Ray Train stages on a real local Ray with 2 CPU workers (gloo DDP)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import SHORT
from tests.faults import WorkerCrash

pytestmark = pytest.mark.slow


def _fixed_batch_ce(ckpt, data_ref, objective: str = "diffusion") -> float:
    """The block-diffusion CE (B=4, fixed noise) or the next-token CE (`objective="ar"`) of `ckpt` on
    the first 24 usable curated rows."""
    import pyarrow.parquet as pq
    import torch

    from bard_core import checkpoint
    from bard_core.config import TrainConfig
    from bard_core.inputs import RejectedSample, encode_sample
    from bard_core.layout import ar_batch, noise_spec_for, pack
    from bard_core.train import compute_loss

    model, processor, _ = checkpoint.load(ckpt)
    samples = []
    for row in pq.read_table(str(Path(data_ref.uri) / "data")).to_pylist():
        try:
            samples.append(encode_sample({"images": row["images"], "messages": row["messages"]}, processor, 512))
        except RejectedSample:
            continue
        if len(samples) == 24:
            break
    spec = noise_spec_for(processor.tokenizer, "mixed", 0.05, prefix_prob=0.5)
    if objective == "ar":
        batch = ar_batch(samples, spec.pad_id)
    else:
        batch = pack(samples, model, 4, spec, label_shift=True, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return compute_loss(model, batch, TrainConfig(label_shift=True))[1]["ar_ce" if objective == "ar" else "ce"]


def _meta(ref) -> dict:
    return json.loads((Path(ref.uri) / "bard.json").read_text())


def test_a_short_stage_learns_and_writes_a_loadable_checkpoint(stage_b4, data_ref, tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    meta = _meta(stage_b4)
    assert stage_b4.block_size == 4 and stage_b4.step == 40 == meta["step"] == meta["total_steps"]
    assert meta["parent"] == str(Path(tiny_model_dir).resolve()) and meta["data_fingerprint"] == data_ref.fingerprint
    assert meta["objective"] == "diffusion" and [p["name"] for p in meta["phases"]] == ["merge"]
    # the tiny recipe's AR anchor: the first stage's init is the AR base, so it is the anchor
    assert meta["anchor"] == meta["parent"] and meta["anchor_weight"] > 0
    assert all(h["anchor"] > 0 for h in meta["history"])
    losses = [h["ce"] for h in meta["history"]]  # the block-diffusion CE (the total adds the anchor's KD)
    assert all(h["loss"] == pytest.approx(h["ce"] + meta["anchor_weight"] * h["anchor"], rel=1e-4)
               for h in meta["history"])
    assert [h["step"] for h in meta["history"]] == list(range(1, 41))
    assert all(h["data_s"] >= 0 and h["step_s"] > 0 for h in meta["history"])  # where a step's time went
    # a step's CE depends on its batch's length class (grouped batches: all short answers, or all listings),
    # so learning is measured on one fixed batch, the same samples and noise for the base and the stage
    before, after = _fixed_batch_ce(tiny_model_dir, data_ref), _fixed_batch_ce(stage_b4.uri, data_ref)
    assert after < 0.7 * before, (before, after, losses)
    AutoProcessor.from_pretrained(stage_b4.uri), AutoModelForImageTextToText.from_pretrained(stage_b4.uri)
    assert not (Path(stage_b4.uri) / "optimizer.pt").exists()


def test_a_stage_trained_again_takes_the_very_same_steps(stage_b4, data_ref, tiny_model_dir, tmp_path):
    """Reproducible: the same stage trained again (its dataset and the anchor's targets rebuilt, not the shared
    copy) has the same loss at every step, bit for bit: the curated order, the split between the two workers, the
    batches and the noise are all fixed by the inputs."""
    from tasks import train
    from tasks.train import checkpoint_ref, run_stage

    train._DATASETS.clear()
    again = run_stage(data_ref, checkpoint_ref(tiny_model_dir), tmp_path / "B4", "tiny", SHORT, block_size=4, workers=2)
    first, second = _meta(stage_b4)["history"], _meta(again)["history"]
    assert len(first) == 40 and [h["loss"] for h in second] == [h["loss"] for h in first]
    assert [h["anchor"] for h in second] == [h["anchor"] for h in first]


def test_same_inputs_return_the_existing_checkpoint_without_training(stage_b4, data_ref, tiny_model_dir):
    from tasks.train import checkpoint_ref, run_stage

    weights = Path(stage_b4.uri) / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = run_stage(data_ref, checkpoint_ref(tiny_model_dir), stage_b4.uri, "tiny", SHORT, block_size=4, workers=2)
    assert again == stage_b4 and weights.stat().st_mtime_ns == before  # a run would have replaced the directory


def test_distillation_keeps_the_teacher_frozen_and_resumes_after_a_worker_dies(stage_b4, data_ref, tmp_path):
    from tasks.train import run_stage

    teacher_files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                     for p in Path(stage_b4.uri).iterdir() if p.is_file()}
    crash = WorkerCrash(after_step=9, saved_under=tmp_path / "B8.ray")
    # with the pull towards the stage's start, which the restarted workers load from the init (not the resumed state)
    ref = run_stage(data_ref, stage_b4, tmp_path / "B8", "tiny", {**SHORT, "train.base_pull": "50"}, block_size=8,
                    teacher=stage_b4, workers=2, on_progress=crash)
    meta, seen = _meta(ref), crash.seen
    # the progress feed (the pipeline's progress artifact) follows the steps, across the restart too
    assert seen and all(v["total"] == 48 and 1 <= v["step"] <= 48 for v in seen) and max(v["step"] for v in seen) >= 40
    assert {v["phase"] for v in seen} <= {"merge", "distill"}
    assert crash.killed and ref.step == 48 == meta["step"]  # 40 merge + 8 distill, despite the crash
    assert len(meta["resumed_from"]) == 1 and meta["resumed_from"][0] in (8, 16, 24, 32, 40)  # from a checkpoint
    assert [h["step"] for h in meta["history"]] == list(range(1, 49))
    assert {h["phase"] for h in meta["history"] if h["step"] > 40} == {"distill"}
    assert all(h["kd"] > 0 for h in meta["history"] if h["phase"] == "distill")
    assert meta["teacher"] == stage_b4.uri and meta["teacher_block_size"] == 4
    assert meta["anchor"] == _meta(stage_b4)["anchor"]  # the chain's one AR base, found from B4's bard.json
    assert all(h["anchor"] > 0 for h in meta["history"])  # in the merge and the distill phase
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in Path(stage_b4.uri).iterdir() if p.is_file()} == teacher_files


def test_the_same_task_trains_the_ar_objective(data_ref, tiny_model_dir, tmp_path):
    from tasks.train import checkpoint_ref, run_stage

    ref = run_stage(data_ref, checkpoint_ref(tiny_model_dir), tmp_path / "base", "tiny", SHORT, objective="ar",
                    workers=2)
    meta = _meta(ref)
    assert ref.block_size is None and meta["objective"] == "ar" and meta["step"] == 24
    before, after = _fixed_batch_ce(tiny_model_dir, data_ref, "ar"), _fixed_batch_ce(ref.uri, data_ref, "ar")
    assert after < before, (before, after, [h["loss"] for h in meta["history"]])


def test_bad_stage_arguments_are_refused(data_ref, tiny_model_dir, stage_b4, tmp_path):
    from tasks.train import checkpoint_ref, run_stage

    with pytest.raises(ValueError, match="block size"):
        run_stage(data_ref, checkpoint_ref(tiny_model_dir), tmp_path / "x", "tiny", SHORT)
    with pytest.raises(ValueError, match="divide"):
        run_stage(data_ref, stage_b4, tmp_path / "y", "tiny", SHORT, block_size=6, teacher=stage_b4)
    with pytest.raises(ValueError, match="objective"):
        run_stage(data_ref, stage_b4, tmp_path / "z", "tiny", SHORT, block_size=8, objective="rl")


def test_the_anchor_is_the_chains_ar_base_unless_given(stage_b4, tiny_model_dir, tmp_path):
    from tasks.refs import CheckpointRef, checkpoint_ref, resolve_anchor

    base = checkpoint_ref(tiny_model_dir)
    assert resolve_anchor(base, None, 2.0, "diffusion") == base  # B4 from the AR base
    assert resolve_anchor(stage_b4, None, 2.0, "diffusion") == base  # later stages: recorded by their init
    other = CheckpointRef(str(tmp_path), None, 0, None, "f" * 20)
    assert resolve_anchor(stage_b4, other, 2.0, "diffusion") == other  # an explicit one wins
    assert resolve_anchor(base, None, 0.0, "diffusion") is None and resolve_anchor(base, None, 2.0, "ar") is None
    with pytest.raises(ValueError, match="reads no AR base"):
        resolve_anchor(base, base, 0.0, "diffusion")
    with pytest.raises(ValueError, match="must be an AR checkpoint"):
        resolve_anchor(base, stage_b4, 2.0, "diffusion")
    unrecorded = tmp_path / "B8"
    unrecorded.mkdir()
    (unrecorded / "bard.json").write_text(json.dumps({"block_size": 8, "fingerprint": "x"}))
    with pytest.raises(ValueError, match="records no anchor"):
        resolve_anchor(checkpoint_ref(unrecorded), None, 2.0, "diffusion")
    (unrecorded / "bard.json").write_text(json.dumps({"block_size": 8, "fingerprint": "x",
                                                      "anchor": str(tmp_path / "moved")}))
    with pytest.raises(ValueError, match="is gone"):
        resolve_anchor(checkpoint_ref(unrecorded), None, 2.0, "diffusion")


def test_anchor_targets_are_a_column_per_row_that_the_worker_attaches(data_ref, tiny_model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from bard_core import checkpoint
    from bard_core.inputs import encode_sample
    from tasks.base_targets import BaseTargets
    from tasks.train_worker import with_anchor_targets

    table = pq.read_table(sorted((Path(data_ref.uri) / "data").glob("*.parquet"))[0]).slice(0, 5)
    rows = table.to_pylist()
    empty = {**rows[0], "messages": rows[0]["messages"][:-1] + [{"role": "assistant", "content": [
        {"type": "text", "text": " "}]}]}  # encodes to nothing: a null, not a lost row
    table = pa.Table.from_pylist(rows + [empty], schema=table.schema)
    out = BaseTargets(str(tiny_model_dir), 512, top_k=16)(table)
    assert out.num_rows == 6 and out.column("anchor_ids")[5].as_py() is None
    model, processor, _ = checkpoint.load(tiny_model_dir)
    for row in out.slice(0, 5).to_pylist():
        sample = encode_sample(row, processor, 512)
        got = with_anchor_targets(sample, row)
        assert got.anchor_ids.shape == (sample.response_ids.numel(), 16)
        with torch.no_grad():  # the AR model's own next-token choice at the answer's first token
            first = model(input_ids=sample.prompt_ids[None], pixel_values=sample.pixel_values,
                          attention_mask=torch.ones(1, sample.prompt_ids.numel(), dtype=torch.long),
                          image_grid_thw=sample.image_grid_thw,
                          mm_token_type_ids=sample.prompt_mm_types[None]).logits[0, -1].argmax()
        assert int(got.anchor_ids[0, 0]) == int(first)
        with pytest.raises(RuntimeError, match="do not match"):
            with_anchor_targets(sample, {**row, "anchor_ids": row["anchor_ids"][:-1]})


def test_fsdp_sharding_matches_ddp_step_for_step(tiny_model_dir, tmp_path):
    """The same per-rank batches through DDP and through `bard_core.parallel.shard` (FSDP2) give the same losses and
    the same weights after 3 AdamW steps, whole or as two accumulated micro-batches; gathering the full state
    works (it is what checkpoints save) and reloads under weights_only."""
    import socket
    import subprocess
    import sys

    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(root / "tests/parallel_worker.py"), str(tiny_model_dir), str(tmp_path),
                    str(port)], check=True, cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)},
                   timeout=600)
    results = json.loads((tmp_path / "results.json").read_text())
    ddp, fsdp = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "fsdp.pt")
    assert ddp.keys() == fsdp.keys() and len(ddp) > 50
    assert results["ddp"]["losses"] == pytest.approx(results["fsdp"]["losses"], rel=1e-4)
    assert results["fsdp"]["optimizer_entries"] == results["ddp"]["optimizer_entries"] > 0
    assert results["fsdp"]["restored_equal"] and results["ddp"]["restored_equal"]  # load_optimizer_state round trip
    from bard_core import checkpoint

    init = checkpoint.load(tiny_model_dir)[0].state_dict()
    moved = max(float((ddp[k] - init[k]).abs().max()) for k in ddp)
    gap = max(float((ddp[k] - fsdp[k]).abs().max()) for k in ddp)
    assert moved > 1e-3  # the steps did change the weights (≈ lr per step under AdamW)
    assert gap < 1e-4, gap  # …identically under both strategies (no missing all-reduce / shard mix-up)
    for strategy, whole in (("ddp", ddp), ("fsdp", fsdp)):  # two accumulated micro-batches, synced once a step
        accum = torch.load(tmp_path / f"{strategy}-accum.pt")
        assert results[f"{strategy}-accum"]["losses"] == pytest.approx(results[strategy]["losses"], rel=1e-4)
        assert max(float((accum[k] - whole[k]).abs().max()) for k in whole) < 1e-4, strategy


def test_an_fsdp_stage_distills_checkpoints_and_resumes_after_a_worker_dies(stage_b4, data_ref, tmp_path):
    """The GPU recipes' strategy on CPU: FSDP2 over gloo, the teacher sharded too, a worker killed after
    step 9 → restart from a gathered checkpoint (optimizer state re-sharded)."""
    from transformers import AutoModelForImageTextToText

    from tasks.train import run_stage

    short = {**SHORT, "train.parallel": "fsdp", "train.merge_steps": "16", "train.distill_steps": "8",
             "train.base_pull": "50"}  # the pull's starting weights sharded like the student's
    crash = WorkerCrash(after_step=9, saved_under=tmp_path / "B8.ray")
    ref = run_stage(data_ref, stage_b4, tmp_path / "B8", "tiny", short, block_size=8, teacher=stage_b4, workers=2,
                    on_progress=crash)
    meta = _meta(ref)
    assert crash.killed and meta["parallel"] == "fsdp" and ref.step == 24 == meta["step"]
    assert len(meta["resumed_from"]) == 1 and meta["resumed_from"][0] in (8, 16)
    assert [h["step"] for h in meta["history"]] == list(range(1, 25))
    assert all(h["kd"] > 0 for h in meta["history"] if h["phase"] == "distill")
    assert all(h["anchor"] > 0 for h in meta["history"])  # the sharded AR anchor
    model = AutoModelForImageTextToText.from_pretrained(ref.uri)
    teacher = AutoModelForImageTextToText.from_pretrained(stage_b4.uri)
    changed = [n for (n, p), q in zip(model.named_parameters(), teacher.parameters()) if not torch_equal(p, q)]
    text = [n for n, _ in model.named_parameters() if ".visual." not in f".{n}"]
    # the full (gathered) weights were saved, not one rank's shard or the init; the frozen vision tower as it was
    assert set(changed) <= set(text) and len(changed) >= 0.9 * len(text), (len(changed), len(text))


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and torch.equal(a, b)


def test_a_small_dataset_is_read_once_and_shared_and_a_large_one_streams(data_ref, tiny_model_dir, tmp_path):
    """`training_dataset`: the chain's stages share one materialized copy of small data (same object,
    every row); other data replaces it; over `cache_mb` the data streams from its files."""
    import dataclasses

    from ray.data.dataset import MaterializedDataset

    from tasks.train import _DATASETS, training_dataset

    first = training_dataset(data_ref, 512)
    assert isinstance(first, MaterializedDataset) and first.count() == data_ref.num_rows
    assert training_dataset(data_ref, 512) is first
    other = dataclasses.replace(data_ref, fingerprint="another-curation")
    assert training_dataset(other, 512) is not first and len(_DATASETS) == 1
    streamed = training_dataset(data_ref, 0)  # the data is over a 0 MB budget
    assert not isinstance(streamed, MaterializedDataset) and streamed.count() == data_ref.num_rows
    from bard_core.recipes import get_recipe
    from tasks.train import checkpoint_ref

    train = get_recipe("tiny").train
    anchored = training_dataset(data_ref, 512, checkpoint_ref(tiny_model_dir), train, workers=1, max_tokens=512)
    assert isinstance(anchored, MaterializedDataset) and anchored.count() == data_ref.num_rows
    assert {"anchor_ids", "anchor_probs"} <= set(anchored.schema().names)  # computed once, for every stage
    assert training_dataset(data_ref, 512, checkpoint_ref(tiny_model_dir), train, workers=1, max_tokens=512) is anchored
    # the base's answers and the anchor's targets on them: one actor pool (two pools starved the read on 2 workers)
    both = training_dataset(data_ref, 512, checkpoint_ref(tiny_model_dir), dataclasses.replace(train, targets="base"),
                            workers=2, max_tokens=512)
    assert both is not anchored and both.count() == data_ref.num_rows
    assert {"target", "anchor_ids", "anchor_probs"} <= set(both.schema().names)
    from tasks.base_targets import BaseTargets

    counts = BaseTargets.counts(both)
    assert sum(counts.values()) == data_ref.num_rows and BaseTargets.counts(anchored) is None


def test_a_stages_progress_is_a_log_line_a_minute_with_its_rate_and_the_time_left():
    from tasks.train_progress import ProgressLog

    now, lines, percents = [100.0], [], []
    log = ProgressLog("B8", lines.append, percents.append, interval=60, clock=lambda: now[0])
    assert log.done() == "B8: nothing trained here (its checkpoint was finished: cached, or another run's)"
    lines.clear()
    for t, step in ((100, 201), (130, 260), (161, 323), (190, 380)):  # a stage resumed at step 200 of 1000
        now[0] = t
        log({"step": step, "total": 1000, "phase": "merge", "loss": 1.23456})
    assert percents == [20.1, 26.0, 32.3, 38.0]  # every value moves the artifact
    # the first value, then one 61 s later: (323 − 201) / 61 = 2.0 steps/s, (1000 − 323) / 2 s ≈ 6 min left
    assert lines == ["B8: step 201/1000 (merge), loss 1.235",
                     "B8: step 323/1000 (merge), loss 1.235, 2.00 steps/s, about 6 min left"]
    now[0] = 400.0
    assert log.done() == "B8: trained steps 201–380 of 1000 in 5 min"
