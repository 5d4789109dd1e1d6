"""CUDA path of the objective (runs on the device machine; skipped on machines without a GPU)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (device machine)")]


@pytest.fixture(scope="module")
def kit():
    from bard_core.config import ModelConfig
    from bard_core.layout import noise_spec_for
    from bard_core.tiny import build_model, build_processor

    cfg = ModelConfig()
    processor = build_processor(cfg)
    return processor, build_model(cfg, processor.tokenizer), noise_spec_for(processor.tokenizer, "mixed", 0.05)


def _samples(processor, n: int):
    from bard_core.inputs import encode_sample
    from bard_core.shapes.data import conversations

    return [encode_sample(s, processor, 512) for s in conversations(n, seed=3, families=["extract", "colour", "mcq"])]


def test_packed_logits_on_cuda_equal_cpu(kit):
    from bard_core.layout import pack
    from bard_core.train import packed_logits, to_device

    processor, model, spec = kit
    batch = pack(_samples(processor, 3), model, 8, spec, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu = packed_logits(model, batch)
        gpu = packed_logits(model.cuda(), to_device(batch, "cuda")).cpu()
    model.cpu()
    torch.testing.assert_close(gpu, cpu, atol=2e-4, rtol=2e-4)


def test_bf16_padded_batch_has_finite_gradients(kit):
    """Padding rows attend to themselves: a fully masked row gives NaN gradients in bf16 SDPA on CUDA."""
    from bard_core.config import ModelConfig, TrainConfig
    from bard_core.layout import pack
    from bard_core.tiny import build_model
    from bard_core.train import build_optimizer, to_device, train_step

    processor, _, spec = kit
    model = build_model(ModelConfig(dtype="bfloat16"), processor.tokenizer).cuda()
    batch = pack(_samples(processor, 6), model, 16, spec, generator=torch.Generator().manual_seed(1))
    lengths = {p + 2 * r for p, r in zip(batch.prompt_lens, batch.response_lens)}
    assert len(lengths) > 1  # really padded
    cfg = TrainConfig(lr=1e-3, vision_lr_scale=1.0)
    metrics = train_step(model, to_device(batch, "cuda"), build_optimizer(model, cfg), cfg)
    assert torch.isfinite(torch.tensor(metrics["loss"])) and torch.isfinite(torch.tensor(metrics["grad_norm"]))
    assert all(torch.isfinite(p).all() for p in model.parameters())
