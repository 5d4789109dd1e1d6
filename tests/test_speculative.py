"""Lossless mode (bard_core/speculative.py): token for token the verifier's greedy answer, and its benchmark."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bard_core.config import DecodeConfig
from bard_core.decode import TokenIds, ar_generate_cached, generate
from bard_core.inputs import encode_sample
from tests.fakes import EOS, PAD


def _shapes_and_random_prompts(processor, n_random: int = 3):
    from bard_core.inputs import EncodedSample
    from bard_core.shapes.data import conversations

    prompts = []
    for s in conversations(6, seed=9, families=["extract", "colour", "count", "mcq"]):
        enc = encode_sample(s, processor, 512)
        enc.response_ids = enc.response_ids[:0]
        prompts.append(enc)
    g = torch.Generator().manual_seed(3)
    for length in torch.randint(3, 40, (n_random,), generator=g).tolist():  # token soup, no image
        ids = torch.randint(10, processor.tokenizer.vocab_size, (length,), generator=g)
        prompts.append(EncodedSample(ids, torch.zeros(length, dtype=torch.long), ids[:0], None, None))
    return prompts


@pytest.mark.parametrize("label_shift", [False, True])
def test_speculative_output_is_ar_greedy_token_for_token(label_shift):
    """Every block size, batch 1 and the whole batch, shapes prompts (with images) and random token prompts:
    the drafted tokens are verified, so the answer is the AR greedy answer of the same weights whatever the
    drafts are (the shipped base is an AR model: its drafts are poor, its answers confident)."""
    from bard_core import checkpoint
    from bard_core.assets import shipped_base

    model, processor, _ = checkpoint.load(shipped_base())
    tok = processor.tokenizer
    ids = TokenIds(mask=tok.convert_tokens_to_ids("<|mask|>"), eos=tok.eos_token_id, pad=tok.pad_token_id)
    prompts = _shapes_and_random_prompts(processor)
    ar = [g.token_ids for g in ar_generate_cached(model, prompts, 40, ids)]
    for B in (4, 8, 16, 32):
        cfg = DecodeConfig(block_size=B, mode="speculative", max_new_tokens=40, label_shift=label_shift)
        batched = generate(model, prompts, cfg, ids)
        assert [g.token_ids for g in batched] == ar
        assert [generate(model, [p], cfg, ids)[0].token_ids for p in prompts] == ar
        unfused = generate(model, prompts, cfg, ids, fuse=False)  # no look-ahead drafts: two forwards a step
        assert [g.token_ids for g in unfused] == ar
        for g in unfused:  # per step: the exact first draft, `accepted` more, the bonus
            assert g.nfe == 2 * len(g.accepted) and all(0 <= a < B for a in g.accepted)
            assert g.tokens <= sum(a + 2 for a in g.accepted)
        if B > 8:  # the default draft is adaptive (from 8 masks); the block-wide one answers the same
            block = generate(model, prompts, dataclasses.replace(cfg, draft="block"), ids)
            assert [g.token_ids for g in block] == ar


def test_the_adaptive_draft_widens_after_full_steps_and_narrows_when_drafts_fail(tiny_model_dir):
    """`_next_width`: doubled (to B) when every row accepted every draft, halved (to 8) when the rows gained a
    quarter of the width or less; ``draft="block"``: always B. On a model that predicts one token everywhere
    (its head zeroed: every draft is accepted) the forwards widen 8 → 16 → 32 and stay there, and the answer is
    still the AR greedy answer; the same with a separate verifier."""
    from bard_core import checkpoint
    from bard_core.speculative import _next_width, speculative_generate

    t = torch.tensor
    assert _next_width(8, t([8, 8]), 32, "adaptive") == 16 and _next_width(16, t([16]), 32, "adaptive") == 32
    assert _next_width(32, t([32]), 32, "adaptive") == 32  # never past the block
    assert _next_width(8, t([8, 3]), 32, "adaptive") == 8  # one row short of full: no wider
    assert _next_width(32, t([8, 8]), 32, "adaptive") == 16 and _next_width(32, t([9, 8]), 32, "adaptive") == 32
    assert _next_width(16, t([1]), 32, "adaptive") == 8 and _next_width(8, t([1]), 32, "adaptive") == 8  # floor 8
    assert _next_width(4, t([4]), 4, "adaptive") == 4 and _next_width(8, t([1]), 32, "block") == 32
    assert _next_width(32, t([9]), 32, "wide", first=True) == 8 and _next_width(32, t([32]), 32, "wide", first=True) == 32
    assert _next_width(32, t([8]), 32, "wide") == 16 and _next_width(32, t([9]), 32, "wide") == 32  # then adaptive
    with pytest.raises(ValueError, match="draft"):
        DecodeConfig(block_size=32, mode="speculative", draft="sometimes")

    model, processor, _ = checkpoint.load(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: argmax is token 0 everywhere, drafts and verification alike
    tok = processor.tokenizer
    ids = TokenIds(mask=tok.convert_tokens_to_ids("<|mask|>"), eos=tok.eos_token_id, pad=tok.pad_token_id)
    assert ids.eos != 0 and ids.mask != 0
    prompts = _shapes_and_random_prompts(processor, n_random=1)[-2:]
    ar = [g.token_ids for g in ar_generate_cached(model, prompts, 90, ids)]
    assert ar == [[0] * 90] * 2
    widths: list[int] = []
    hook = model.model.register_forward_pre_hook(lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                                 with_kwargs=True)
    try:
        # 90 tokens: adaptive 9 + 16 + 32 + 32 + 32 in five steps (the price of starting narrow when every draft
        # is accepted: two forwards more than the block-wide draft's 33 + 32 + 32)
        for draft, verify, drafted in (("adaptive", [8 + 16, 16 + 32, 32 + 32, 32 + 32, 32 + 32], [8, 16, 32, 32, 32]),
                                       ("block", [64, 64, 64], [32, 32, 32]), ("wide", [64, 64, 64], [32, 32, 32])):
            widths.clear()
            cfg = DecodeConfig(block_size=32, mode="speculative", max_new_tokens=90, draft=draft)
            gens = speculative_generate(model, prompts, cfg, ids)
            assert [g.token_ids for g in gens] == ar
            # the first forward drafts [prompt ‖ W masks]; then one verify forward a step, carrying the drafts and
            # the next (wider) step's look-ahead masks, which every step uses
            assert widths[1:] == verify and widths[0] > 8
            assert [g.accepted for g in gens] == [[w - 1 for w in drafted]] * 2 and gens[0].nfe == len(widths)
    finally:
        hook.remove()
    # the two-model path (verified by a copy of the same weights): W drafts a step, all accepted, plus the bonus
    verifier = checkpoint.load(tiny_model_dir)[0]
    verifier.load_state_dict(model.state_dict())
    for draft, accepted in (("adaptive", [8, 16, 32, 32]), ("block", [32, 32, 32]), ("wide", [32, 32, 32])):
        cfg = DecodeConfig(block_size=32, mode="speculative", max_new_tokens=90, draft=draft)
        gens = speculative_generate(model, prompts, cfg, ids, verifier=verifier)
        assert [g.token_ids for g in gens] == ar and [g.accepted for g in gens] == [accepted] * 2
    # "wide": its first step at B, then adaptive from 8 (a drafter whose drafts all fail stays at 8)
    drafter = checkpoint.load(tiny_model_dir)[0]  # random weights: its drafts are rejected
    for draft, first in (("wide", [32, 8, 8, 8]), ("adaptive", [8, 8, 8, 8]), ("block", [32, 32, 32, 32])):
        widths.clear()
        hook = drafter.model.register_forward_pre_hook(
            lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
        try:
            cfg = DecodeConfig(block_size=32, mode="speculative", max_new_tokens=12, draft=draft)
            gens = speculative_generate(drafter, prompts[:1], cfg, ids, verifier=verifier)
        finally:
            hook.remove()
        assert [g.token_ids for g in gens] == [ar[0][:12]]
        # the drafter's forwards: [prompt ‖ W masks], then [accepted drafts and the bonus ‖ W masks]
        drafted = [widths[0] - prompts[0].prompt_ids.numel()] + [w - 1 - a for w, a in zip(widths[1:], gens[0].accepted)]
        assert drafted[:4] == first, (draft, widths, gens[0].accepted)


def test_with_a_separate_verifier_the_output_is_the_verifiers_greedy_answer(tiny_model_dir):
    """A drafter that knows nothing (the random tiny model) and the trained AR base as verifier: nearly every
    draft is rejected, and the answer is still the verifier's, token for token, in a batch and alone."""
    from bard_core import checkpoint
    from bard_core.assets import shipped_base

    verifier, processor, _ = checkpoint.load(shipped_base())
    drafter, _, _ = checkpoint.load(tiny_model_dir)
    tok = processor.tokenizer
    ids = TokenIds(mask=tok.convert_tokens_to_ids("<|mask|>"), eos=tok.eos_token_id, pad=tok.pad_token_id)
    prompts = _shapes_and_random_prompts(processor, n_random=2)
    ar = [g.token_ids for g in ar_generate_cached(verifier, prompts, 24, ids)]
    for B, shift, draft in ((4, False, "adaptive"), (32, True, "adaptive"), (32, False, "block")):
        cfg = DecodeConfig(block_size=B, mode="speculative", max_new_tokens=24, label_shift=shift, draft=draft)
        batched = generate(drafter, prompts, cfg, ids, verifier=verifier)
        assert [g.token_ids for g in batched] == ar
        assert [generate(drafter, [p], cfg, ids, verifier=verifier)[0].token_ids for p in prompts] == ar
        assert all(g.nfe == 2 * len(g.accepted) and g.tokens <= sum(a + 1 for a in g.accepted) for g in batched)
    same = generate(verifier, prompts, DecodeConfig(block_size=4, mode="speculative", max_new_tokens=24), ids,
                    verifier=checkpoint.load(shipped_base())[0])  # the two-model path, drafter = verifier's weights
    assert [g.token_ids for g in same] == ar and sum(a for g in same for a in g.accepted) > 0


