"""The static KV cache (bard_core/static_kv.py): the decoders answer as with the dynamic cache, and its text-only
forward is one graph (what a CUDA graph capture needs). On CUDA the graphs themselves: tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from bard_core.config import DecodeConfig
from bard_core.decode import generate
from bard_core.engine import _forward, _text_positions, ar_generate_cached


@pytest.fixture(scope="module")
def base():
    from bard_core import checkpoint
    from bard_core.assets import shipped_base
    from bard_core.inputs import encode_sample
    from bard_core.shapes.data import conversations

    model, processor, meta = checkpoint.load(shipped_base())
    prompts = []
    for s in conversations(6, seed=5, families=["extract", "count", "mcq"]):
        enc = encode_sample(s, processor, 512)
        enc.response_ids = enc.response_ids[:0]
        prompts.append(enc)
    return model, checkpoint.token_ids(processor.tokenizer, meta), prompts


def test_the_static_cache_decodes_as_the_dynamic_one(base):
    """AR and block decoding (both label shifts, fused and separate commits) on a batch whose rows finish at
    different steps (rows leave the static cache too): the same tokens, forwards and edits."""
    model, ids, prompts = base
    dynamic = ar_generate_cached(model, prompts, 40, ids, static=False)
    static = ar_generate_cached(model, prompts, 40, ids, static=True)
    assert len({len(g.token_ids) for g in dynamic}) > 1  # rows left the batch at different steps
    assert [(g.token_ids, g.nfe) for g in static] == [(g.token_ids, g.nfe) for g in dynamic]
    for label_shift in (False, True):
        cfg = DecodeConfig(block_size=8, threshold=0.9, max_new_tokens=40, batch_size=6, label_shift=label_shift)
        for fuse in (True, False):
            a = generate(model, prompts, cfg, ids, fuse=fuse, static=False)
            b = generate(model, prompts, cfg, ids, fuse=fuse, static=True)
            assert [(g.token_ids, g.nfe, g.edits) for g in b] == [(g.token_ids, g.nfe, g.edits) for g in a]
            assert len({len(g.token_ids) for g in a}) > 1


def test_the_static_cache_refuses_what_it_cannot_hold(base):
    from bard_core.static_kv import StaticKV, new_cache

    model, ids, prompts = base
    assert type(new_cache(model, 1, 64)).__name__ == "DynamicCache"  # on the CPU by default: the dynamic cache
    cache = new_cache(model, 1, 8, static=True)
    assert isinstance(cache, StaticKV) and not cache.graphs  # no graphs without CUDA
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10]])
    _forward(model, cache, tokens, _text_positions(torch.tensor([0]), 6), torch.zeros(1, 0, dtype=torch.bool),
             torch.ones(6, 6, dtype=torch.bool).tril()[None], "cpu")
    assert cache.get_seq_length() == 6
    with pytest.raises(ValueError, match="static KV cache of 8 slots: 6 written, 4 more asked"):
        _forward(model, cache, tokens[:, :4], _text_positions(torch.tensor([6]), 4), torch.ones(1, 6, dtype=torch.bool),
                 torch.ones(1, 4, 4, dtype=torch.bool), "cpu")
    with pytest.raises(ValueError, match="minus the number of slots"):
        cache.crop(2)
    cache.crop(-2)
    assert cache.get_seq_length() == 4 and int(cache.cache.get_seq_length()) == 4


def test_the_text_forward_on_the_static_cache_is_one_graph(base):
    """A CUDA graph records a forward without running it, so the forward may not read a tensor's value on the
    host (no `.item()`, no data-dependent branch or shape). Dynamo's `fullgraph=True` refuses exactly those: the
    language model's forward on the static cache, as `_Graph` captures it, traces as one graph and gives the eager
    forward's hidden states."""
    from bard_core.static_kv import StaticKV

    model, ids, prompts = base
    lm = model.model.language_model
    outs = []
    for compiled in (False, True):
        cache = StaticKV(model, 32, graphs=False)
        prompt = torch.tensor([[11, 12, 13, 14, 15]])
        _forward(model, cache, prompt, _text_positions(torch.tensor([0]), 5), torch.zeros(1, 0, dtype=torch.bool),
                 torch.ones(5, 5, dtype=torch.bool).tril()[None], "cpu")
        mask = torch.zeros(1, 1, 2, 32, dtype=torch.bool)
        mask[..., :7] = True

        def step(i, p, m, cache=cache):
            return lm(input_ids=i, position_ids=p, attention_mask=m, cache=cache.cache, use_cache=True).last_hidden_state

        run = torch.compile(step, fullgraph=True, backend="eager") if compiled else step
        outs.append(run(torch.tensor([[16, 17]]), _text_positions(torch.tensor([5]), 2), mask))
        assert int(cache.cache.get_seq_length()) == 7  # the forward wrote its K/V in place
    torch.testing.assert_close(outs[1], outs[0])


def test_a_forward_no_graph_can_record_is_decoded_eagerly_with_one_warning(base, monkeypatch):
    """Where capturing fails (here: no CUDA at all), the cache says so once and decodes on without graphs."""
    from bard_core import engine, static_kv

    model, ids, prompts = base
    made = []

    def graphed(model, n, max_len, static=None):
        made.append(static_kv.StaticKV(model, max_len, graphs=True))
        return made[-1]

    expected = ar_generate_cached(model, prompts[:2], 24, ids, static=False)
    monkeypatch.setattr(engine, "new_cache", graphed)
    with pytest.warns(UserWarning, match="CUDA graph capture failed, decoding without graphs") as caught:
        got = ar_generate_cached(model, prompts[:2], 24, ids)
    assert len(caught) == 1 and not made[0].graphs
    assert [(g.token_ids, g.nfe) for g in got] == [(g.token_ids, g.nfe) for g in expected]
