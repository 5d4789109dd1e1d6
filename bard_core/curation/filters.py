"""Row filters with named reject reasons (pure; applied per row inside Ray Data batches).

``check_row`` runs, in order: images (decode, decompression-bomb cap, unsupported modes converted
to RGB where safe, size and aspect limits, 64-bit pHash and colour signature), text (a user turn and a non-empty final
assistant turn), FineVision ratings (every ``*_min`` ≥ the recipe threshold), and the token estimate
(text tokens + image tokens of the recipe's processor) against the cap. The first failure names
the row's ``reason``; a passing row leaves with ``phash``, ``colour`` and ``num_tokens`` filled in.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

from PIL import Image

from bard_core.config import DataConfig
from bard_core.curation.dedup import colour_signature, phash64
from bard_core.curation.normalise import RATINGS, text_of

SAFE_CONVERSIONS = {"CMYK", "P", "PA", "LA", "L", "1", "I;16", "I;16B", "I;16L", "I", "F", "RGBA"}


def inspect_image(data: bytes, cfg: DataConfig) -> tuple[bytes, int, bytes, tuple[int, int]] | str:
    """(bytes to keep, pHash, colour signature, (w, h)) or a reject reason. Original bytes are kept unless
    converted."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
                if width * height > cfg.max_image_pixels:
                    return "image_too_many_pixels"
                probe.verify()
            image = Image.open(io.BytesIO(data))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "image_too_many_pixels"
    except Exception:  # noqa: BLE001 — PIL raises many types for broken files; all mean "undecodable"
        return "image_undecodable"
    if min(width, height) < cfg.min_image_side:
        return "image_too_small"
    if max(width, height) / min(width, height) > cfg.max_aspect_ratio:
        return "image_too_elongated"
    if image.mode != "RGB":
        if image.mode not in SAFE_CONVERSIONS:
            return f"image_mode_unsupported:{image.mode}"
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit: scale to 8-bit first
            import numpy as np

            array = np.asarray(image, dtype=np.float64)
            span = max(float(array.max() - array.min()), 1e-9)
            image = Image.fromarray(((array - array.min()) / span * 255).astype("uint8"), "L")
        image = image.convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    return data, phash64(image), colour_signature(image), image.size


def check_row(row: dict, cfg: DataConfig, count_tokens: Callable[[str, list[tuple[int, int]]], int]) -> dict:
    if row.get("reason"):
        return row
    images, hashes, colours, sizes = [], [], [], []
    for data in row["images"]:
        result = inspect_image(data, cfg)
        if isinstance(result, str):
            return {**row, "reason": result}
        images.append(result[0]), hashes.append(result[1]), colours.append(result[2]), sizes.append(result[3])
    messages = row["messages"]
    n_image_parts = sum(1 for m in messages for p in m["content"] if p.get("type") == "image")
    if n_image_parts != len(images):
        return {**row, "reason": "image_placeholder_mismatch"}
    if not any(m["role"] == "user" and (text_of(m).strip() or images) for m in messages):
        return {**row, "reason": "empty_user_text"}
    if not messages or messages[-1]["role"] != "assistant" or not text_of(messages[-1]).strip():
        return {**row, "reason": "empty_answer"}
    quality = row.get("quality")
    if quality is not None:
        low = [r for r in RATINGS if quality.get(r) is not None and quality[r] < cfg.min_rating]
        if low:
            return {**row, "reason": f"low_rating:{low[0]}"}
    text = "\n".join(text_of(m) for m in messages)
    num_tokens = count_tokens(text, sizes) + 5 * len(messages)  # + chat-template tokens per turn
    if num_tokens > cfg.max_tokens:
        return {**row, "images": images, "phash": hashes, "colour": colours, "num_tokens": num_tokens,
                "reason": "over_token_cap"}
    return {**row, "images": images, "phash": hashes, "colour": colours, "num_tokens": num_tokens}


class TokenCounter:
    """Text tokens with the recipe's tokenizer + image tokens as the processor would place them."""

    def __init__(self, processor_path: str):
        from transformers import AutoProcessor

        import bard_core  # noqa: F401  (registers the image-only processor)

        self.processor = AutoProcessor.from_pretrained(processor_path)

    def __call__(self, text: str, sizes: list[tuple[int, int]]) -> int:
        n = len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        if sizes:
            mm = self.processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in sizes])
            n += sum(mm["num_image_tokens"]) + 2 * len(sizes)  # + vision start/end
        return n
