"""What a recipe's settings rest on (issue 22): METHOD.md's values, and a stated reason (`recipes.NOTES`) for
every setting of a recipe that departs from them or, for the Qwen3-VL recipes, from the tiny recipe.

`explain(recipe)` lists those settings with their reasons (`bard recipe NAME`); `unexplained(recipe)` names the
ones without a reason and `stale_notes(name)` the reasons that explain nothing — tests keep both empty for every
named recipe, so a new knob or a changed default cannot slip into a real run unstated. Standard library only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bard_core.config import RECIPE_SECTIONS, Recipe

# METHOD.md's value of a setting and where it says so (the paper and its reference code, as METHOD.md reads them)
METHOD: dict[str, tuple[Any, str]] = {
    "noise.kind": ("mixed", "§3: the paper's mixed-noise scheduler"),
    "noise.t_min": (0.05, "§3: t clamped to [t_min, 1]"),
    "noise.prefix_prob": (0.0, "§3: stratified i.i.d. levels only"),
    "train.block_sizes": ((4, 8, 16, 32), "§5"),
    "train.prompt_mask": ("causal", "§2: causal prompt rows"),
    "train.label_shift": (False, "§2: position k predicts token k"),
    "train.keep_loss_weight": (0.0, "§3: loss on masked or substituted positions only"),
    "train.anchor_weight": (0.0, "§4: CE + KD only"),
    "train.teacher": ("previous", "§4: the previous stage teaches"),
    "train.targets": ("data", "§5: the curated answers"),
    "train.ce_weight": (1.0, "§4"),
    "train.kd_weight": (0.5, "§4"),
    "train.kd_top_k": (16, "§4"),
    "train.kd_temperature": (1.0, "§4"),
    "train.lr": (2e-5, "§5"),
    "train.vision_lr_scale": (0.1, "§5: vision 2e-6"),
    "train.distill_lr_scale": (0.3, "§5: distillation 6e-6"),
    "train.weight_decay": (0.0, "§5"),
    "train.base_pull": (0.0, "§5: plain AdamW, nothing pulls towards the stage's start"),
    "train.betas": ((0.9, 0.95), "§5"),
    "train.batch_size": (256, "§5: global batch"),
    "train.warmup_steps": (100, "§5"),
    "train.min_lr_ratio": (0.0, "§5: cosine"),
    "train.distill_min_lr_ratio": (0.5, "§5: cosine to 0.5×"),
    "data.max_tokens": (8192, "§5: max length"),
    "decode.mode": ("dynamic", "§6"),
    "decode.fallback": ("confident", "§6: at least the single most confident position"),
    "decode.sure_eos": (False, "§6: every masked position above τ, <|im_end|> included"),
}


def settings(recipe: Recipe) -> dict[str, Any]:
    """Every setting of `recipe` by dotted name (``train.lr``), tuples kept as tuples."""
    out = {}
    for section in RECIPE_SECTIONS:
        part = getattr(recipe, section)
        for f in dataclasses.fields(part):
            out[f"{section}.{f.name}"] = getattr(part, f.name)
    return out


def reference(recipe: Recipe) -> tuple[str, Recipe]:
    """What a recipe is compared with besides METHOD.md, and its name: the tiny recipe, and for the tiny recipe
    the settings' defaults (`bard_core.config`)."""
    from bard_core.recipes import tiny

    return ("the settings' defaults", Recipe(name="defaults")) if recipe.name == "tiny" else \
        ("the tiny recipe", tiny())


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(a)))
        except (TypeError, ValueError):
            return False
    return a == b


def explain(recipe: Recipe, named: Recipe | None = None) -> list[dict[str, Any]]:
    """One row per setting that departs from METHOD.md or from its `reference`, or that an override
    changed from the named recipe `named`: its value, METHOD.md's and the reference's, and why."""
    from bard_core.recipes import NOTES

    notes = NOTES.get(recipe.name, {})
    ref_name, ref_recipe = reference(recipe)
    # a variant of the tiny recipe keeps the tiny recipe's reasons where it keeps its values (same base, same world)
    inherited = NOTES.get(ref_recipe.name, {}) if recipe.model.base == ref_recipe.model.base == "tiny" else {}
    mine, ref = settings(recipe), settings(ref_recipe)
    base = settings(named) if named is not None else mine
    rows = []
    for key, value in mine.items():
        method = METHOD.get(key)
        off_method = method is not None and not _same(value, method[0])
        off_ref = not _same(value, ref[key])
        overridden = not _same(value, base[key])
        if not (off_method or off_ref or overridden):
            continue
        if overridden:
            why = f"override (the recipe has {base[key]!r})"
        elif key in notes:
            why = notes[key]
        elif not off_ref and key in inherited:
            why = f"as {ref_name}: {inherited[key]}"
        elif not off_method and method is not None:
            why = f"METHOD.md {method[1]}"
        else:
            why = None
        rows.append({"setting": key, "value": value, "method": method[0] if method else None,
                     "method_ref": method[1] if method else None, "reference": ref[key], "why": why})
    return rows


def unexplained(recipe: Recipe) -> list[str]:
    """Settings of a named recipe that depart from METHOD.md or its reference with no reason given."""
    return [r["setting"] for r in explain(recipe) if r["why"] is None]


def stale_notes(name: str) -> list[str]:
    """Reasons in `recipes.NOTES[name]` for settings that do not exist or depart from nothing."""
    from bard_core.recipes import NOTES, get_recipe

    recipe = get_recipe(name)
    departing = {r["setting"] for r in explain(recipe)}
    return sorted(k for k in NOTES.get(name, {}) if k not in departing)


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a plain-text table (`bard recipe`)."""
    def show(v: Any) -> str:
        return "-" if v is None else json_like(v)

    lines = [f"{'setting':<30} {'value':<22} {'METHOD.md':<12} {'reference':<12} why"]
    for r in rows:
        lines.append(f"{r['setting']:<30} {show(r['value']):<22} {show(r['method']):<12} {show(r['reference']):<12} "
                     f"{r['why']}")
    return "\n".join(lines)


def json_like(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {json_like(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(json_like(x) for x in v) + "]"
    return str(v)
