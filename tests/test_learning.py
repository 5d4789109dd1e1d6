"""The objective trains: a few hundred CPU steps from a tiny AR checkpoint lower the diffusion loss."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_diffusion_steps_lower_the_held_out_loss():
    """From the shipped (pretrained) tiny AR base, as the method starts."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from bard_core.assets import shipped_base
    from bard_core.config import TrainConfig
    from bard_core.inputs import encode_sample
    from bard_core.layout import noise_spec_for, pack
    from bard_core.shapes.data import conversations
    from bard_core.train import build_optimizer, compute_loss, train_step

    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(shipped_base())
    model = AutoModelForImageTextToText.from_pretrained(shipped_base())
    pool = [encode_sample(s, processor, 512) for s in conversations(384, seed=1)]
    held_out = [encode_sample(s, processor, 512) for s in conversations(32, seed=2)]
    spec = noise_spec_for(processor.tokenizer, "mixed", 0.05)
    cfg = TrainConfig(lr=2e-3, vision_lr_scale=1.0, batch_size=16)
    optimizer = build_optimizer(model, cfg)

    def held_out_loss() -> float:
        model.eval()
        batch = pack(held_out, model, 8, spec, generator=torch.Generator().manual_seed(0))  # fixed noise
        with torch.no_grad():
            return compute_loss(model, batch, cfg)[0].item()

    before = held_out_loss()
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    for _ in range(200):
        metrics = train_step(model, pack(rng.sample(pool, 16), model, 8, spec, generator=generator), optimizer, cfg)
        assert torch.isfinite(torch.tensor(metrics["loss"]))
    after = held_out_loss()
    assert after < 0.4 * before, (before, after)


def test_layout_memory_benchmark_prints_a_table_and_a_json_line():
    out = subprocess.run([sys.executable, "benchmarks/layout_memory.py", "--configs", "120:32", "--image-tokens", "16",
                          "--reps", "1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert any(line.split()[:2] == ["120", "32"] for line in lines)
    result = json.loads(lines[-1])
    for key in ("packed_peak_mb", "vanilla_peak_mb", "ratio", "token_ratio"):
        assert key in result
    assert result["packed_peak_mb"] < result["vanilla_peak_mb"]
    assert result["loss_delta"] < 1e-4  # same loss in both layouts


def test_progressive_local_chains_stages_with_their_own_steps_and_reuses_finished_ones(tiny_model_dir, tmp_path):
    import dataclasses

    from bard_core import checkpoint, stages
    from bard_core.config import NoiseConfig
    from bard_core.inputs import encode_sample
    from bard_core.recipes import get_recipe
    from bard_core.shapes.data import conversations

    _, processor, _ = checkpoint.load(tiny_model_dir)
    pool = [encode_sample(s, processor, 512) for s in conversations(8, seed=3)]
    cfg = dataclasses.replace(get_recipe("tiny").train, block_sizes=(4, 8), batch_size=4, warmup_steps=1)
    lines: list[str] = []
    results = stages.progressive_local(tiny_model_dir, pool, tmp_path, cfg, NoiseConfig(), steps=[(3, 0), (2, 2)],
                                       log=lines.append)
    b4, b8 = (json.loads((r.path / "bard.json").read_text()) for r in results)
    assert b4["steps"] == {"merge": 3, "distill": 0} and b4["teacher"] is None
    assert b8["steps"] == {"merge": 2, "distill": 2} and b8["parent"] == b8["teacher"] == str(results[0].path)
    assert b8["label_shift"] is True and "kd" in b8["metrics"]["distill"]
    # the tiny recipe's AR anchor: the base's targets, computed once, in every phase; the caller's pool untouched
    assert b4["anchor"] == b8["anchor"] == str(tiny_model_dir) and cfg.anchor_weight > 0
    assert "anchor" in b4["metrics"]["merge"] and "anchor" in b8["metrics"]["distill"]
    assert all(s.anchor_ids is None for s in pool)
    stamp = (results[1].path / "model.safetensors").stat().st_mtime_ns
    lines.clear()
    again = stages.progressive_local(tiny_model_dir, pool, tmp_path, cfg, NoiseConfig(), steps=[(3, 0), (2, 2)],
                                     log=lines.append)
    assert [r.path for r in again] == [r.path for r in results] and all("cached" in line for line in lines)
    assert (results[1].path / "model.safetensors").stat().st_mtime_ns == stamp
    base = tmp_path / "base"  # a base retrained in place is a new parent: the chain is retrained
    shutil.copytree(tiny_model_dir, base)
    first = stages.progressive_local(base, pool, tmp_path / "chain", cfg, NoiseConfig(), steps=[(1, 0), (1, 0)])
    model, _, _ = checkpoint.load(base)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)
    model.save_pretrained(base)
    lines.clear()
    second = stages.progressive_local(base, pool, tmp_path / "chain", cfg, NoiseConfig(), steps=[(1, 0), (1, 0)],
                                      log=lines.append)
    assert not any("cached" in line for line in lines) and [r.path for r in second] == [r.path for r in first]
    with pytest.raises(ValueError, match="2 block sizes"):
        stages.progressive_local(tiny_model_dir, pool, tmp_path, cfg, NoiseConfig(), steps=[(3, 0)])
