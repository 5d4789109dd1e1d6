"""The tiny Qwen3-VL family: tokenizer, processor, model, save/load through the Auto classes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import bard_core  # noqa: F401  (registers the image-only processor)
from bard_core.config import MASK_TOKEN, SPECIAL_TOKENS, ModelConfig
from bard_core.shapes import world
from bard_core.tiny import build_model, build_processor, build_tokenizer


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir), AutoModelForImageTextToText.from_pretrained(tiny_model_dir)


def test_special_tokens_come_first_with_fixed_ids():
    tok = build_tokenizer(512)
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))
    assert tok.mask_token == MASK_TOKEN and tok.mask_token_id == SPECIAL_TOKENS.index(MASK_TOKEN)
    assert tok.eos_token == "<|im_end|>"


@pytest.mark.parametrize("text", ["What colour is the shape in cell B2?", "A1: red circle\nA2: empty",
                                  "unseen wörds ünïcode 123 !?", ""])
def test_tokenizer_round_trips_any_text(text):
    tok = build_tokenizer(512)
    assert tok.decode(tok(text)["input_ids"]) == text


def test_tokenizer_is_trained_on_the_world_text():
    tok = build_tokenizer(512)
    # BPE merges make world words single tokens: far fewer tokens than bytes.
    text = world.extract_answer(world.random_scene(__import__("random").Random(0)))
    assert len(tok(text)["input_ids"]) < len(text.encode()) / 2
    assert len(tok(text)["input_ids"]) >= 40  # the long listing is long (≥ 40 tokens)


def test_specials_are_never_split():
    tok = build_tokenizer(512)
    ids = tok("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|mask|><|im_end|>")["input_ids"]
    assert [tok.convert_ids_to_tokens(i) for i in ids if i < len(SPECIAL_TOKENS)] == [
        "<|im_start|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|mask|>", "<|im_end|>"]


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (160, 96), (96, 224)])
def test_image_tokens_match_the_grid(size):
    processor = build_processor(ModelConfig())
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    enc = processor(text=[text], images=[Image.new("RGB", size, (200, 10, 10))], return_tensors="pt")
    merge = processor.image_processor.merge_size
    n_image = int((enc["input_ids"] == processor.image_token_id).sum())
    assert n_image == int(enc["image_grid_thw"].prod()) // merge**2
    assert int(enc["mm_token_type_ids"].sum()) == n_image
    assert enc["pixel_values"].shape[0] == int(enc["image_grid_thw"].prod())


def test_one_visual_token_per_cell():
    processor = build_processor(ModelConfig())
    enc = processor.image_processor(images=[world.render(world.random_scene(__import__("random").Random(1)))],
                                    return_tensors="pt")
    assert enc["image_grid_thw"].tolist() == [[1, 2 * world.GRID, 2 * world.GRID]]  # 9 merged tokens


def test_chat_template_is_qwen_layout():
    processor = build_processor(ModelConfig())
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A"}]}]
    assert processor.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n")


def test_vision_position_table_uses_a_strong_init():
    cfg = ModelConfig()
    model = build_model(cfg, build_tokenizer(cfg.vocab_size))
    std = model.model.visual.pos_embed.weight.std().item()
    assert abs(std - cfg.pos_embed_std) < 0.05


def test_save_then_load_gives_identical_logits(tiny_model_dir, loaded):
    processor, model = loaded
    assert model.config._attn_implementation == "sdpa"
    assert type(processor).__name__ == "ImageOnlyQwen3VLProcessor"
    cfg = ModelConfig()
    fresh = build_model(cfg, processor.tokenizer)  # same seed → the same weights as the saved model
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is in A1?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    enc = processor(text=[text], images=[world.render(world.random_scene(__import__("random").Random(3)))],
                    return_tensors="pt")
    with torch.no_grad():
        a, b = model(**enc).logits, fresh(**enc).logits
    assert torch.equal(a, b)
    info = json.loads((tiny_model_dir / "bard_model.json").read_text())
    assert info["mask_token_id"] == processor.tokenizer.mask_token_id
    assert info["world_version"] == world.WORLD_VERSION


def test_auto_classes_load_in_a_fresh_process_after_import_bard_core(tiny_model_dir):
    code = ("import bard_core\nfrom transformers import AutoProcessor, AutoModelForImageTextToText\n"
            f"p = AutoProcessor.from_pretrained({str(tiny_model_dir)!r})\n"
            f"m = AutoModelForImageTextToText.from_pretrained({str(tiny_model_dir)!r})\n"
            "print(type(p).__name__, type(m).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ImageOnlyQwen3VLProcessor", "Qwen3VLForConditionalGeneration"]


def test_registration_survives_an_availability_check_before_transformers_is_imported(tiny_model_dir):
    """lm-eval and others call importlib.util.find_spec("transformers") to see if it is installed;
    that lookup must not use up the deferred registration."""
    code = ("import importlib.util, bard_core\nassert importlib.util.find_spec('transformers')\n"
            "from transformers import AutoProcessor\n"
            f"print(type(AutoProcessor.from_pretrained({str(tiny_model_dir)!r})).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ImageOnlyQwen3VLProcessor"]
