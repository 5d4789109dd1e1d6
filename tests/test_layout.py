"""The packed layout on a real (tiny) Qwen3-VL: exactness against separate forwards, no peeking, batching,
positions, noise and loss positions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bard_core.layout import pack, padded_response
from bard_core.losses import diffusion_ce
from bard_core.train import packed_logits
from tests.objective_kit import full_logits, sample, separate_block_logits


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
