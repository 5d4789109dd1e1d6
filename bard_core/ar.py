"""Greedy autoregressive generation with transformers' own `generate` (KV cache, one token per
forward), batched with left padding. Used to score the AR base; the block-diffusion engine and its
AR baseline live in the decoding module."""

from __future__ import annotations

import torch

from bard_core.inputs import _pil


def prompt_messages(sample: dict) -> list[dict]:
    """The sample's turns without its final assistant answer (what the model is asked)."""
    messages = sample["messages"]
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


@torch.no_grad()
def ar_generate(model, processor, samples: list[dict], max_new_tokens: int = 96,
                batch_size: int = 32) -> list[str]:
    """Greedy answers (decoded text up to the first <|im_end|>) for unified-schema samples."""
    tokenizer = processor.tokenizer
    answers: list[str] = []
    model.eval()
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        texts = [processor.apply_chat_template(prompt_messages(s), add_generation_prompt=True, tokenize=False)
                 for s in chunk]
        images = [_pil(im) for s in chunk for im in (s.get("images") or [])]
        enc = processor(text=texts, images=images or None, return_tensors="pt", padding=True, padding_side="left")
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    return answers