def test_a_drafter_with_the_verifiers_vision_tower_shares_its_image_encoding(tiny_model_dir):
    """A stage trained with a frozen tower sees the images as its base does: the prompts' images are encoded
    once for both models (as AR decoding encodes them once); another tower encodes its own. Either way the
    answer is the verifier's."""
    import copy
    from collections import Counter

    from bard_core import checkpoint
    from bard_core.assets import shipped_base
    from bard_core.speculative import _same_tower

    verifier, processor, _ = checkpoint.load(shipped_base())
    same_tower = copy.deepcopy(verifier)  # another language model on the base's tower
    with torch.no_grad():
        for w in same_tower.model.language_model.parameters():
            w.mul_(0.9)
    other_tower = checkpoint.load(tiny_model_dir)[0]
    tok = processor.tokenizer
    ids = TokenIds(mask=tok.convert_tokens_to_ids("<|mask|>"), eos=tok.eos_token_id, pad=tok.pad_token_id)
    prompts = _shapes_and_random_prompts(processor, n_random=1)  # six with an image, one without
    ar = [g.token_ids for g in ar_generate_cached(verifier, prompts, 24, ids)]
    cfg = DecodeConfig(block_size=8, mode="speculative", max_new_tokens=24)
    calls = Counter()  # vision tower forwards per model

    def counting(name):
        return lambda *_: calls.update([name])

    for drafter, shared in ((same_tower, True), (other_tower, False)):
        assert _same_tower(drafter, verifier) is shared
        calls.clear()
        hooks = [drafter.model.visual.register_forward_hook(counting("drafter")),
                 verifier.model.visual.register_forward_hook(counting("verifier"))]
        try:
            assert [g.token_ids for g in generate(drafter, prompts, cfg, ids, verifier=verifier)] == ar
        finally:
            for h in hooks:
                h.remove()
        assert dict(calls) == ({"verifier": 1} if shared else {"drafter": 1, "verifier": 1})


