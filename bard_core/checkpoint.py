"""Checkpoint directories: an HF model directory plus ``bard.json`` (what the stage that wrote it knew).

``bard.json`` carries what every reader must match: block size, label shift, prompt mask, the token
ids the stage trained with (``token_ids``: mask, eos, pad) and, once the gate has promoted it, the
decode setting it was promoted with (``decode``). Readers take their token ids and decode defaults
from here (`token_ids`, `decode_config`), never from the tokenizer alone: the hub's Qwen3-VL
tokenizers have no mask token (the recipe's id is an unused embedding row).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from bard_core import files
from bard_core.config import EOS_TOKEN, MASK_TOKEN, DecodeConfig
from bard_core.engine import TokenIds

META = "bard.json"
TRAINING_STATE = "optimizer.pt"


def read_meta(path: str | Path) -> dict:
    """The checkpoint's ``bard.json`` ({} for a directory without one, e.g. a hub model or the shipped base)."""
    meta_file = Path(path) / META
    return json.loads(meta_file.read_text()) if meta_file.exists() else {}


def save_checkpoint(model, processor, out: Path, meta: dict, meta_name: str = META,
                    state_dict: dict | None = None, training_state: dict | None = None) -> Path:
    """Write an HF directory whole or not at all (`files.staged_dir`) with its metadata file, which records
    every other file's sha256 (``files``) for `load` to verify.

    `state_dict` replaces the model's own tensors (a sharded model passes its gathered full state);
    `training_state` (optimizer and scheduler state) goes to ``optimizer.pt``.
    """
    out = Path(out)
    with files.staged_dir(out, "checkpoint") as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        processor.save_pretrained(tmp)
        if training_state is not None:
            import torch

            torch.save(training_state, tmp / TRAINING_STATE)
        meta = {**meta, "files": files.digests(tmp, exclude=(meta_name,))}
        (tmp / meta_name).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
    return out


def drop_training_state(path: str | Path) -> None:
    """Remove a finished stage's ``optimizer.pt`` and its digest (nothing resumes a finished stage)."""
    path = Path(path)
    meta = read_meta(path)
    (path / TRAINING_STATE).unlink(missing_ok=True)
    if "files" in meta:
        meta["files"].pop(TRAINING_STATE, None)
        files.write_json(path / META, meta)


def verify(path: str | Path) -> dict:
    """The checkpoint's metadata, after checking its files against the digests it records (a torn or altered
    checkpoint raises `files.CorruptFile` naming the file; a directory that records none — a hub model, the
    shipped base — is taken as it is)."""
    path = Path(path)
    recorded = {}
    for name in (META, "bard_model.json"):
        if (path / name).exists():
            recorded = json.loads((path / name).read_text()).get("files") or {}
            break
    files.verify(path, recorded)
    return read_meta(path)


