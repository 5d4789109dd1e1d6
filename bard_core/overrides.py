"""Overrides: strings from the CLI, the Prefect UI's forms or lm-eval's model_args, turned into settings.

`apply_overrides(recipe, {"train.lr": "1e-4"})` replaces dotted fields of a recipe; `coerce` turns one string
into the type of the value it replaces (the one parser every entry point uses). Standard library only.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from bard_core.config import RECIPE_SECTIONS, Recipe


def coerce(current: Any, value: Any, key: str) -> Any:
    """Turn a CLI/UI string into the type of the field it replaces."""
    if not isinstance(value, str) or isinstance(current, str):
        return value
    if isinstance(current, bool):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"override {key}={value!r}: expected true/false")
    if isinstance(current, (int, float)) or current is None:
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            if current is None:
                return value
            raise ValueError(f"override {key}={value!r}: expected a number") from None
    if isinstance(current, (tuple, list, dict)):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"override {key}={value!r}: expected JSON") from None
        return tuple(parsed) if isinstance(current, tuple) else parsed
    return value


def apply_overrides(recipe: Recipe, overrides: dict[str, Any] | None) -> Recipe:
    """Apply dotted overrides, e.g. ``{"train.lr": 1e-4, "noise.kind": "mask"}``; unknown keys raise. A section's
    overrides are applied together and then checked, so their order never matters (train.label_shift=false with
    train.anchor_weight=0 is valid either way round)."""
    changes: dict[str, dict[str, Any]] = {}
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if not name:
            if section not in {f.name for f in dataclasses.fields(Recipe)} or section in RECIPE_SECTIONS:
                raise ValueError(f"override {key!r}: expected SECTION.FIELD with SECTION one of "
                                 f"{', '.join(RECIPE_SECTIONS)}")
            recipe = dataclasses.replace(recipe, **{section: coerce(getattr(recipe, section), value, key)})
            continue
        if not hasattr(recipe, section) or not dataclasses.is_dataclass(getattr(recipe, section)):
            raise ValueError(f"override {key!r}: unknown section {section!r}")
        sub = getattr(recipe, section)
        names = [f.name for f in dataclasses.fields(sub)]
        if name not in names:
            raise ValueError(f"override {key!r}: {section} has no field {name!r}; valid: {', '.join(names)}")
        changes.setdefault(section, {})[name] = coerce(getattr(sub, name), value, key)
    for section, fields in changes.items():
        sub = getattr(recipe, section)
        if section == "train":  # one value for every stage beats the per-stage ones, given here too (ablation plans)
            stages = dataclasses.replace(sub, stages=fields.get("stages", sub.stages)).stages  # int keys
            fields["stages"] = {b: {k: v for k, v in e.items() if k not in fields} for b, e in stages.items()}
        recipe = dataclasses.replace(recipe, **{section: dataclasses.replace(sub, **fields)})
    return recipe
