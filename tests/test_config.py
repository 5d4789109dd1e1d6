"""Config validation: impossible values raise ValueError naming the field; recipes and overrides."""

from __future__ import annotations

import pytest

from bard_core.config import (
    DataConfig,
    DecodeConfig,
    GateConfig,
    ModelConfig,
    NoiseConfig,
    Recipe,
    TrainConfig,
)
from bard_core.overrides import apply_overrides
from bard_core.recipes import NOTES, RECIPES, get_recipe


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (ModelConfig, {"attn_implementation": "eager"}, "attn_implementation"),
        (ModelConfig, {"dtype": "float64"}, "dtype"),
        (ModelConfig, {"num_attention_heads": 4, "num_key_value_heads": 3}, "num_key_value_heads"),
        (ModelConfig, {"head_dim": 32, "mrope_section": (8, 8, 8)}, "mrope_section"),
        (ModelConfig, {"deepstack_visual_indexes": (5,)}, "deepstack_visual_indexes"),
        (ModelConfig, {"hidden_size": 0}, "hidden_size"),
        (NoiseConfig, {"kind": "gaussian"}, "kind"),
        (NoiseConfig, {"t_min": 0.0}, "t_min"),
        (NoiseConfig, {"prefix_prob": 1.5}, "prefix_prob"),
        (TrainConfig, {"block_sizes": (8, 4)}, "block_sizes"),
        (TrainConfig, {"block_sizes": ()}, "block_sizes"),
        (TrainConfig, {"prompt_mask": "bidirectional"}, "prompt_mask"),
        (TrainConfig, {"pad_loss_weight": 0.3}, "pad_loss_weight"),
        (TrainConfig, {"keep_loss_weight": -1.0}, "keep_loss_weight"),
        (TrainConfig, {"lr": -1.0}, "lr"),
        (TrainConfig, {"ce_weight": 0.0, "kd_weight": 0.0}, "ce_weight"),
        (TrainConfig, {"vision_lr_scale": -0.1}, "vision_lr_scale"),
        (TrainConfig, {"distill_lr_scale": 0.0}, "distill_lr_scale"),
        (DecodeConfig, {"threshold": 1.5}, "threshold"),
        (DecodeConfig, {"mode": "greedy"}, "mode"),
        (DecodeConfig, {"fallback": "random"}, "fallback"),
        (DecodeConfig, {"block_size": 4, "tokens_per_step": 8}, "tokens_per_step"),
        (GateConfig, {"tolerance": {"nope": 0.1}}, "tolerance"),
        (GateConfig, {"speed_benchmark": "nope"}, "speed_benchmark"),
        (DataConfig, {"phash_threshold": 40}, "phash_threshold"),
        (DataConfig, {"weights": {"a": 0.0}}, "weights"),
    ],
)
def test_impossible_values_raise_with_the_field_name(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_recipe_rejects_speed_gates_for_unknown_block_sizes():
    with pytest.raises(ValueError, match="min_tpf"):
        Recipe(name="x", train=TrainConfig(block_sizes=(4, 8)))


@pytest.mark.parametrize("name", list(RECIPES))
def test_named_recipes_build(name):
    recipe = get_recipe(name)
    assert recipe.name == name
    assert recipe.train.block_sizes == (4, 8, 16, 32)
    assert recipe.noise.kind == "mixed" or "noise.kind" in NOTES[name]  # METHOD.md's, or a measured reason


def test_tiny_recipe_shifts_labels_and_real_recipes_follow_the_reference():
    assert get_recipe("tiny").train.label_shift is True
    assert get_recipe("qwen3-vl-4b").train.label_shift is False


def test_real_recipes_point_at_the_hub_and_the_unused_mask_row():
    recipe = get_recipe("qwen3-vl-4b")
    assert recipe.model.base == "Qwen/Qwen3-VL-4B-Instruct"
    assert recipe.model.mask_token_id == 151671
    assert "chartqa" in recipe.gate.benchmarks


def test_unknown_recipe_lists_valid_names():
    with pytest.raises(ValueError, match="tiny"):
        get_recipe("gpt-5")


def test_overrides_coerce_strings_and_validate():
    recipe = get_recipe("tiny", {"train.lr": "0.01", "noise.kind": "mask", "train.block_sizes": "[4, 8, 16, 32]",
                                 "train.label_shift": "true"})
    assert recipe.train.lr == 0.01 and recipe.noise.kind == "mask" and recipe.train.label_shift is True
    with pytest.raises(ValueError, match="kind"):
        apply_overrides(recipe, {"noise.kind": "gaussian"})
    with pytest.raises(ValueError, match="no field 'nope'"):
        apply_overrides(recipe, {"train.nope": 1})
    with pytest.raises(ValueError, match="unknown section"):
        apply_overrides(recipe, {"bogus.lr": 1})
    with pytest.raises(ValueError, match="expected a number"):
        apply_overrides(recipe, {"train.lr": "fast"})


def test_a_stage_is_retrained_for_what_its_weights_depend_on_only():
    from tasks.train import training_payload

    tiny = training_payload(get_recipe("tiny"), 8)
    assert tiny == training_payload(get_recipe("tiny"), 8)
    assert tiny == training_payload(get_recipe("tiny", {"gate.min_tpf": '{"8": 9}', "decode.threshold": 0.5}), 8)
    assert tiny != training_payload(get_recipe("tiny", {"noise.prefix_prob": 0.25}), 8)
    assert tiny != training_payload(get_recipe("tiny", {"train.lr": 0.5}), 8)
    assert tiny != training_payload(get_recipe("tiny"), 4)  # the stages' own schedules differ


def test_each_stage_takes_its_own_schedule_unless_a_setting_is_overridden_for_all():
    tiny = get_recipe("tiny").train
    assert (tiny.for_stage(4).merge_steps, tiny.for_stage(4).distill_steps, tiny.for_stage(4).lr) == (450, 0, 2.5e-4)
    assert (tiny.for_stage(32).merge_steps, tiny.for_stage(32).distill_steps) == (420, 60)
    assert tiny.for_stage(None).lr == tiny.lr and tiny.for_stage(4).stages == {}
    every = get_recipe("tiny", {"train.merge_steps": "40"}).train
    assert every.for_stage(4).merge_steps == every.for_stage(32).merge_steps == 40
    assert every.for_stage(4).lr == 2.5e-4  # the other per-stage settings stay
    # given together (an ablation's per-stage budget over a user's schedule), the every-stage value still wins
    both = get_recipe("tiny", {"train.stages": '{"32": {"merge_steps": 420, "distill_steps": 60, "lr": 1e-3}}',
                               "train.merge_steps": "1210", "train.distill_steps": "0"}).train
    assert (both.for_stage(32).merge_steps, both.for_stage(32).distill_steps, both.for_stage(32).lr) == (1210, 0, 1e-3)
    with pytest.raises(ValueError, match="stages"):
        get_recipe("tiny", {"train.stages": '{"8": {"warmup_steps": 3}}'})
    with pytest.raises(ValueError, match="lr"):
        get_recipe("tiny", {"train.stages": '{"8": {"lr": -1}}'})


def test_a_stage_can_set_its_own_long_share_and_a_bad_share_is_refused():
    train = get_recipe("tiny", {"train.stages": '{"4": {"long_share": "0.5"}, "8": {"merge_steps": 3}}'}).train
    assert train.for_stage(4).long_share == 0.5 and train.for_stage(8).long_share == 0.0
    with pytest.raises(ValueError, match="long_share"):
        get_recipe("tiny", {"train.stages": '{"4": {"long_share": 1}}'})
    with pytest.raises(ValueError, match="long_share"):
        get_recipe("tiny", {"train.long_share": "-0.1"})