def load(path: str | Path, attn_implementation: str = "sdpa"):
    """(model, processor, bard.json or {}) of a checkpoint directory. The attention implementation is always
    explicit: the block masks need SDPA or flex attention (METHOD.md §1; eager would mask nothing)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import bard_core  # noqa: F401  (registers the processor)

    meta = verify(path)
    # safetensors only: a pickled .bin in a checkpoint directory would run code when loaded
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation=attn_implementation,
                                                        use_safetensors=True)
    return model, AutoProcessor.from_pretrained(path), meta


def read_training_state(path: str | Path) -> dict:
    """A resume's optimizer/scheduler state file, loaded with ``weights_only=True``: tensors and plain
    containers only. Anything else (a planted pickle would run code on load) is refused, naming the file."""
    import pickle

    import torch

    verify(Path(path).parent)
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"{path}: refused: it holds more than tensors and plain containers, and loading it would "
                           f"run code ({reason})") from None


def mask_token_id(tokenizer, explicit: int | None = None, *, required: bool = True) -> int | None:
    """`explicit` (bard.json or the recipe's ``model.mask_token_id``), else the tokenizer's <|mask|>."""
    if explicit is not None:
        if explicit < 0:  # above the tokenizer's ids is fine: Qwen3-VL's is an unused embedding row
            raise ValueError(f"mask token id {explicit} is negative")
        return int(explicit)
    found = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    if found is None or found == tokenizer.unk_token_id:
        if required:
            raise ValueError(f"the tokenizer has no {MASK_TOKEN} token and no mask id was given: set the recipe's "
                             "model.mask_token_id (Qwen3-VL: 151671) or use a checkpoint whose bard.json names it")
        return None
    return int(found)


def untagged_stage(meta: dict) -> str | None:
    """Why a block-diffusion checkpoint cannot be block-decoded: its bard.json lacks the token ids it trained
    with (None when it has them, or is not a block-diffusion stage)."""
    if meta.get("block_size") and not meta.get("token_ids"):
        return (f"a block-diffusion stage (B={meta['block_size']}) whose bard.json does not record the token ids it "
                "trained with (token_ids: mask, eos, pad); retrain it with this version")
    return None


def token_ids(tokenizer, meta: dict | None = None, mask_id: int | None = None, *,
              require_mask: bool = True) -> TokenIds:
    """The ids a decoder needs: from ``bard.json`` (``token_ids``) when the checkpoint recorded them,
    else the explicit `mask_id` (the recipe's) or the tokenizer's <|mask|>; EOS is <|im_end|>, pad the
    tokenizer's pad (EOS without one). `require_mask=False` (AR decoding) allows a model with none."""
    recorded = (meta or {}).get("token_ids")
    if recorded:
        return TokenIds(mask=recorded["mask"], eos=recorded["eos"], pad=recorded["pad"])
    untagged = untagged_stage(meta or {})
    if require_mask and untagged:  # a trained stage's mask id is not the tokenizer's to guess
        raise ValueError(untagged)
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if eos is None or eos == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {EOS_TOKEN} token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return TokenIds(mask=mask_token_id(tokenizer, mask_id, required=require_mask), eos=int(eos), pad=int(pad))


def promoted_verifier(meta: dict, model_dir: str | Path = "the checkpoint") -> str | None:
    """The model a stage promoted as a drafter (the gate's ``draft`` setting) is verified by: the AR base whose
    greedy answers its promoted setting reproduces; None for every other setting. Its directory must exist."""
    decode = meta.get("decode") or {}
    verifier = decode.get("verifier")
    if decode.get("mode") != "speculative" or verifier in (None, "self"):
        return None
    if not Path(verifier).is_dir():
        raise ValueError(f"{model_dir} was promoted as the drafter of {verifier}, which is not there: give the "
                         "verifier (--verifier, verifier=) or another mode")
    return str(verifier)


def decode_config(meta: dict, base: DecodeConfig | None = None, **overrides) -> DecodeConfig:
    """Decode settings for a checkpoint: `base` (default: the decode settings of the recipe that trained it,
    ``bard.json`` ``recipe``, else DecodeConfig's), then the setting the gate promoted it with (``bard.json``
    ``decode``), its block size and label shift, then explicit `overrides` (None values are ignored: a flag
    the user did not set)."""
    if base is None:
        from bard_core.recipes import RECIPES

        base = RECIPES[meta["recipe"]]().decode if meta.get("recipe") in RECIPES else DecodeConfig()
    cfg = base
    fields = {f.name for f in dataclasses.fields(DecodeConfig)}
    promoted = {k: v for k, v in (meta.get("decode") or {}).items() if k in fields}
    from_meta = {"label_shift": bool(meta.get("label_shift", False))}
    if meta.get("block_size"):
        from_meta["block_size"] = int(meta["block_size"])
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - fields
    if unknown:
        raise ValueError(f"unknown decode setting(s) {sorted(unknown)}; valid: {', '.join(sorted(fields))}")
    return dataclasses.replace(cfg, **{**promoted, **from_meta, **given})
