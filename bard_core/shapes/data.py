"""Shapes-world conversations in the unified sample schema, drawn directly from the world generator
(for unit tests, benchmarks and AR pre-training; the pipeline itself trains on curated parquet)."""

from __future__ import annotations

import random

from bard_core.config import CONVERSATION_FORMATS
from bard_core.shapes import world

FORMATS = CONVERSATION_FORMATS


def conversations(n: int, seed: int = 0, families: list[str] | None = None,
                  weights: dict[str, float] | None = None, formats: str = "single") -> list[dict]:
    """`n` samples ``{images: [PIL], messages: [...]}``; families cycle through `families` when given,
    else are drawn by `weights` (default ``world.FAMILY_WEIGHTS``).

    ``formats="single"``: one image, then one question (the benchmarks' format). ``"sources"``: the
    formats the synthetic LLaVA-OV / FineVision sources carry, so a base trained on them is not
    thrown by its curated data: 1–3 turns about one image (weights 6:3:1; the last one is the
    target), the image after the first question 10% of the time, and 1 in 6 samples a two-image
    comparison (`world.pair_question`).
    """
    if formats not in FORMATS:
        raise ValueError(f"formats={formats!r}: expected one of {', '.join(FORMATS)}")
    rng = random.Random(seed)
    out = []
    for k in range(n):
        family = families[k % len(families)] if families else None
        if formats == "sources" and family is None and rng.random() < 1 / 6:
            first, second = world.random_scene(rng), world.random_scene(rng)
            question, answer = world.pair_question(first, second)
            out.append({"images": [world.render(first), world.render(second)],
                        "messages": [_user(question, images=2), _assistant(answer)]})
            continue
        scene = world.random_scene(rng)
        turns = rng.choices([1, 2, 3], weights=[6, 3, 1])[0] if formats == "sources" else 1
        image_after = formats == "sources" and rng.random() < 0.1
        messages = []
        for t in range(turns):
            _, question, answer = world.ask(scene, rng, family if t == turns - 1 else None, weights)
            images = 1 if t == 0 else 0
            messages += [_user(question, images=images, image_after=image_after), _assistant(answer)]
        out.append({"images": [world.render(scene)], "messages": messages})
    return out


def _user(question: str, images: int, image_after: bool = False) -> dict:
    parts = [{"type": "image"} for _ in range(images)]
    text = [{"type": "text", "text": question}]
    return {"role": "user", "content": text + parts if image_after else parts + text}


def _assistant(answer: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": answer}]}
