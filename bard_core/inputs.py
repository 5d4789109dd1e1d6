"""Sample → model inputs: chat template + processor, target = the last assistant turn.

A sample is a row of the unified schema (DESIGN.md §3): ``images`` (encoded bytes or PIL images)
and ``messages`` (``{role, content: [{type: "image"} | {type: "text", text}]}``). Every turn but the
last is prompt; the last must be the assistant's and becomes the response, followed by
``<|im_end|>``. Over-long samples are rejected with a reason, never truncated.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from PIL import Image

from bard_core.config import EOS_TOKEN
from bard_core.curation.normalise import text_of


class RejectedSample(ValueError):
    """A sample that cannot be trained on; ``reason`` is a short machine-readable name."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class EncodedSample:
    prompt_ids: torch.Tensor  # long [P]
    prompt_mm_types: torch.Tensor  # long [P]: 0 text, 1 image
    response_ids: torch.Tensor  # long [R_real]: answer tokens + <|im_end|>
    pixel_values: torch.Tensor | None  # [patches, D]
    image_grid_thw: torch.Tensor | None  # long [images, 3]
    # the AR anchor's targets, precomputed (`bard_core.train.anchor_targets`): the AR base's top-K next-token
    # ids [R_real, K] and renormalised probabilities [R_real, K] at every response token
    anchor_ids: torch.Tensor | None = None
    anchor_probs: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.prompt_ids.numel() + self.response_ids.numel())


def _pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, dict):
        image = image["bytes"]
    return Image.open(io.BytesIO(image)).convert("RGB")


def encode_prompt(messages: list[dict], images: list, processor) -> EncodedSample:
    """The prompt of a conversation whose last turn is the user's, ready to decode (an empty response)."""
    pictures = [_pil(im) for im in images]
    n_image_parts = sum(1 for m in messages for p in (m["content"] if isinstance(m["content"], list) else [])
                        if p.get("type") == "image")
    if n_image_parts != len(pictures):
        raise ValueError(f"the prompt has {n_image_parts} image parts and {len(pictures)} images")
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=pictures or None, return_tensors="pt")
    return EncodedSample(prompt_ids=enc["input_ids"][0], prompt_mm_types=enc["mm_token_type_ids"][0].long(),
                         response_ids=torch.zeros(0, dtype=torch.long), pixel_values=enc.get("pixel_values"),
                         image_grid_thw=enc.get("image_grid_thw"))


IMAGE_PLACEHOLDER = "<image>"


def context_messages(context: str, n_images: int) -> list[dict]:
    """One user turn from a benchmark context whose ``<image>`` placeholders mark where its images go
    (lm-eval's convention); a context without placeholders gets its images first, as the chat templates
    of Qwen-VL models place them."""
    pieces = context.split(IMAGE_PLACEHOLDER)
    holes = len(pieces) - 1
    if holes == 0:
        parts = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": context}]
    elif holes == n_images:
        parts = []
        for k, piece in enumerate(pieces):
            if piece:
                parts.append({"type": "text", "text": piece})
            if k < holes:
                parts.append({"type": "image"})
    else:
        raise ValueError(f"the context has {holes} {IMAGE_PLACEHOLDER} placeholders for {n_images} images")
    return [{"role": "user", "content": parts}]


def encode_sample(sample: dict, processor, max_tokens: int) -> EncodedSample:
    """Tokenise one conversation; raises RejectedSample (reason) when it cannot be used."""
    messages = sample["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise RejectedSample("no_assistant_target", "the last turn must be the assistant's")
    answer = text_of(messages[-1])
    if not answer.strip():
        raise RejectedSample("empty_answer", "the assistant's last turn is empty")
    images = [_pil(im) for im in (sample.get("images") or [])]
    n_image_parts = sum(1 for m in messages for p in (m["content"] if isinstance(m["content"], list) else [])
                        if p.get("type") == "image")
    if n_image_parts != len(images):
        raise RejectedSample("image_count_mismatch", f"{n_image_parts} image parts, {len(images)} images")

    prompt_text = processor.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    enc = processor(text=[prompt_text], images=images or None, return_tensors="pt")
    tokenizer = processor.tokenizer
    response = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids(EOS_TOKEN)]
    prompt_ids = enc["input_ids"][0]
    total = prompt_ids.numel() + len(response)
    if total > max_tokens:
        raise RejectedSample("over_token_cap", f"{total} tokens > cap {max_tokens}")
    return EncodedSample(
        prompt_ids=prompt_ids,
        prompt_mm_types=enc["mm_token_type_ids"][0].long(),
        response_ids=torch.tensor(response, dtype=torch.long),
        pixel_values=enc.get("pixel_values"),
        image_grid_thw=enc.get("image_grid_thw"),
    )


def conversation(question: str, answer: str, images: list | None = None) -> dict:
    """A one-turn unified-schema sample (images first, then the question)."""
    images = images or []
    user = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    return {"images": images, "messages": [{"role": "user", "content": user},
                                           {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}
