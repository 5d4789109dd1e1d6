"""Shapes-world conversations in the unified sample schema, drawn directly from the world generator
(for unit tests, benchmarks and AR pre-training; the pipeline itself trains on curated parquet)."""

from __future__ import annotations

import random

from bard_core.shapes import world


def conversations(n: int, seed: int = 0, families: list[str] | None = None,
                  weights: dict[str, float] | None = None) -> list[dict]:
    """`n` one-turn samples ``{images: [PIL], messages: [...]}``; families cycle through `families` when
    given, else are drawn by `weights` (default ``world.FAMILY_WEIGHTS``)."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        scene = world.random_scene(rng)
        family = families[k % len(families)] if families else None
        _, question, answer = world.ask(scene, rng, family, weights)
        out.append({
            "images": [world.render(scene)],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
        })
    return out
