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


def test_distillation_step_on_cuda(kit):
    """The distill phase on a GPU: the teacher's view (`mask_for` its block size) is built on the batch's
    device, the KD term is finite and the teacher does not change."""
    import copy

    from bard_core.config import TrainConfig
    from bard_core.layout import pack
    from bard_core.train import Teacher, build_optimizer, to_device, train_step

    processor, model, spec = kit
    student = copy.deepcopy(model).to("cuda")
    teacher_model = copy.deepcopy(model).to("cuda").requires_grad_(False)
    before = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    batch = to_device(pack(_samples(processor, 4), model, 8, spec, label_shift=True,
                           generator=torch.Generator().manual_seed(2)), "cuda")
    assert batch.mask_for(4).device == batch.input_ids.device
    cfg = TrainConfig(lr=1e-3, vision_lr_scale=1.0, label_shift=True)
    metrics = train_step(student, batch, build_optimizer(student, cfg), cfg, teacher=Teacher(teacher_model, 4))
    assert metrics["kd"] > 0 and torch.isfinite(torch.tensor([metrics["kd"], metrics["loss"]])).all()
    assert all(torch.equal(before[k], v) for k, v in teacher_model.state_dict().items())


def test_fsdp_mixed_precision_step_on_cuda(kit):
    """The 4B/8B recipes' strategy on a GPU (one rank, NCCL): FSDP2 with fp32 masters is step-for-step
    the plain fp32 model; with bf16 compute the losses stay close and finite; the gathered checkpoint
    state is complete and on the CPU; a fresh optimizer takes the gathered state back."""
    import os
    import socket

    import torch.distributed as dist

    from bard_core.config import ModelConfig, TrainConfig
    from bard_core.layout import pack
    from bard_core.parallel import full_state, load_optimizer_state, shard
    from bard_core.tiny import build_model
    from bard_core.train import LogitsAtLossPositions, build_optimizer, to_device, train_step

    processor, model, spec = kit
    init = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    batch = to_device(pack(_samples(processor, 4), model, 8, spec, label_shift=True,
                           generator=torch.Generator().manual_seed(0)), "cuda")
    batches = [batch] * 3  # the same batch: the loss must fall step after step
    cfg = TrainConfig(lr=1e-3, vision_lr_scale=1.0, label_shift=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    losses = {}
    try:
        for name, dtype in (("plain", None), ("fsdp32", torch.float32), ("fsdp16", torch.bfloat16)):
            fresh_model = build_model(ModelConfig(), processor.tokenizer)
            fresh_model.load_state_dict(init)
            runner = LogitsAtLossPositions(fresh_model.to("cuda"))
            if dtype is not None:
                runner = shard(runner, dtype)
            optimizer = build_optimizer(runner, cfg)
            losses[name] = [train_step(runner, b, optimizer, cfg)["loss"] for b in batches]
            if name == "fsdp16":
                state, optim = full_state(fresh_model, runner, optimizer, True)
                assert set(state) == set(init) and all(t.device.type == "cpu" for t in state.values())
                assert all(torch.isfinite(t).all() for t in state.values())
                moved = max(float((state[k].float() - init[k].float()).abs().max()) for k in init)
                assert moved > 1e-4  # the gathered weights are the trained ones, not the initial
                restored = build_optimizer(runner, cfg)
                load_optimizer_state(runner, restored, optim, True)
                assert len(restored.state) == len(optim["state"]) > 50
                assert all(int(s["step"]) == len(batches) for s in restored.state.values())
    finally:
        dist.destroy_process_group()
    assert losses["fsdp32"] == pytest.approx(losses["plain"], rel=1e-4)
    assert losses["plain"][2] < losses["plain"][1] < losses["plain"][0]  # the steps trained
    assert losses["fsdp16"] == pytest.approx(losses["plain"], rel=3e-2)


@pytest.mark.parametrize("fallback", ["leftmost", "confident"])
def test_generate_on_cuda_equals_cpu(fallback):
    """Block-diffusion decoding (cache, fallback, correction, fused commit) and the AR baseline give the
    same tokens and forward counts on CUDA as on the CPU, with the shipped base in fp32."""
    from bard_core import checkpoint
    from bard_core.assets import shipped_base
    from bard_core.config import DecodeConfig
    from bard_core.decode import ar_generate_cached, generate
    from bard_core.inputs import encode_sample
    from bard_core.shapes.data import conversations

    model, processor, meta = checkpoint.load(shipped_base())
    ids = checkpoint.token_ids(processor.tokenizer, meta)
    prompts = []
    for s in conversations(6, seed=5, families=["extract", "count", "mcq"]):
        enc = encode_sample(s, processor, 512)
        enc.response_ids = enc.response_ids[:0]
        prompts.append(enc)
    cfg = DecodeConfig(block_size=8, threshold=0.9, max_new_tokens=32, batch_size=6, label_shift=True,
                       fallback=fallback)
    cpu = generate(model, prompts, cfg, ids)
    cpu_ar = ar_generate_cached(model, prompts, 32, ids)
    model.cuda()
    gpu = generate(model, prompts, cfg, ids)
    gpu_ar = ar_generate_cached(model, prompts, 32, ids)
    assert [g.token_ids for g in gpu] == [g.token_ids for g in cpu]
    assert [(g.nfe, g.edits) for g in gpu] == [(g.nfe, g.edits) for g in cpu]
    assert [g.token_ids for g in gpu_ar] == [g.token_ids for g in cpu_ar]
    assert any(len(g.token_ids) > 8 for g in cpu)  # more than one block was decoded


def test_cuda_graphs_replay_the_decoders_forwards(monkeypatch):
    """On CUDA the decoders use the static cache and replay captured graphs (bard_core/static_kv.py): AR and block
    decoding give the tokens of the dynamic cache's eager forwards, and shapes that recur are captured once."""
    from bard_core import checkpoint, static_kv
    from bard_core.assets import shipped_base
    from bard_core.config import DecodeConfig
    from bard_core.decode import ar_generate_cached, generate
    from bard_core.inputs import encode_sample
    from bard_core.shapes.data import conversations

    captured = []

    class Counted(static_kv._Graph):
        def __init__(self, lm, cache, n, q, *rest):
            captured.append((n, q))
            super().__init__(lm, cache, n, q, *rest)

    monkeypatch.setattr(static_kv, "_Graph", Counted)
    model, processor, meta = checkpoint.load(shipped_base())
    model.cuda()
    ids = checkpoint.token_ids(processor.tokenizer, meta)
    prompts = []
    for s in conversations(4, seed=7, families=["extract", "count"]):
        enc = encode_sample(s, processor, 512)
        enc.response_ids = enc.response_ids[:0]
        prompts.append(enc)
    for batch in (prompts[:1], prompts):
        eager = ar_generate_cached(model, batch, 48, ids, static=False)
        captured.clear()
        graphed = ar_generate_cached(model, batch, 48, ids)
        assert [g.token_ids for g in graphed] == [g.token_ids for g in eager]
        assert (1, 1) in captured and len(captured) == len(set(captured))  # one graph per shape and batch
        cfg = DecodeConfig(block_size=8, threshold=0.9, max_new_tokens=48, batch_size=4, label_shift=True)
        eager = generate(model, batch, cfg, ids, static=False)
        captured.clear()
        graphed = generate(model, batch, cfg, ids)
        assert [(g.token_ids, g.nfe) for g in graphed] == [(g.token_ids, g.nfe) for g in eager]
        assert captured and all(q in (8, 16) for _, q in captured)
