"""Self-distilled targets (`tasks/base_targets.py`): the AR base's own greedy answers replace the curated ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.base_targets import KEPT, answer_budget, with_answer

SHAPES_ROWS = 24


def test_with_answer_replaces_the_last_turns_text_and_keeps_the_rest():
    messages = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "q?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a", "extra": 1},
                                                  {"type": "text", "text": "b"}]}]
    out = with_answer(messages, "new")
    assert out[0] is messages[0] and messages[-1]["content"][0]["text"] == "a"  # the input is not modified
    assert out[-1] == {"role": "assistant", "content": [{"type": "text", "text": "new", "extra": 1}]}
    plain = with_answer([{"role": "assistant", "content": "old"}], "new")
    assert plain[-1]["content"] == [{"type": "text", "text": "new"}]


def test_the_answer_budget_is_twice_the_curated_answer_within_the_token_cap():
    assert answer_budget(10, 8192, 100) == 36
    assert answer_budget(10, 120, 100) == 20
    assert answer_budget(10, 100, 100) == 1


def _table(data_ref):
    import pyarrow.parquet as pq

    return pq.read_table(sorted((Path(data_ref.uri) / "data").glob("*.parquet"))[0]).slice(0, SHAPES_ROWS)


@pytest.mark.slow
def test_base_answers_are_the_bases_greedy_answers_and_unusable_ones_say_why(data_ref):
    import pyarrow as pa
    import torch

    from bard_core import checkpoint
    from bard_core.assets import shipped_base
    from bard_core.inputs import encode_sample
    from tasks.base_targets import BaseTargets

    table = _table(data_ref)
    rows = table.to_pylist()
    long_row = max(rows, key=lambda r: len(r["messages"][-1]["content"][0]["text"]))
    assert long_row["messages"][-1]["content"][0]["text"].count("\n") >= 3  # a listing, many tokens long
    cut = {**long_row, "messages": with_answer(long_row["messages"], "x")}  # a 2-token budget of 20: unfinished
    empty = {**rows[0], "messages": with_answer(rows[0]["messages"], " ")}  # does not encode
    short = next(r for r in rows if len(r["messages"][-1]["content"][0]["text"]) < 8)
    wrong = {**short, "messages": with_answer(short["messages"], "wrong")}  # the base answers it otherwise
    table = pa.Table.from_pylist(rows + [wrong, cut, empty], schema=table.schema)

    out = BaseTargets(str(shipped_base()), 512, answers=True)(table)  # the trained base: it answers
    assert out.num_rows == table.num_rows and out.schema.field("messages").type == table.schema.field("messages").type
    targets = out.column("target").to_pylist()
    assert targets[-2:] == [KEPT[2], KEPT[4]] and set(targets[:-2]) <= set(KEPT)
    assert out.column("messages")[-2].as_py() == cut["messages"]  # kept, as the column says
    assert out.column("messages")[-1].as_py() == empty["messages"]
    assert targets.count(KEPT[1]) >= SHAPES_ROWS // 2 and targets[-3] == KEPT[0]
    assert out.column("messages")[-3].as_py() != wrong["messages"]

    model, processor, _ = checkpoint.load(shipped_base())
    for before, after, target in zip(rows + [wrong], out.to_pylist(), targets):
        if not target.startswith("base"):
            continue
        assert after["messages"][:-1] == before["messages"][:-1] and after["images"] == before["images"]
        sample = encode_sample(after, processor, 512)
        ids = torch.cat([sample.prompt_ids, sample.response_ids])
        types = torch.cat([sample.prompt_mm_types, torch.zeros_like(sample.response_ids)])
        with torch.no_grad():  # one causal forward over prompt + answer, no cache: a check independent of decoding
            logits = model(input_ids=ids[None], pixel_values=sample.pixel_values, image_grid_thw=sample.image_grid_thw,
                           attention_mask=torch.ones(1, ids.numel(), dtype=torch.long),
                           mm_token_type_ids=types[None]).logits[0]
        p = sample.prompt_ids.numel()
        assert logits[p - 1:-1].argmax(-1).tolist() == sample.response_ids.tolist()  # every token the base's argmax
