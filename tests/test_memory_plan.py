"""`bard train --dry-run`'s memory plan: exact sizes from safetensors headers, the per-GPU estimate of each
parallel layout, and plans that cannot fit refused with their numbers."""

from __future__ import annotations

import json
import struct

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bard_core.memory_plan import GIB, ModelShape, read_shape, refusal, stage_memory
from tests.test_cli import run


def header_only_checkpoint(out):
    """A checkpoint directory whose safetensors header lists every tensor of the Qwen3-VL-4B shape the GPU
    benchmarks use (`benchmarks.layout_memory.build_model`, real layer types, built on the meta device),
    without the weights: what the plan reads, at full scale. Returns (directory, parameter count)."""
    from benchmarks.layout_memory import build_model

    model, config = build_model("4b", "meta")
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, p in model.named_parameters():  # tied weights once, as save_pretrained writes them
        size = p.numel() * 2
        header[name] = {"dtype": "BF16", "shape": list(p.shape), "data_offsets": [offset, offset + size]}
        offset += size
    out.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(header).encode()
    (out / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    config.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def test_sizes_are_read_exactly_from_the_safetensors_headers(tiny_model_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    shape = read_shape(tiny_model_dir)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.vision_params == sum(p.numel() for n, p in model.named_parameters() if "visual" in n) > 0
    layer = sum(p.numel() for p in model.model.language_model.layers[0].parameters())
    assert shape.largest_block == max(layer, sum(p.numel() for p in model.model.visual.blocks[0].parameters()))
    text = model.config.text_config
    assert (shape.hidden, shape.layers, shape.vocab) == (text.hidden_size, text.num_hidden_layers, text.vocab_size)
    big, params = header_only_checkpoint(tmp_path / "4b")
    assert read_shape(big).params == params and 4.4e9 < params < 5e9
    assert read_shape(tmp_path) is None  # no weights: size unknown, not guessed
    (tmp_path / "broken.safetensors").write_bytes(b"\x01")
    with pytest.raises(ValueError, match="broken.safetensors: not a safetensors file"):
        read_shape(tmp_path)


SHAPE = ModelShape(params=4_000_000_000, vision_params=400_000_000, largest_block=100_000_000, hidden=2560,
                   layers=36, vocab=151_936)


def test_ddp_holds_everything_per_gpu_and_fsdp_shards_the_states():
    common = dict(dtype="bfloat16", use_gpu=True, batch_size=64, row_tokens=2048, vision_frozen=False, teacher=False)
    ddp = stage_memory(SHAPE, parallel="ddp", workers=8, **common)
    assert ddp["weights_gib"] == round(2 * 4e9 / GIB, 2) and ddp["optimizer_gib"] == round(4 * 4e9 / GIB, 2)
    fsdp8, fsdp64 = (stage_memory(SHAPE, parallel="fsdp", workers=n, **common) for n in (8, 64))
    assert fsdp8["optimizer_gib"] == round(8 * 4e9 / 8 / GIB, 2) and fsdp64["grads_gib"] < fsdp8["grads_gib"] / 7
    assert fsdp64["per_worker_batch"] == 1 and fsdp8["activations_gib"] == pytest.approx(
        8 * fsdp64["activations_gib"], rel=1e-3)
    frozen = stage_memory(SHAPE, parallel="ddp", workers=8, **{**common, "vision_frozen": True})
    assert frozen["trainable_params"] == 3_600_000_000 and frozen["grads_gib"] < ddp["grads_gib"]
    taught = stage_memory(SHAPE, parallel="ddp", workers=8, **{**common, "teacher": True})
    assert taught["total_gib"] == pytest.approx(ddp["total_gib"] + 2 * 4e9 / GIB, abs=0.02)
    pulled = stage_memory(SHAPE, parallel="ddp", workers=8, **{**common, "vision_frozen": True}, pull=True)
    assert pulled["pull_gib"] == round(2 * 3.6e9 / GIB, 2) and ddp["pull_gib"] == 0  # the trained weights' start
    assert pulled["total_gib"] == pytest.approx(frozen["total_gib"] + 2 * 3.6e9 / GIB, abs=0.02)
    sharded = stage_memory(SHAPE, parallel="fsdp", workers=8, **common, pull=True)
    assert sharded["pull_gib"] == round(4 * 4e9 / 8 / GIB, 2)  # fp32 shards, like the master weights
    accumulated = stage_memory(SHAPE, parallel="fsdp", workers=8, **common, micro_batches=8)
    assert accumulated["micro_batch"] == 1 and accumulated["activations_gib"] == fsdp64["activations_gib"]
    recomputed = stage_memory(SHAPE, parallel="fsdp", workers=64, **common, recompute=True)
    # each block keeps its input (2 bytes a hidden unit) instead of 34 bytes: 1/17 of it, plus one block's
    assert recomputed["activations_gib"] == pytest.approx(fsdp64["activations_gib"] * (1 / 17 + 1 / 36), rel=1e-2)
    assert refusal(fsdp64, 80) is None
    reason = refusal(ddp, 80)  # 8 rows of 2048 tokens and a whole bf16 replica with its moments
    assert "per GPU" in reason and "activations" in reason and "72.0" in reason


def _data(tmp_path, longest: int):
    data = tmp_path / "data"
    (data / "data").mkdir(parents=True)
    (data / "manifest.json").write_text("{}")
    pq.write_table(pa.table({"num_tokens": [100, longest, 300]}), data / "data" / "part-0.parquet")
    return data


def test_recipes_dry_run_plans_on_1_8_and_64_gpus(tmp_path):
    model, _ = header_only_checkpoint(tmp_path / "4b")
    data = _data(tmp_path, 1024)

    def plan(workers: int, *settings: str):
        sets = [x for kv in settings for x in ("--set", kv)]
        out = run("train", "--recipe", "qwen3-vl-4b", "--data", str(data), "--init", str(model), "--out",
                  str(tmp_path / "o"), "--block-size", "8", "--workers", str(workers), *sets, "--dry-run", "--json")
        if out.returncode == 0:
            return json.loads(out.stdout)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        return out.stderr

    # the recipe: 256 rows of up to 2048 packed tokens, 8 micro-batches per step, blocks recomputed
    one, eight, many = plan(1), plan(8), plan(64)
    assert "GiB per GPU" in one and "32 rows of 2048 tokens at a time" in one  # 1 GPU: too much even so
    assert eight["attn_implementation"] == "sdpa" and eight["parallel"] == "fsdp" and eight["workers"] == 8
    memory = eight["memory"]
    assert memory["row_tokens"] == 2 * 1024 and memory["micro_batch"] == 4 and memory["total_gib"] <= 72
    assert "does not split into 8 equal micro-batches" in many  # 4 rows per GPU
    plain = plan(64, "train.grad_accum_steps=1")
    assert plain["memory"]["micro_batch"] == 4 and plain["memory"]["total_gib"] <= 72
    # without accumulation and recomputation, 8 GPUs hold 32 rows' activations each
    bare = plan(8, "train.grad_accum_steps=1", "train.activation_checkpointing=false")
    assert "32 rows of 2048 tokens at a time" in bare and "train.grad_accum_steps" in bare
    assert float(bare.split("~")[1].split(" ")[0]) > 100
    bigger = run("train", "--recipe", "qwen3-vl-4b", "--data", str(data), "--init", str(model), "--out",
                 str(tmp_path / "o"), "--block-size", "8", "--workers", "8", "--set", "train.grad_accum_steps=1",
                 "--set", "train.activation_checkpointing=false", "--gpu-memory", "1000", "--dry-run")
    assert bigger.returncode == 0, bigger.stderr  # the same plan fits a (hypothetical) 1000 GiB GPU
    assert not (tmp_path / "o").exists()