def test_speculative_refuses_sampling_and_a_model_without_mask():
    from bard_core.speculative import speculative_generate

    with pytest.raises(ValueError, match="greedy decoding only"):
        DecodeConfig(block_size=4, mode="speculative", temperature=0.7)
    with pytest.raises(ValueError, match="mask token"):
        speculative_generate(None, [], DecodeConfig(block_size=4, mode="speculative"), TokenIds(None, EOS, PAD))


def test_speculative_on_a_trained_stage_is_its_causal_greedy(stage_b4):
    """A block-diffusion stage (label shift and token ids from its bard.json) drafts; the same weights verify."""
    from bard_core import checkpoint

    model, processor, meta = checkpoint.load(stage_b4.uri)
    ids = checkpoint.token_ids(processor.tokenizer, meta)
    prompts = _shapes_and_random_prompts(processor)
    ar = [g.token_ids for g in ar_generate_cached(model, prompts, 40, ids)]
    cfg = checkpoint.decode_config(meta, None, mode="speculative", max_new_tokens=40)
    assert cfg.block_size == 4 and cfg.label_shift == meta["label_shift"]
    assert [g.token_ids for g in generate(model, prompts, cfg, ids)] == ar


def test_decode_speed_measures_the_lossless_mode_beside_ar_and_block_decoding(world_dir, tmp_path):
    """The benchmark on a 'stage' that is the shipped AR base: every row at both batch sizes, the lossless rows'
    answers identical to the stage's own AR answers, and one JSON line to read them from."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from bard_core.assets import shipped_base

    shutil.copytree(shipped_base(), tmp_path / "stages" / "B4")
    out = subprocess.run([sys.executable, "-m", "benchmarks.decode_speed", "--stages", str(tmp_path / "stages"),
                          "--benchmarks-dir", str(world_dir / "benchmarks"), "--limit", "4", "--thresholds", "0.9",
                          "--batch-sizes", "1,4", "--max-new-tokens", "24"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted((r["mode"], r["batch"]) for r in result["rows"]) == [("dynamic", 1), ("dynamic", 4),
                                                                      ("speculative", 1), ("speculative", 4)]
    for bs in ("1", "4"):
        spec = result["speculative"][bs]
        assert spec["identical"] == 1.0 and spec["tpf"] >= 0.5 and spec["accepted_mean"] >= 0
        assert spec["speedup"] == pytest.approx(spec["tok_s"] / result["ar_tok_s_by_batch"][bs])
    assert "speculative" in out.stdout and "same" in out.stdout  # the table


def test_look_ahead_masks_ride_only_after_a_fully_accepted_step(stage_b4):
    """The verify forward carries B look-ahead masks (2B positions) in the first step and after a step whose
    every draft was accepted, B positions otherwise (``look_ahead="always"``: every step); both answer the AR
    greedy answer, and the new rule never needs fewer forwards than the old."""
    from bard_core import checkpoint
    from bard_core.speculative import speculative_generate

    model, processor, meta = checkpoint.load(stage_b4.uri)
    ids = checkpoint.token_ids(processor.tokenizer, meta)
    prompts = _shapes_and_random_prompts(processor, n_random=0)  # prompts of 26+ tokens: no draft forward of 4 or 8
    cfg = checkpoint.decode_config(meta, None, mode="speculative", max_new_tokens=40)
    B = cfg.block_size
    widths: list[int] = []
    hook = model.model.register_forward_pre_hook(lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                                 with_kwargs=True)
    try:
        full_seen = 0
        for p in prompts:
            (ar,) = ar_generate_cached(model, [p], 40, ids)
            runs = {}
            for rule in ("after_full", "always"):
                widths.clear()
                (g,) = speculative_generate(model, [p], cfg, ids, look_ahead=rule)
                runs[rule] = g
                assert g.token_ids == ar.token_ids
                verify = [w for w in widths if w in (B, 2 * B)]
                assert len(verify) == len(g.accepted) and g.nfe == len(widths)
                full = [a == B - 1 for a in g.accepted]
                expected = full[:-1] if rule == "after_full" else [True] * (len(full) - 1)
                assert [w == 2 * B for w in verify] == [True] + expected
            full_seen += sum(full)
            assert runs["after_full"].nfe >= runs["always"].nfe  # a streak's first full step has no masks to reuse
        assert full_seen > 0  # the rule was exercised
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="look_ahead"):
        speculative_generate(model, prompts[:1], cfg, ids, look_ahead="sometimes")
