"""The settings dataclasses' checks: each raises ``ValueError`` naming the class, the field and what is allowed
(standard library only, as `bard_core.config`)."""

from __future__ import annotations

from typing import Any


def fail(cls: str, name: str, value: Any, expected: str) -> None:
    raise ValueError(f"{cls}.{name}={value!r} is invalid: expected {expected}")


def check_choice(cls: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        fail(cls, name, value, f"one of {', '.join(map(str, choices))}")


def check_positive(cls: str, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            fail(cls, name, value, "a positive number")
