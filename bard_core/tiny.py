"""The tiny Qwen3-VL family: a byte-level BPE tokenizer trained on shapes-world text, an image-only
processor, a chat template, and a random-initialised ``Qwen3VLForConditionalGeneration`` whose size
comes from ``ModelConfig``. ``save_tiny_model`` writes an HF directory that the Auto classes load
offline after ``import bard_core``.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers import Qwen2VLImageProcessorPil as Qwen2VLImageProcessor  # no torchvision needed

from bard_core.config import EOS_TOKEN, MASK_TOKEN, SPECIAL_TOKENS, ModelConfig
from bard_core.processor import ImageOnlyQwen3VLProcessor
from bard_core.shapes import world

# Qwen's chat layout: <|im_start|>role\n…<|im_end|>\n; an image part becomes the vision span.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
TOKENIZER_CORPUS_SEED = 1234


def build_tokenizer(vocab_size: int, with_mask: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the shapes world's text; the Qwen specials and <|mask|> come first
    (`with_mask=False`: no <|mask|>, like the hub's Qwen3-VL tokenizers)."""
    specials = [t for t in SPECIAL_TOKENS if with_mask or t != MASK_TOKEN]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    chat_words = ["user", "assistant", "system", "\n"]
    tokenizer.train_from_iterator(world.corpus(random.Random(TOKENIZER_CORPUS_SEED)) + chat_words, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token="<|endoftext|>",
                                   additional_special_tokens=[t for t in specials
                                                              if t not in (EOS_TOKEN, "<|endoftext|>")],
                                   chat_template=CHAT_TEMPLATE)
    if with_mask:
        fast.mask_token = MASK_TOKEN
    return fast


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def build_image_processor(cfg: ModelConfig) -> Qwen2VLImageProcessor:
    unit = cfg.patch_size * cfg.spatial_merge_size  # one visual token covers unit² pixels
    return Qwen2VLImageProcessor(patch_size=cfg.patch_size, merge_size=cfg.spatial_merge_size, temporal_patch_size=2,
                                 size={"shortest_edge": unit * unit, "longest_edge": 16 * unit * unit})


def build_processor(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast | None = None) -> ImageOnlyQwen3VLProcessor:
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg.vocab_size)
    return ImageOnlyQwen3VLProcessor(image_processor=build_image_processor(cfg), tokenizer=tokenizer,
                                     chat_template=CHAT_TEMPLATE)


def build_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast, spare_rows: int = 0) -> Qwen3VLConfig:
    ids = tokenizer.convert_tokens_to_ids
    text = {
        "vocab_size": len(tokenizer) + spare_rows, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings, "pad_token_id": ids("<|endoftext|>"),
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                            "mrope_section": list(cfg.mrope_section), "mrope_interleaved": True},
    }
    vision = {
        "depth": cfg.vision_depth, "hidden_size": cfg.vision_hidden_size, "num_heads": cfg.vision_num_heads,
        "intermediate_size": cfg.vision_intermediate_size, "patch_size": cfg.patch_size,
        "spatial_merge_size": cfg.spatial_merge_size, "temporal_patch_size": 2,
        "out_hidden_size": cfg.hidden_size,
        "num_position_embeddings": cfg.vision_num_position_embeddings,
        "deepstack_visual_indexes": list(cfg.deepstack_visual_indexes),
    }
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                           video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                           vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)
    config.eos_token_id = ids(EOS_TOKEN)
    config.pad_token_id = ids("<|endoftext|>")
    return config


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast,
                spare_rows: int = 0) -> Qwen3VLForConditionalGeneration:
    torch.manual_seed(cfg.seed)
    model = Qwen3VLForConditionalGeneration(build_config(cfg, tokenizer, spare_rows))
    # HF initialises the learned vision position table with std 0.02, ~30x weaker than the patch
    # features: the vision tokens then barely know which cell they are (measured; see issue notes).
    with torch.no_grad():
        model.model.visual.pos_embed.weight.normal_(0.0, cfg.pos_embed_std)
    return model.to(getattr(torch, cfg.dtype)).eval()


def save_tiny_model(out: str | Path, cfg: ModelConfig | None = None) -> Path:
    """Write config, safetensors weights, tokenizer, processor and chat template to `out`."""
    cfg = cfg or ModelConfig()
    out = Path(out)
    processor = build_processor(cfg)
    model = build_model(cfg, processor.tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "bard_model.json").write_text(json.dumps(
        {"family": "tiny", "world_version": world.WORLD_VERSION, "mask_token": MASK_TOKEN,
         "mask_token_id": processor.tokenizer.convert_tokens_to_ids(MASK_TOKEN),
         "parameters": sum(p.numel() for p in model.parameters())}, indent=1))
    return out


HUB_LIKE_SPARE_ROWS = 8  # embedding rows past the tokenizer, like Qwen3-VL's 151,936 rows for ~151,670 tokens


def save_hub_like_model(out: str | Path, cfg: ModelConfig | None = None) -> tuple[Path, int]:
    """A tiny Qwen3-VL shaped like a hub checkpoint for the mask token: its tokenizer has no <|mask|> and
    its embedding has spare rows past the tokenizer; the mask id a recipe must name (``model.mask_token_id``,
    as the qwen3 recipes name 151671) is the second spare row. Returns (directory, mask id)."""
    cfg = cfg or ModelConfig()
    out = Path(out)
    processor = build_processor(cfg, build_tokenizer(cfg.vocab_size, with_mask=False))
    model = build_model(cfg, processor.tokenizer, spare_rows=HUB_LIKE_SPARE_ROWS)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    mask_id = len(processor.tokenizer) + 1
    (out / "bard_model.json").write_text(json.dumps(
        {"family": "hub-like", "world_version": world.WORLD_VERSION, "mask_token": None, "mask_token_id": mask_id,
         "parameters": sum(p.numel() for p in model.parameters())}, indent=1))
    return out, mask_id
