"""The decoding engine, on a scripted fake model and on the real tiny Qwen3-VL."""

from __future__ import annotations

import pytest
import torch

from bard_core.config import DecodeConfig
from bard_core.decode import TokenIds, ar_generate_cached, generate
from bard_core.inputs import encode_sample
from tests.fakes import EOS, MASK, PAD, VOCAB, FakeVLM, Script, prompt

IDS = TokenIds(mask=MASK, eos=EOS, pad=PAD)


def run(scripts: dict[int, Script], lengths: dict[int, int], cfg: DecodeConfig, **kwargs):
    model = FakeVLM(scripts, lengths)
    out = generate(model, [prompt(r, lengths[r]) for r in scripts], cfg, IDS, **kwargs)
    return model, out


def test_all_masks_filled_and_answer_read_back():
    answer = list(range(30, 43)) + [EOS]
    model, (g,) = run({10: Script(answer)}, {10: 5}, DecodeConfig(block_size=4, threshold=0.9, max_new_tokens=32))
    assert g.token_ids == answer and g.tokens == len(answer)
    assert MASK not in g.token_ids


def test_never_unmasks_a_future_block():
    B = 4
    model, (g,) = run({10: Script(list(range(30, 45)) + [EOS], confidence=0.5)}, {10: 5},
                      DecodeConfig(block_size=B, threshold=0.9, max_new_tokens=32))
    for call in model.calls:
        masked = call.input_ids[0] == MASK
        if masked.any():
            blocks = ((call.positions[0][masked] - 5) // B).unique()
            assert blocks.numel() == 1  # masks of one block per forward
            # everything before that block is already decided (no masks in the context)
            assert not (call.positions[0][~masked] - 5 >= (blocks.item() + 1) * B).any()


def test_denoising_forwards_never_grow_the_cache():
    model, _ = run({10: Script(list(range(30, 45)) + [EOS], confidence=0.5)}, {10: 5},
                   DecodeConfig(block_size=4, threshold=0.9, max_new_tokens=32))
    lengths = [c.cache_len for c in model.calls]
    # the cache only grows by prompt (first call) and by committed blocks, never by a denoising pass
    assert lengths == sorted(lengths)
    grown = {b - a for a, b in zip(lengths, lengths[1:]) if b != a}
    assert grown <= {5, 4}  # the prompt, then one block of 4 at a time


def test_static_mode_with_one_token_per_step_fills_one_position_per_forward():
    answer = list(range(30, 38))
    cfg = DecodeConfig(block_size=4, mode="static", tokens_per_step=1, max_new_tokens=8)
    model, (g,) = run({10: Script(answer, confidence=0.999)}, {10: 3}, cfg)
    assert g.steps_per_block == [4, 4] and g.nfe == 8 and g.tpf == 1.0
    masks_seen = [int((c.input_ids[0] == MASK).sum()) for c in model.calls]
    assert masks_seen == [4, 3, 2, 1, 4, 3, 2, 1]


def test_dynamic_mode_accepts_every_confident_position_at_once():
    cfg = DecodeConfig(block_size=8, threshold=0.9, max_new_tokens=16)
    _, (g,) = run({10: Script(list(range(30, 45)) + [EOS], confidence=0.99)}, {10: 3}, cfg)
    assert g.steps_per_block == [1, 1] and g.nfe == 2 and g.tpf == 8.0


@pytest.mark.parametrize("fallback, first_taken", [("leftmost", 0), ("confident", 2)])
def test_when_no_position_is_sure_the_fallback_decides_which_one_is_taken(fallback, first_taken):
    """Nothing clears τ: `leftmost` takes the first masked position, `confident` the most confident
    (here a token further ahead); one token per forward either way, and the same answer."""
    answer = [30, 31, 32, 33]
    cfg = DecodeConfig(block_size=4, threshold=0.9, max_new_tokens=4, fallback=fallback)
    model, (g,) = run({10: Script(answer, confidence=[0.3, 0.2, 0.8, 0.4])}, {10: 3}, cfg)
    assert g.token_ids == answer and g.steps_per_block == [4]
    blocks = [c.input_ids[0][:4] for c in model.calls[1:4]]  # the block after steps 1, 2, 3
    assert blocks[0][first_taken] == answer[first_taken] and int((blocks[0] == MASK).sum()) == 3
    taken = [int(torch.nonzero((b != MASK) & (prev == MASK))[0]) for prev, b in
             zip([torch.full((4,), MASK)] + blocks[:-1], blocks)]
    assert taken == ([0, 1, 2] if fallback == "leftmost" else [2, 3, 0])  # by confidence 0.8, 0.4, 0.3


def test_a_sure_position_is_taken_without_forcing_the_leftmost_one():
    cfg = DecodeConfig(block_size=4, threshold=0.9, max_new_tokens=4)
    model, (g,) = run({10: Script([30, 31, 32, 33], confidence=[0.3, 0.3, 0.95, 0.3])}, {10: 3}, cfg)
    second = model.calls[1].input_ids[0]
    assert second.tolist() == [MASK, MASK, 32, MASK]  # only the sure one, not also position 0


def test_low_confidence_still_makes_progress_one_token_per_step():
    cfg = DecodeConfig(block_size=4, threshold=0.9, max_new_tokens=4)
    _, (g,) = run({10: Script([30, 31, 32, 33], confidence=0.3)}, {10: 3}, cfg)
    assert g.steps_per_block == [4] and g.token_ids == [30, 31, 32, 33]


def test_stops_at_eos_per_sample_while_others_continue():
    short = Script([30, EOS])
    long = Script(list(range(30, 50)) + [EOS])
    cfg = DecodeConfig(block_size=4, threshold=0.9, max_new_tokens=32)
    model, (a, b) = run({10: short, 11: long}, {10: 3, 11: 6}, cfg)
    assert a.token_ids == [30, EOS] and a.tokens == 2
    assert b.token_ids == list(range(30, 50)) + [EOS]
    assert a.nfe == 1 and b.nfe == 6  # the short row left the batch after its first block
    assert max(c.input_ids.shape[0] for c in model.calls[1:]) == 1


def test_tpf_counts_tokens_only_up_to_the_first_eos():
    cfg = DecodeConfig(block_size=8, threshold=0.9, max_new_tokens=16)
    _, (g,) = run({10: Script([30, 31, EOS, 40, 41, 42, 43, 44])}, {10: 3}, cfg)
    assert g.token_ids == [30, 31, EOS] and g.tokens == 3 and g.nfe == 1 and g.tpf == 3.0


@pytest.mark.parametrize("finish", [True, False])
def test_a_row_decided_up_to_a_visible_eos_takes_no_more_forwards(finish):
    # positions after the EOS stay unsure: only finish_at_eos spares the forwards spent on them
    unsure_tail = {2: [(40, 0.3)], 3: [(41, 0.3)]}
    cfg = DecodeConfig(block_size=4, threshold=0.9, max_new_tokens=8, finish_at_eos=finish)
    _, (g,) = run({10: Script([30, EOS], revisions=unsure_tail)}, {10: 3}, cfg)
    assert g.token_ids == [30, EOS] and g.nfe == (1 if finish else 3)
    # an EOS visible before the tokens ahead of it are: the row goes on until they are decided
    gap = {1: [(31, 0.3)], 3: [(41, 0.2)]}
    _, (g,) = run({10: Script([30, 31, EOS], revisions=gap)}, {10: 3}, cfg)
    assert g.token_ids == [30, 31, EOS] and g.nfe == (2 if finish else 3)


def test_correction_replaces_a_planted_wrong_token_and_never_loops():
    wrong, right = 55, 31
    answer = [30, right, 32, 33]
    # position 1: first asked it proposes a wrong token confidently; later it is sure of the right one
    revisions = {1: [(wrong, 0.95), (right, 0.999)], 2: [(32, 0.5)], 3: [(33, 0.5)]}
    cfg = DecodeConfig(block_size=4, threshold=0.9, edit_threshold=0.99, max_new_tokens=4)
    _, (g,) = run({10: Script(answer, revisions=revisions)}, {10: 3}, cfg)
    assert g.token_ids == answer and g.edits == 1
    # a model that flips between two tokens forever: edits are bounded, decoding ends
    flip = {0: [(40, 0.95), (41, 0.999), (40, 0.999), (41, 0.999)] * 10, 1: [(32, 0.2)], 2: [(33, 0.2)], 3: [(34, 0.2)]}
    cfg = DecodeConfig(block_size=4, threshold=0.9, edit_threshold=0.99, max_edits_per_position=1, max_new_tokens=4)
    _, (g,) = run({10: Script([0, 0, 0, 0], revisions=flip)}, {10: 3}, cfg)
    assert g.edits == 1 and g.token_ids[0] == 41


def test_the_mask_token_is_never_emitted():
    cfg = DecodeConfig(block_size=4, threshold=0.5, max_new_tokens=4)
    _, (g,) = run({10: Script([MASK, MASK, 31, EOS], confidence=0.99)}, {10: 3}, cfg)
    assert MASK not in g.token_ids


@pytest.mark.parametrize("fuse", [True, False])
def test_fused_commit_equals_separate_commit_on_the_fake(fuse):
    answer = list(range(30, 45)) + [EOS]
    cfg = DecodeConfig(block_size=4, threshold=0.9, max_new_tokens=32)
    # unsure tokens (the fallback takes them one by one), a sure EOS (an unsure one gives way: sure_eos)
    _, (g,) = run({10: Script(answer, confidence=[0.6] * 15 + [0.99])}, {10: 5}, cfg, fuse=fuse)
    assert g.token_ids == answer


def test_temperature_sampling_follows_the_generator():
    cfg = DecodeConfig(block_size=4, threshold=0.0, temperature=1.0, top_p=0.9, max_new_tokens=8)
    outs = []
    for seed in (0, 0, 1):
        _, (g,) = run({10: Script(list(range(30, 38)), confidence=0.5)}, {10: 3}, cfg,
                      generator=torch.Generator().manual_seed(seed))
        outs.append(g.token_ids)
    assert outs[0] == outs[1] and all(0 <= t < VOCAB and t != MASK for t in outs[2])


# --- the real tiny Qwen3-VL ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def real(tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from bard_core.shapes.data import conversations

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    tok = processor.tokenizer
    ids = TokenIds(mask=tok.mask_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id)
    samples = conversations(4, seed=5, families=["extract", "colour", "count", "mcq"])
    prompts = []
    for s in samples:
        enc = encode_sample(s, processor, 512)
        enc.response_ids = enc.response_ids[:0]
        prompts.append(enc)
    return model, processor, ids, samples, prompts


def test_cached_equals_uncached_fused_equals_separate_batch_equals_single(real):
    model, _, ids, _, prompts = real
    cfg = DecodeConfig(block_size=8, threshold=0.3, max_new_tokens=24)
    base = generate(model, prompts, cfg, ids)
    for variant in (generate(model, prompts, cfg, ids, use_cache=False), generate(model, prompts, cfg, ids, fuse=False),
                    [generate(model, [p], cfg, ids)[0] for p in prompts]):
        assert [g.token_ids for g in variant] == [g.token_ids for g in base]
    unfused = generate(model, prompts, cfg, ids, fuse=False)
    assert all(u.nfe > b.nfe for u, b in zip(unfused, base))  # fusion saves the commit forwards


def test_ar_baseline_matches_transformers_generate(real):
    """On the shipped (trained, confident) base: a random model's near-ties flip under float noise."""
    from bard_core import checkpoint
    from bard_core.assets import shipped_base
    from bard_core.inputs import _pil

    _, _, ids, samples, _ = real
    model, processor, _ = checkpoint.load(shipped_base())
    prompts = []
    for s in samples:
        enc = encode_sample(s, processor, 512)
        enc.response_ids = enc.response_ids[:0]
        prompts.append(enc)
    ours = ar_generate_cached(model, prompts, 20, ids)
    texts = [processor.apply_chat_template(s["messages"][:-1], add_generation_prompt=True, tokenize=False)
             for s in samples]
    images = [_pil(im) for s in samples for im in s["images"]]
    enc = processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left")
    tok = processor.tokenizer
    with torch.no_grad():  # transformers' own generate: KV cache, left padding, greedy
        out = model.generate(**enc, max_new_tokens=20, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    theirs = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    for g, text in zip(ours, theirs):
        assert processor.tokenizer.decode(g.token_ids, skip_special_tokens=True) == text
        assert g.nfe == g.tokens  # one token per forward


def test_label_shift_decoding_is_consistent_across_cache_fusion_and_batching(real):
    model, _, ids, _, prompts = real
    cfg = DecodeConfig(block_size=4, threshold=0.3, max_new_tokens=16, label_shift=True)
    base = generate(model, prompts, cfg, ids)
    for variant in (generate(model, prompts, cfg, ids, use_cache=False), generate(model, prompts, cfg, ids, fuse=False),
                    [generate(model, [p], cfg, ids)[0] for p in prompts]):
        assert [g.token_ids for g in variant] == [g.token_ids for g in base]
    plain = generate(model, prompts, DecodeConfig(block_size=4, threshold=0.3, max_new_tokens=16), ids)
    assert [g.token_ids for g in plain] != [g.token_ids for g in base]  # it really reads other positions


def test_label_shift_reads_block_token_zero_at_the_last_committed_position(real):
    """Under shift, the first token of block 1 must equal what the model predicts after block 0."""
    model, _, ids, _, prompts = real
    cfg = DecodeConfig(block_size=4, mode="static", tokens_per_step=4, max_new_tokens=8, label_shift=True)
    (g,) = generate(model, prompts[:1], cfg, ids)
    # recompute with an uncached forward over [prompt ‖ block 0] and read the last position
    from bard_core.engine import _Context, _forward, _prompt_rows_mask, _Rows, _text_positions
    rows = _Rows(model, prompts[:1], ids.pad)
    ctx = _Context(rows.ids, rows.positions, rows.types, rows.valid, _prompt_rows_mask(rows.valid))
    block0 = torch.tensor([g.token_ids[:4]])
    full = ctx.then(block0, _text_positions(rows.next_pos, 4))
    with torch.no_grad():
        h = _forward(model, None, full.ids, full.positions, torch.zeros(1, 0, dtype=torch.bool), full.mask, "cpu",
                     rows.pixel_values, rows.image_grid_thw, full.types)
        logits = model.lm_head(h[:, -1]).float()
    logits[:, ids.mask] = float("-inf")
    assert ids.eos not in g.token_ids[:4] and len(g.token_ids) == 8
    assert g.token_ids[4] == int(logits.argmax())


def test_an_unsure_eos_gives_way_to_the_positions_next_best_token():
    """EOS ends the answer for good, so with sure_eos (the default) it is proposed only above τ; an unsure
    one gives way to the runner-up, at the runner-up's own probability (not renormalised)."""
    from bard_core.decode import _pick

    probs = torch.full((1, 3, VOCAB), 1e-4)
    probs[0, 0, EOS], probs[0, 0, 5] = 0.6, 0.3  # unsure EOS first, a runner-up behind it
    probs[0, 1, EOS] = 0.95  # a sure EOS
    probs[0, 2, 3], probs[0, 2, EOS] = 0.7, 0.2  # EOS not the best: nothing changes
    probs[..., MASK] = 0.0  # never proposed anyway
    logits = (probs / probs.sum(-1, keepdim=True)).log()
    sure = DecodeConfig(block_size=4, threshold=0.9)
    token, conf = _pick(logits.clone(), sure, MASK, None, EOS)
    assert token.tolist() == [[5, EOS, 3]]
    torch.testing.assert_close(conf, (probs / probs.sum(-1, keepdim=True))[0, [0, 1, 2], [5, EOS, 3]][None])
    for cfg in (DecodeConfig(block_size=4, threshold=0.9, sure_eos=False),
                DecodeConfig(block_size=4, mode="static", tokens_per_step=1)):  # off, or no threshold to clear
        assert _pick(logits.clone(), cfg, MASK, None, EOS)[0].tolist() == [[EOS, EOS, 3]]
    sampled = DecodeConfig(block_size=4, threshold=0.9, temperature=1.0)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([_pick(logits.clone(), sampled, MASK, g, EOS)[0][0] for _ in range(300)])
    assert not (draws[:, 0] == EOS).any() and (draws[:, 1] == EOS).float().mean() > 0.8
    with pytest.raises(ValueError, match="sure_eos"):
        DecodeConfig(block_size=4, threshold=1.0)
    assert DecodeConfig(block_size=4, threshold=1.0, sure_eos=False).threshold == 1.0
