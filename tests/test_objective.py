"""The block-diffusion objective on a real (tiny) Qwen3-VL: exactness, no peeking, batching, losses."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch

from bard_core.config import ModelConfig, TrainConfig
from bard_core.inputs import RejectedSample, conversation, encode_sample
from bard_core.layout import ar_batch, noise_spec_for, pack, padded_response, rope_positions
from bard_core.losses import diffusion_ce, distill_kd
from bard_core.masks import attention_mask
from bard_core.shapes import world
from bard_core.train import Teacher, build_optimizer, packed_logits, train_step


@pytest.fixture(scope="module")
def kit():
    from bard_core.tiny import build_model, build_processor

    cfg = ModelConfig()
    processor = build_processor(cfg)
    model = build_model(cfg, processor.tokenizer)
    spec = noise_spec_for(processor.tokenizer, "mixed", 0.05)
    return processor, model, spec


def sample(processor, seed: int, family: str = "extract", images: int = 1, max_tokens: int = 512):
    rng = random.Random(seed)
    scene = world.random_scene(rng)
    _, question, answer = world.ask(scene, rng, family)
    pictures = [world.render(scene)] + [world.render(world.random_scene(rng)) for _ in range(images - 1)]
    return encode_sample(conversation(question, answer, pictures[:images]), processor, max_tokens)


def full_logits(model, batch, row: int = 0) -> torch.Tensor:
    with torch.no_grad():
        out = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids, pixel_values=batch.pixel_values,
                          image_grid_thw=batch.image_grid_thw, mm_token_type_ids=batch.mm_token_type_ids)
        return model.lm_head(out.last_hidden_state)[row]


def separate_block_logits(model, enc, x0, xt, b: int, B: int, prompt_mask: str) -> torch.Tensor:
    """A separate forward over [prompt ‖ clean blocks < b ‖ noisy block b] under the inference mask."""
    P = enc.prompt_ids.numel()
    ids = torch.cat([enc.prompt_ids, x0[: b * B], xt[b * B:(b + 1) * B]])
    types = torch.cat([enc.prompt_mm_types, torch.zeros((b + 1) * B, dtype=torch.long)])
    pos = rope_positions(model, ids, types, enc.image_grid_thw)
    mask = attention_mask(P, (b + 1) * B, B, prompt_mask, with_noisy=False)[None, None]
    with torch.no_grad():
        out = model.model(input_ids=ids[None], attention_mask=mask, position_ids=pos[:, None],
                          pixel_values=enc.pixel_values, image_grid_thw=enc.image_grid_thw,
                          mm_token_type_ids=types[None])
        return model.lm_head(out.last_hidden_state)[0, P + b * B:]


@pytest.mark.parametrize("prompt_mask", ["causal", "block"])
@pytest.mark.parametrize("B", [4, 8, 16])
def test_noisy_block_logits_equal_a_separate_block_causal_forward(kit, B, prompt_mask):
    processor, model, spec = kit
    enc = sample(processor, seed=B)
    assert enc.pixel_values is not None  # an image in the prompt
    batch = pack([enc], model, B, spec, prompt_mask=prompt_mask, generator=torch.Generator().manual_seed(B))
    logits = full_logits(model, batch)
    P, R = batch.prompt_lens[0], batch.response_lens[0]
    x0 = padded_response(enc, B, spec.eos_id)
    xt = batch.input_ids[0, P + R: P + 2 * R]
    assert (xt != x0).any()
    for b in range(R // B):
        alone = separate_block_logits(model, enc, x0, xt, b, B, prompt_mask)
        packed = logits[P + R + b * B: P + R + (b + 1) * B]
        torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_noisy_copy_reuses_clean_positions_and_positions_are_3d(kit):
    processor, model, spec = kit
    enc = sample(processor, 1)
    batch = pack([enc], model, 8, spec)
    P, R = batch.prompt_lens[0], batch.response_lens[0]
    assert batch.position_ids.shape == (3, 1, batch.input_ids.shape[1])
    assert torch.equal(batch.position_ids[:, 0, P:P + R], batch.position_ids[:, 0, P + R:P + 2 * R])
    # image tokens get 2-D positions: the three M-RoPE rows differ inside the image span
    image = batch.mm_token_type_ids[0] == 1
    assert not torch.equal(batch.position_ids[1, 0, image], batch.position_ids[2, 0, image])


def test_no_peeking(kit):
    """Noisy block b depends on the prompt, clean blocks < b and itself only."""
    processor, model, spec = kit
    B = 8
    enc = sample(processor, 2)
    batch = pack([enc], model, B, spec, generator=torch.Generator().manual_seed(0))
    P, R = batch.prompt_lens[0], batch.response_lens[0]
    assert R // B >= 3
    b = 1
    block = slice(P + R + b * B, P + R + (b + 1) * B)
    reference = full_logits(model, batch)[block]
    vocab = torch.arange(20, 60)

    def perturbed(positions) -> torch.Tensor:
        changed = pack([enc], model, B, spec, generator=torch.Generator().manual_seed(0))
        changed.input_ids[0, positions] = vocab[torch.randint(0, len(vocab), (len(positions),))]
        return full_logits(model, changed)[block]

    own_clean = list(range(P + b * B, P + (b + 1) * B))
    later_clean = list(range(P + (b + 1) * B, P + R))
    other_noisy = [p for p in range(P + R, P + 2 * R) if not block.start <= p < block.stop]
    for positions in (own_clean, later_clean, other_noisy):
        torch.testing.assert_close(perturbed(positions), reference, atol=1e-6, rtol=0)
    earlier_clean = list(range(P, P + b * B))  # the test can fail: earlier blocks do matter
    assert (perturbed(earlier_clean) - reference).abs().max() > 1e-3


def test_batch_of_three_padded_samples_equals_each_alone(kit):
    processor, model, spec = kit
    samples = [sample(processor, 10, "extract"), sample(processor, 11, "colour"),
               sample(processor, 12, "count", images=2)]
    g = torch.Generator().manual_seed(5)
    batch = pack(samples, model, 4, spec, generator=g)
    lengths = [p + 2 * r for p, r in zip(batch.prompt_lens, batch.response_lens)]
    assert len(set(lengths)) == 3  # really padded
    with torch.no_grad():
        together = packed_logits(model, batch)
    g = torch.Generator().manual_seed(5)
    singles = [pack([s], model, 4, spec, generator=g) for s in samples]
    for n, single in enumerate(singles):
        with torch.no_grad():
            alone = packed_logits(model, single)
        rows = batch.loss_sample == n
        assert torch.equal(batch.labels[rows], single.labels)
        torch.testing.assert_close(together[rows], alone, atol=1e-5, rtol=1e-5)


def test_packed_and_vanilla_layouts_give_the_same_loss(kit):
    processor, model, spec = kit
    samples = [sample(processor, 20), sample(processor, 21, "mcq", images=2)]
    packed = pack(samples, model, 8, spec, generator=torch.Generator().manual_seed(1))
    vanilla = pack(samples, model, 8, spec, generator=torch.Generator().manual_seed(1), duplicate_prompt=True)
    assert vanilla.input_ids.shape[1] > packed.input_ids.shape[1]
    with torch.no_grad():
        a = diffusion_ce(packed_logits(model, packed), packed.labels, packed.weights, packed.loss_sample,
                         packed.real_lens)
        b = diffusion_ce(packed_logits(model, vanilla), vanilla.labels, vanilla.weights, vanilla.loss_sample,
                         vanilla.real_lens)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-5)


def test_loss_positions_are_exactly_the_corrupted_real_tokens(kit):
    processor, model, spec = kit
    enc = sample(processor, 30)
    B = 16
    batch = pack([enc], model, B, spec, generator=torch.Generator().manual_seed(2))
    P, R = batch.prompt_lens[0], batch.response_lens[0]
    x0 = padded_response(enc, B, spec.eos_id)
    xt = batch.input_ids[0, P + R:]
    real = enc.response_ids.numel()
    corrupted = [r for r in range(real) if xt[r] != x0[r]]
    assert batch.loss_pos.tolist() == [P + R + r for r in corrupted]
    assert batch.labels.tolist() == [int(x0[r]) for r in corrupted]
    assert torch.all(batch.weights == 1 / batch.t) and batch.t.min() >= 0.05
    assert spec.mask_token_id in xt.tolist()


def test_prefix_blocks_keep_a_clean_real_prefix_and_mask_the_rest(kit):
    import dataclasses

    processor, model, spec = kit
    enc = sample(processor, 34)  # a listing: several blocks of 8, the last one part padding
    B, real = 8, enc.response_ids.numel()
    x0 = padded_response(enc, B, spec.eos_id)
    n_blocks = x0.numel() // B
    prefix = dataclasses.replace(spec, prefix_prob=1.0)
    lengths = set()
    for seed in range(40):
        batch = pack([enc], model, B, prefix, generator=torch.Generator().manual_seed(seed))
        P, R = batch.prompt_lens[0], batch.response_lens[0]
        xt = batch.input_ids[0, P + R:P + 2 * R]
        for b in range(n_blocks):
            block, clean = xt[b * B:(b + 1) * B], x0[b * B:(b + 1) * B]
            k = int((block == spec.mask_token_id).int().argmax())  # first mask: every block keeps one at least
            assert (block == spec.mask_token_id).any() and torch.equal(block[:k], clean[:k])
            assert (block[k:] == spec.mask_token_id).all()  # no substitutes, no kept tokens after the prefix
            assert k < min(B, real - b * B)  # the masked part always holds a real token to learn
            lengths.add((b, k))
        assert torch.all(batch.t == 1.0) and torch.all(batch.weights == 1.0)  # level 1: plain CE
        corrupted_real = [r for r in range(real) if xt[r] != x0[r]]
        assert batch.labels.tolist() == [int(x0[r]) for r in corrupted_real]
    assert len({k for b, k in lengths if b == 0}) >= 6  # prefix lengths vary over the block

    half = dataclasses.replace(spec, prefix_prob=0.5)
    ordered = 0
    for seed in range(60):
        batch = pack([enc], model, B, half, generator=torch.Generator().manual_seed(seed))
        P, R = batch.prompt_lens[0], batch.response_lens[0]
        xt = batch.input_ids[0, P + R:P + R + B]
        k = int((xt == spec.mask_token_id).int().argmax())
        ordered += bool((xt == spec.mask_token_id).any() and (xt[k:] == spec.mask_token_id).all()
                        and torch.equal(xt[:k], x0[:k]))
    assert 15 <= ordered <= 45  # about half the first blocks (an i.i.d. block is rarely of this shape)
    off = pack([enc], model, B, spec, generator=torch.Generator().manual_seed(0))
    assert not torch.all(off.t == 1.0)  # prefix_prob=0: the i.i.d. schedule alone


def test_padding_positions_get_half_weight_when_asked(kit):
    processor, model, spec = kit
    enc = sample(processor, 31, "colour")  # short answer: most of the block is <|im_end|> padding
    batch = pack([enc], model, 16, spec, pad_loss_weight=0.5, generator=torch.Generator().manual_seed(3))
    P, R = batch.prompt_lens[0], batch.response_lens[0]
    beyond = batch.loss_pos - (P + R) >= enc.response_ids.numel()
    assert beyond.any()
    torch.testing.assert_close(batch.weights[beyond], 0.5 / batch.t[beyond])
    torch.testing.assert_close(batch.weights[~beyond], 1.0 / batch.t[~beyond])


def test_kept_tokens_are_loss_positions_only_when_weighted(kit):
    # METHOD.md §3's loss positions are the corrupted tokens; keep_loss_weight adds the noise's kept real
    # tokens (input == label) at weight w/t, leaving the corrupted positions and their weights as they were
    processor, model, spec = kit
    enc = sample(processor, 34, "extract")
    real, B = enc.response_ids.numel(), 8
    for seed in range(4):
        off = pack([enc], model, B, spec, pad_loss_weight=0.5, generator=torch.Generator().manual_seed(seed))
        on = pack([enc], model, B, spec, pad_loss_weight=0.5, keep_loss_weight=0.25,
                  generator=torch.Generator().manual_seed(seed))
        P, R = on.prompt_lens[0], on.response_lens[0]
        assert torch.equal(on.input_ids, off.input_ids)  # the same noise
        assert bool((off.input_ids[0, off.loss_pos] != off.labels).all())
        r = on.loss_pos - (P + R)
        assert bool((r[1:] > r[:-1]).all())  # response order, each position once
        kept = on.input_ids[0, on.loss_pos] == on.labels
        assert kept.any() and bool((r[kept] < real).all())  # padding is never a kept loss position
        torch.testing.assert_close(on.weights[kept], 0.25 / on.t[kept])
        assert torch.equal(on.loss_pos[~kept], off.loss_pos) and torch.equal(on.weights[~kept], off.weights)
        xt = on.input_ids[0, P + R:P + 2 * R]
        visible_real = torch.nonzero((xt != spec.mask_token_id) & (torch.arange(R) < real)).flatten()
        assert set(visible_real.tolist()) <= set(r.tolist())  # every visible real token is read


def test_label_shift_reads_each_prediction_one_position_earlier(kit):
    processor, model, spec = kit
    enc = sample(processor, 32)
    B = 8
    plain = pack([enc], model, B, spec, generator=torch.Generator().manual_seed(4))
    shifted = pack([enc], model, B, spec, label_shift=True, generator=torch.Generator().manual_seed(4))
    P, R = plain.prompt_lens[0], plain.response_lens[0]
    assert torch.equal(plain.labels, shifted.labels)
    for where, where_shifted in zip(plain.loss_pos.tolist(), shifted.loss_pos.tolist()):
        r = where - (P + R)
        assert where_shifted == (where - 1 if r % B else P + r - 1)


def test_substitutes_and_masks_never_touch_the_prompt_or_clean_copy(kit):
    processor, model, spec = kit
    enc = sample(processor, 33)
    batch = pack([enc], model, 8, spec, generator=torch.Generator().manual_seed(0))
    P, R = batch.prompt_lens[0], batch.response_lens[0]
    assert torch.equal(batch.input_ids[0, :P], enc.prompt_ids)
    assert torch.equal(batch.input_ids[0, P:P + R], padded_response(enc, 8, spec.eos_id))
    noisy = batch.input_ids[0, P + R:P + 2 * R]
    assert not torch.isin(noisy, torch.tensor(sorted(set(range(8)) - {spec.mask_token_id, spec.eos_id}))).any()


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
