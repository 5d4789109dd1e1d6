"""The objective trains: a few hundred CPU steps from a tiny AR checkpoint lower the diffusion loss."""

from __future__ import annotations

import json
import random
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
    out = subprocess.run([sys.executable, "-m", "benchmarks.layout_memory", "--configs", "120:32", "--image-tokens", "16",
                          "--reps", "1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert any(line.split()[:2] == ["120", "32"] for line in lines)
    result = json.loads(lines[-1])
    for key in ("packed_peak_mb", "vanilla_peak_mb", "ratio", "token_ratio"):
        assert key in result
    assert result["packed_peak_mb"] < result["vanilla_peak_mb"]
    assert result["loss_delta"] < 1e-4  # same loss in both layouts
