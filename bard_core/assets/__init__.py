"""Artifacts shipped inside the package: the pretrained tiny AR base (an HF directory).

``shipped_base()`` is what the `tiny` recipe starts from (standing in for downloading Qwen3-VL);
``check_shipped_base()`` refuses a base trained on another world version or tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_BASE = Path(__file__).resolve().parent / "tiny_base"


def shipped_base() -> Path:
    if not (TINY_BASE / "model.safetensors").exists():
        raise FileNotFoundError(f"the shipped tiny AR base is missing at {TINY_BASE}: run `bard pretrain-tiny --out "
                                f"{TINY_BASE}` to build it")
    return TINY_BASE


def check_shipped_base(path: Path | None = None) -> dict:
    """The base's bard_model.json, after checking it belongs to this world and tokenizer (ValueError if not)."""
    from bard_core.config import ModelConfig
    from bard_core.shapes import world
    from bard_core.tiny import build_tokenizer, tokenizer_fingerprint

    path = path or shipped_base()
    info = json.loads((path / "bard_model.json").read_text())
    if info.get("world_version") != world.WORLD_VERSION:
        raise ValueError(f"shipped base was trained on world {info.get('world_version')!r}, the code is "
                         f"{world.WORLD_VERSION!r}: re-run `bard pretrain-tiny`")
    expected = tokenizer_fingerprint(build_tokenizer(ModelConfig().vocab_size))
    if info.get("tokenizer_fingerprint") != expected:
        raise ValueError("shipped base's tokenizer differs from the one the code builds: re-run `bard pretrain-tiny`")
    return info
