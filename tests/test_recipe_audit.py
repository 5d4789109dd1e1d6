"""Every named recipe says why it departs from METHOD.md or its reference (issue 22: recipes say what they are)."""

from __future__ import annotations

import json

import pytest

from bard_core.recipe_audit import METHOD, explain, settings, stale_notes, unexplained
from bard_core.recipes import NOTES, RECIPES, get_recipe


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_departure_has_a_reason_and_every_reason_a_departure(name):
    assert unexplained(get_recipe(name)) == []
    assert stale_notes(name) == []


def test_a_new_departure_without_a_reason_is_caught():
    # as if the recipe itself set these: a METHOD.md value changed, and a knob changed from the tiny recipe
    changed = get_recipe("qwen3-vl-4b", {"train.kd_top_k": "8", "train.long_share": "0.5"})
    assert set(unexplained(changed)) == {"train.kd_top_k", "train.long_share"}


def test_the_method_table_names_real_settings():
    assert set(METHOD) <= set(settings(get_recipe("tiny")))
    for name, notes in NOTES.items():
        assert set(notes) <= set(settings(get_recipe(name))), name


def test_real_recipes_decode_as_method_says_until_measured_at_their_scale():
    """The leftmost fallback and the sure EOS were measured on the shapes world only."""
    rows = {r["setting"]: r for r in explain(get_recipe("qwen3-vl-8b"))}
    for key in ("decode.fallback", "decode.sure_eos", "noise.prefix_prob", "train.label_shift"):
        assert rows[key]["value"] == METHOD[key][0] and rows[key]["why"].startswith("METHOD.md §"), rows[key]
    assert rows["decode.fallback"]["reference"] == "leftmost"  # the tiny recipe's


def test_overrides_are_shown_as_overrides_of_the_named_recipe():
    named = get_recipe("qwen3-vl-2b")
    rows = {r["setting"]: r for r in explain(get_recipe("qwen3-vl-2b", {"train.lr": "1e-5"}), named)}
    assert rows["train.lr"]["value"] == 1e-5 and rows["train.lr"]["why"] == "override (the recipe has 2e-05)"
    assert "train.kd_top_k" not in rows  # unchanged and METHOD.md's


def test_bard_recipe_prints_the_rows(capsys):
    from flows.cli import main

    assert main(["recipe", "qwen3-vl-4b", "--set", "decode.fallback=leftmost", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["setting"]: r for r in out["settings"]}
    assert rows["decode.fallback"]["why"] == "override (the recipe has 'confident')"
    assert rows["train.parallel"]["value"] == "fsdp" and "fsdp" in rows["train.parallel"]["why"]
    assert main(["recipe", "tiny"]) == 0
    text = capsys.readouterr().out
    assert "train.anchor_weight" in text and "docs/stage_budget.md" in text
    assert main(["recipe", "qwen3-vl-4b", "--set", "train.nope=1"]) == 2
    assert "no field 'nope'" in capsys.readouterr().err


def test_a_tiny_variant_keeps_the_tiny_recipes_reasons_only_where_it_keeps_its_values():
    rows = {r["setting"]: r for r in explain(get_recipe("tiny-long"))}
    assert rows["decode.fallback"]["why"] == "as the tiny recipe: " + NOTES["tiny"]["decode.fallback"]
    assert rows["decode.draft"]["why"] == NOTES["tiny-long"]["decode.draft"]  # its own value, its own reason
    # a changed value never borrows the tiny recipe's reason, and a Qwen3-VL recipe never inherits one
    changed = {r["setting"]: r for r in explain(get_recipe("tiny-long", {"decode.fallback": "confident"}),
                                                get_recipe("tiny-long"))}
    assert changed["decode.fallback"]["why"].startswith("override")
    assert unexplained(get_recipe("qwen3-vl-4b", {"data.max_tokens": "512"})) == ["data.max_tokens"]
