"""Shared by the layout and objective tests: shapes samples and reference forwards (the `kit` fixture, a tiny
Qwen3-VL with its processor and noise spec, is in conftest.py)."""

from __future__ import annotations

import random

import torch

from bard_core.inputs import conversation, encode_sample
from bard_core.layout import rope_positions
from bard_core.masks import attention_mask
from bard_core.shapes import world


def sample(processor, seed: int, family: str = "extract", images: int = 1, max_tokens: int = 512):
    rng = random.Random(seed)
    scene = world.random_scene(rng)
    _, question, answer = world.ask(scene, rng, family)
    pictures = [world.render(scene)] + [world.render(world.random_scene(rng)) for _ in range(images - 1)]
    return encode_sample(conversation(question, answer, pictures[:images]), processor, max_tokens)


def full_logits(model, batch, row: int = 0) -> torch.Tensor:
    with torch.no_grad():
        out = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids, pixel_values=batch.pixel_values,
                          image_grid_thw=batch.image_grid_thw, mm_token_type_ids=batch.mm_token_type_ids)
        return model.lm_head(out.last_hidden_state)[row]


def separate_block_logits(model, enc, x0, xt, b: int, B: int, prompt_mask: str) -> torch.Tensor:
    """A separate forward over [prompt ‖ clean blocks < b ‖ noisy block b] under the inference mask."""
    P = enc.prompt_ids.numel()
    ids = torch.cat([enc.prompt_ids, x0[: b * B], xt[b * B:(b + 1) * B]])
    types = torch.cat([enc.prompt_mm_types, torch.zeros((b + 1) * B, dtype=torch.long)])
    pos = rope_positions(model, ids, types, enc.image_grid_thw)
    mask = attention_mask(P, (b + 1) * B, B, prompt_mask, with_noisy=False)[None, None]
    with torch.no_grad():
        out = model.model(input_ids=ids[None], attention_mask=mask, position_ids=pos[:, None],
                          pixel_values=enc.pixel_values, image_grid_thw=enc.image_grid_thw,
                          mm_token_type_ids=types[None])
        return model.lm_head(out.last_hidden_state)[0, P + b * B:]
