"""The block-diffusion objective on a real (tiny) Qwen3-VL: losses, distillation, the AR anchor, optimisation."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch

from bard_core.config import ModelConfig, TrainConfig
from bard_core.inputs import RejectedSample, conversation, encode_sample
from bard_core.layout import ar_batch, pack
from bard_core.losses import diffusion_ce, distill_kd
from bard_core.masks import attention_mask
from bard_core.shapes import world
from bard_core.train import Teacher, build_optimizer, packed_logits, train_step
from tests.objective_kit import sample


def test_ce_goes_to_zero_as_logits_become_one_hot():
    labels = torch.tensor([3, 1, 4, 1])
    sample_of = torch.tensor([0, 0, 1, 1])
    weights = torch.tensor([2.0, 1.0, 4.0, 1.5])
    previous = float("inf")
    for scale in (1.0, 5.0, 10.0, 20.0):
        logits = torch.nn.functional.one_hot(labels, 8).float() * scale
        value = diffusion_ce(logits, labels, weights, sample_of, [3, 5]).loss.item()
        assert value < previous
        previous = value
    assert previous < 1e-6


def test_ce_normalises_per_sample_by_real_length():
    logits = torch.zeros(3, 4)  # uniform: CE = log 4 per position
    result = diffusion_ce(logits, torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 1.0]), torch.tensor([0, 0, 1]),
                          [6, 2])
    ln4 = torch.log(torch.tensor(4.0)).item()
    assert result.per_sample.tolist() == pytest.approx([3 * ln4 / 6, ln4 / 2])
    assert result.loss.item() == pytest.approx((3 * ln4 / 6 + ln4 / 2) / 2)


def test_kd_gradient_vanishes_when_student_equals_teacher_with_full_vocab():
    teacher = torch.randn(5, 11)
    student = teacher.clone().requires_grad_(True)
    distill_kd(student, teacher, top_k=11).loss.backward()
    assert student.grad.abs().max() < 1e-6
    other = torch.randn(5, 11, requires_grad=True)
    distill_kd(other, teacher, top_k=11).loss.backward()
    assert other.grad.abs().max() > 1e-3


def test_kd_uses_only_the_teachers_top_k():
    teacher = torch.tensor([[5.0, 4.0, -10.0, -10.0]])
    student = torch.zeros(1, 4, requires_grad=True)
    distill_kd(student, teacher, top_k=2).loss.backward()
    q = torch.softmax(torch.tensor([5.0, 4.0]), 0)
    expected = torch.softmax(torch.zeros(4), 0) - torch.tensor([q[0], q[1], 0.0, 0.0])
    torch.testing.assert_close(student.grad[0], expected)


def test_distillation_step_leaves_the_teacher_untouched(kit):
    from bard_core.tiny import build_model

    processor, model, spec = kit
    student = build_model(ModelConfig(seed=1), processor.tokenizer)
    teacher_model = build_model(ModelConfig(seed=2), processor.tokenizer)
    before = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    cfg = TrainConfig(lr=1e-3, vision_lr_scale=1.0)
    batch = pack([sample(processor, 40), sample(processor, 41, "ocr")], student, 8, spec,
                 generator=torch.Generator().manual_seed(0))
    metrics = train_step(student, batch, build_optimizer(student, cfg), cfg, teacher=Teacher(teacher_model, 4))
    assert metrics["kd"] > 0 and metrics["loss"] == pytest.approx(metrics["ce"] + 0.5 * metrics["kd"], rel=1e-5)
    assert all(p.grad is None for p in teacher_model.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher_model.state_dict().items())
    assert not teacher_model.training


def test_ar_view_gives_an_ar_models_own_logits_at_each_blocks_first_token(kit):
    # the anchor's targets: at the positions ar_exact() marks (a block's first token, read from the prompt or
    # the previous clean block), the AR view must give exactly what a separate causal forward gives
    from bard_core.train import ar_logits

    processor, model, spec = kit
    samples = [sample(processor, 60, "extract"), sample(processor, 61, "mcq"), sample(processor, 62, "extract")]
    B = 4
    batch = pack(samples, model, B, spec, label_shift=True, generator=torch.Generator().manual_seed(3))
    exact = batch.ar_exact()
    P = torch.tensor(batch.prompt_lens)[batch.loss_sample]
    R = torch.tensor(batch.response_lens)[batch.loss_sample]
    r = torch.where(batch.loss_pos < P + R, batch.loss_pos - P + 1, batch.loss_pos - P - R + 1)  # label index
    assert torch.equal(exact, r % B == 0) and 0 < int(exact.sum()) < exact.numel()
    view = batch.ar_view(exact)
    assert view.input_ids.shape[1] == max(batch.prompt_lens[n] + batch.response_lens[n] for n in range(3))
    with torch.no_grad():
        ours = packed_logits(model, view)
        arb = ar_batch(samples, spec.pad_id)
        theirs = ar_logits(model, dataclasses.replace(arb, loss_sample=view.loss_sample, loss_pos=view.loss_pos))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="prompt or the clean copy"):
        batch.ar_view(~exact)  # noisy-copy positions have no AR context
    unshifted = pack(samples, model, B, spec, generator=torch.Generator().manual_seed(3))
    assert not unshifted.ar_exact().any()


@pytest.mark.parametrize("label_shift", [True, False])
def test_an_ar_teacher_reads_every_label_where_a_causal_forward_predicts_it(kit, label_shift):
    # teacher=ar (the released code's fixed teacher, an ablation variant): for every loss position, clean or
    # noisy, the AR teacher's logits are those of a separate causal forward over prompt ‖ x0 at P + r − 1
    from bard_core.train import ar_logits

    processor, model, spec = kit
    samples = [sample(processor, 80, "extract"), sample(processor, 81, "count"), sample(processor, 82, "mcq")]
    batch = pack(samples, model, 4, spec, label_shift=label_shift, keep_loss_weight=1.0,
                 generator=torch.Generator().manual_seed(5))
    r = batch.label_index(label_shift)
    x0 = [torch.cat([s.response_ids, torch.full((R - s.response_ids.numel(),), spec.eos_id)])
          for s, R in zip(samples, batch.response_lens)]
    assert torch.equal(batch.labels, torch.stack([x0[n][i] for n, i in zip(batch.loss_sample.tolist(), r.tolist())]))
    view = batch.ar_teacher_view(label_shift)
    P = torch.tensor(batch.prompt_lens)[batch.loss_sample]
    assert torch.equal(view.loss_pos, P + r - 1) and view.loss_pos.numel() == batch.loss_pos.numel()
    with torch.no_grad():
        ours = packed_logits(model, view)
        arb = ar_batch(samples, spec.pad_id)
        theirs = ar_logits(model, dataclasses.replace(arb, loss_sample=view.loss_sample, loss_pos=view.loss_pos))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_a_distill_step_with_an_ar_teacher_distils_its_causal_view(kit):
    from bard_core.tiny import build_model

    processor, model, spec = kit
    student = build_model(ModelConfig(seed=1), processor.tokenizer)
    base = build_model(ModelConfig(seed=2), processor.tokenizer)
    batch = pack([sample(processor, 90), sample(processor, 91, "count")], student, 8, spec, label_shift=True,
                 generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = distill_kd(packed_logits(student, batch), packed_logits(base, batch.ar_teacher_view(True))).loss
        wrong = distill_kd(packed_logits(student, batch), packed_logits(base, batch, batch.mask_for(8))).loss
    assert abs(expected.item() - wrong.item()) > 1e-3  # the causal view is not the block view
    cfg = TrainConfig(lr=1e-3, vision_lr_scale=1.0, label_shift=True)
    metrics = train_step(student, batch, build_optimizer(student, cfg), cfg, teacher=Teacher(base, None))
    assert metrics["kd"] == pytest.approx(expected.item(), rel=1e-5)


def test_anchor_step_distils_the_frozen_ar_base_at_ar_positions_only(kit):
    from bard_core.tiny import build_model

    processor, model, spec = kit
    student = build_model(ModelConfig(seed=1), processor.tokenizer)
    base = build_model(ModelConfig(seed=2), processor.tokenizer)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    batch = pack([sample(processor, 70), sample(processor, 71, "count")], student, 8, spec, label_shift=True,
                 generator=torch.Generator().manual_seed(0))
    exact = batch.ar_exact()
    with torch.no_grad():
        expected = distill_kd(packed_logits(student, batch)[exact], packed_logits(base, batch.ar_view(exact))).loss
    cfg = TrainConfig(lr=1e-3, vision_lr_scale=1.0, label_shift=True, anchor_weight=2.0)
    metrics = train_step(student, batch, build_optimizer(student, cfg), cfg, anchor=base)
    assert metrics["anchor"] == pytest.approx(expected.item(), rel=1e-5) and metrics["anchor"] > 0
    assert metrics["loss"] == pytest.approx(metrics["ce"] + 2.0 * metrics["anchor"], rel=1e-5)
    assert all(p.grad is None for p in base.parameters()) and not base.training
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    off = TrainConfig(lr=1e-3, vision_lr_scale=1.0, label_shift=True)  # anchor_weight 0: no anchor forward
    assert "anchor" not in train_step(student, batch, build_optimizer(student, off), off, anchor=base)


def test_precomputed_anchor_targets_give_the_live_anchors_loss(kit):
    # the Ray path computes the anchor's targets once per row (anchor_targets), the local path live from an
    # AR view of each batch: the same loss, whatever the batch's padding and the block size
    import copy

    from bard_core.tiny import build_model
    from bard_core.train import anchor_targets, compute_loss

    processor, model, spec = kit
    base = build_model(ModelConfig(seed=5), processor.tokenizer)
    samples = [sample(processor, 80, "extract"), sample(processor, 81, "mcq"), sample(processor, 82, "count")]
    targeted = anchor_targets(base, copy.deepcopy(samples), spec.pad_id, 16)
    assert all(t.anchor_ids.shape == (s.response_ids.numel(), 16) == t.anchor_probs.shape
               for s, t in zip(samples, targeted))
    assert all(torch.allclose(t.anchor_probs.sum(-1), torch.ones(len(t.anchor_probs))) for t in targeted)
    cfg = TrainConfig(label_shift=True, anchor_weight=1.0)
    for B, keep in ((4, 0.0), (8, 0.0), (8, 1.0)):  # kept block-first tokens are read from the clean copy too
        live = pack(samples, model, B, spec, label_shift=True, keep_loss_weight=keep,
                    generator=torch.Generator().manual_seed(B))
        pre = pack(targeted, model, B, spec, label_shift=True, keep_loss_weight=keep,
                   generator=torch.Generator().manual_seed(B))
        assert live.anchor_ids is None and pre.anchor_ids.shape[0] == int(pre.ar_exact().sum()) > 0
        with torch.no_grad():
            _, m_live = compute_loss(model, live, cfg, anchor=base)
            _, m_pre = compute_loss(model, pre, cfg)  # no anchor model needed
        assert m_pre["anchor"] == pytest.approx(m_live["anchor"], rel=1e-4)
    with pytest.raises(ValueError, match="lack the anchor targets"):
        pack([targeted[0], samples[1]], model, 4, spec, label_shift=True)


def test_an_lr_override_moves_the_vision_tower_and_distillation_with_it(kit):
    # the vision and distillation rates are multiples of train.lr: lowering train.lr must lower them too
    from bard_core.recipes import get_recipe

    _, model, _ = kit
    vision = {id(p) for n, p in model.named_parameters() if ".visual." in f".{n}"}
    for scale in (1.0, 0.1):
        overrides = {"train.lr": 2.5e-4, "train.vision_lr_scale": scale}
        cfg = get_recipe("tiny", overrides).train
        assert cfg.distill_lr == pytest.approx(2.5e-4 * 0.3)
        for lr in (cfg.lr, cfg.distill_lr):
            groups = build_optimizer(model, cfg, lr=lr).param_groups
            assert len(groups) == 2 and vision and {id(p) for p in groups[1]["params"]} == vision
            assert groups[0]["lr"] == pytest.approx(lr) and groups[1]["lr"] == pytest.approx(lr * scale)
    reference = TrainConfig()  # the reference's 2e-5 / 2e-6 / 6e-6
    assert build_optimizer(model, reference).param_groups[1]["lr"] == pytest.approx(2e-6)
    assert reference.distill_lr == pytest.approx(6e-6)


def test_a_zero_vision_rate_freezes_the_tower_no_gradient_no_change(kit):
    from bard_core.train import freeze_fixed

    processor, base, spec = kit
    model = copy.deepcopy(base)
    cfg = TrainConfig(lr=1e-3, vision_lr_scale=0.0)
    freeze_fixed(model, cfg)
    vision = {n: p.detach().clone() for n, p in model.named_parameters() if ".visual." in f".{n}"}
    text = {n: p.detach().clone() for n, p in model.named_parameters() if ".visual." not in f".{n}"}
    optimizer = build_optimizer(model, cfg)
    assert len(optimizer.param_groups) == 1 and vision
    batch = pack([sample(processor, 7), sample(processor, 8)], model, 4, spec)
    train_step(model, batch, optimizer, cfg)
    params = dict(model.named_parameters())
    assert all(params[n].grad is None and torch.equal(params[n], v) for n, v in vision.items())
    assert any(not torch.equal(params[n], v) for n, v in text.items())
    # a positive rate trains the tower again
    model = copy.deepcopy(base)
    freeze_fixed(model, TrainConfig(vision_lr_scale=0.1))
    assert all(p.requires_grad for p in model.parameters())


def test_teacher_sees_the_sequence_under_its_own_block_mask(kit):
    processor, model, spec = kit
    batch = pack([sample(processor, 42)], model, 8, spec)
    P, R = batch.prompt_lens[0], batch.response_lens[0]
    assert torch.equal(batch.mask_for(4)[0, 0], attention_mask(P, R, 4, total_len=batch.input_ids.shape[1]))
    bad = next(b for b in (3, 5, 7, 11, 13) if R % b)
    with pytest.raises(ValueError, match="multiple"):
        batch.mask_for(bad)


def test_ar_loss_matches_transformers_own_next_token_loss(kit):
    from bard_core.losses import ar_ce
    from bard_core.train import ar_logits

    processor, model, spec = kit
    samples = [sample(processor, 50, "colour"), sample(processor, 51, "extract")]
    batch = ar_batch(samples, spec.pad_id)
    labels = torch.full_like(batch.input_ids, -100)
    labels[batch.loss_sample, batch.loss_pos + 1] = batch.labels
    with torch.no_grad():
        ours = ar_ce(ar_logits(model, batch), batch.labels).loss
        theirs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                       mm_token_type_ids=batch.mm_token_type_ids, labels=labels).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-4)


def test_over_long_and_empty_samples_are_rejected_with_reasons(kit):
    processor, _, _ = kit
    with pytest.raises(RejectedSample) as info:
        sample(processor, 60, "extract", max_tokens=30)
    assert info.value.reason == "over_token_cap"
    with pytest.raises(RejectedSample) as info:
        encode_sample(conversation("What?", "  ", [world.render(world.random_scene(random.Random(0)))]),
                      processor, 512)
    assert info.value.reason == "empty_answer"
    bad = conversation("What?", "red", [])
    bad["messages"][0]["content"].insert(0, {"type": "image"})
    with pytest.raises(RejectedSample) as info:
        encode_sample(bad, processor, 512)
    assert info.value.reason == "image_count_mismatch"


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulated_micro_batches_give_the_whole_batchs_ce_gradient(kit):
    # the CE is a mean over samples, so two micro-batches of two samples, each loss halved, must give the
    # gradient of one batch of four (same samples, same noise)
    processor, model, spec = kit
    samples = [sample(processor, 60 + i, family) for i, family in enumerate(("extract", "ocr", "mcq", "count"))]
    cfg = TrainConfig(lr=1e-3, vision_lr_scale=1.0, grad_clip=1e9)  # gradients are compared: no clipping
    whole_model, split_model = copy.deepcopy(model), copy.deepcopy(model)
    whole = pack(samples, whole_model, 8, spec, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)  # the same draws, in the same order
    parts = [pack(samples[:2], split_model, 8, spec, generator=generator),
             pack(samples[2:], split_model, 8, spec, generator=generator)]
    assert torch.equal(torch.cat([p.labels for p in parts]), whole.labels)  # the same corruption
    one = train_step(whole_model, whole, build_optimizer(whole_model, cfg), cfg)
    two = train_step(split_model, parts, build_optimizer(split_model, cfg), cfg)
    assert two["ce"] == pytest.approx(one["ce"], rel=1e-5) and two["positions"] == one["positions"]
    g1, g2 = _grads(whole_model), _grads(split_model)
    assert g1.keys() == g2.keys() and len(g1) > 10
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6)


def test_activation_checkpointing_changes_memory_not_gradients(kit):
    from bard_core.train import enable_activation_checkpointing

    processor, model, spec = kit
    cfg = TrainConfig(lr=1e-3, vision_lr_scale=1.0, grad_clip=1e9)
    plain, recomputed = copy.deepcopy(model), copy.deepcopy(model)
    enable_activation_checkpointing(recomputed)
    assert recomputed.model.language_model.gradient_checkpointing
    batch = pack([sample(processor, 70), sample(processor, 71, "yesno")], plain, 8, spec,
                 generator=torch.Generator().manual_seed(5))
    a = train_step(plain, batch, build_optimizer(plain, cfg), cfg)
    b = train_step(recomputed, batch, build_optimizer(recomputed, cfg), cfg)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    ga, gb = _grads(plain), _grads(recomputed)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-6)


def test_base_pull_moves_each_weight_back_towards_the_start_by_its_groups_rate(kit):
    # after Adam's step, θ ← θ − lr_group · base_pull · (θ − θ_start): the same step without the pull, then the
    # pull by hand, must give the same weights; the vision tower's group is pulled at its own (lower) rate
    from bard_core.train import BasePull

    processor, model, spec = kit
    cfg = TrainConfig(lr=1e-2, vision_lr_scale=0.1, base_pull=40.0)
    batch = pack([sample(processor, 80, "extract"), sample(processor, 81)], model, 8, spec,
                 generator=torch.Generator().manual_seed(0))
    start = copy.deepcopy(model)
    for p in start.parameters():
        p.data += 0.01 * torch.randn_like(p)  # a start away from the current weights, so the pull is not 0
    pulled, plain = copy.deepcopy(model), copy.deepcopy(model)
    pull = BasePull(pulled, cfg.base_pull, dict(start.named_parameters()))
    train_step(pulled, batch, build_optimizer(pulled, cfg), cfg, pull=pull)
    train_step(plain, batch, build_optimizer(plain, cfg), cfg)
    starts = dict(start.named_parameters())
    for (name, a), b in zip(pulled.named_parameters(), plain.parameters()):
        rate = cfg.lr * (cfg.vision_lr_scale if ".visual." in f".{name}" else 1.0) * cfg.base_pull
        torch.testing.assert_close(a, b - rate * (b - starts[name]), rtol=1e-5, atol=1e-7, msg=name)
    assert max((a - b).abs().max().item() for a, b in zip(pulled.parameters(), plain.parameters())) > 1e-5
    with pytest.raises(ValueError, match="no starting weights"):
        BasePull(pulled, 1.0, {})
    with pytest.raises(ValueError, match="base_pull"):
        TrainConfig(lr=1e-3, base_pull=1000.0)  # lr × pull ≥ 1 would carry a weight past its start
    with pytest.raises(ValueError, match="base_pull"):
        TrainConfig(base_pull=-1.0)
