"""Source rows → the unified sample schema (DESIGN.md §3). Pure functions, one row at a time.

Every function returns a unified row; a row that cannot be normalised still comes back, with
``reason`` set, so nothing is dropped silently. Handled variants:
- LLaVA-OneVision-1.5: turns as ``{from, value}`` or ``{role, content}`` (also mixed per turn,
  with nulls), ``<image>`` tags anywhere in a turn, one image or none (text-only rows);
- FineVision: ``texts`` as ``{user, assistant}`` in either field order, several images per row,
  per-turn ratings with ``*_min`` columns.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

RATINGS = ("relevance", "image_correspondence", "visual_dependency", "formatting")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_TAG = "<image>"

CONTENT = pa.list_(pa.struct([("type", pa.string()), ("text", pa.string())]))
MESSAGE = pa.struct([("role", pa.string()), ("content", CONTENT)])
UNIFIED_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("source_id", pa.string()),
    ("source", pa.string()),
    ("images", pa.list_(pa.binary())),
    ("messages", pa.list_(MESSAGE)),
    ("quality", pa.struct([(r, pa.int64()) for r in RATINGS])),
    ("phash", pa.list_(pa.uint64())),
    ("colour", pa.list_(pa.binary())),  # per image: its colour signature (dedup.colour_signature)
    ("num_tokens", pa.int64()),
    ("order", pa.int64()),  # position in its source (earliest wins ties in dedup)
    ("reason", pa.string()),  # null: kept so far
])
REQUIRED = {
    "llava_ov": ("id", "image", "conversations"),
    "finevision": ("images", "texts"),
}


def sample_id(source: str, source_id: str) -> str:
    return hashlib.sha256(f"{source}\x00{source_id}".encode()).hexdigest()[:24]


def empty_row(source: str, source_id: str, order: int, reason: str | None = None) -> dict:
    return {"sample_id": sample_id(source, source_id), "source_id": source_id, "source": source, "images": [],
            "messages": [], "quality": None, "phash": [], "colour": [], "num_tokens": None, "order": order, "reason": reason}


def _image_bytes(value) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise TypeError(f"image of type {type(value).__name__}")


def _user_content(text: str, n_images: int) -> list[dict]:
    """Split a user text at <image> tags into parts; images without a tag go first."""
    pieces = text.split(IMAGE_TAG)
    tagged = len(pieces) - 1
    parts = [{"type": "image", "text": None}] * max(0, n_images - tagged)
    for k, piece in enumerate(pieces):
        if k and k <= n_images:
            parts.append({"type": "image", "text": None})
        piece = piece.strip("\n") if k == 0 or k == len(pieces) - 1 else piece
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def normalise_llava(row: dict, subset: str, order: int) -> dict:
    source = f"llava_ov/{subset}"
    source_id = str(row.get("id") if row.get("id") is not None else order)
    out = empty_row(source, source_id, order)
    try:
        image = _image_bytes(row.get("image"))
    except TypeError as exc:
        return {**out, "reason": f"bad_schema:image ({exc})"}
    turns = row.get("conversations")
    if not isinstance(turns, list):
        return {**out, "reason": f"bad_schema:conversations ({type(turns).__name__})"}
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            continue  # a null turn
        role = turn.get("from") if turn.get("from") is not None else turn.get("role")
        text = turn.get("value") if turn.get("value") is not None else turn.get("content")
        if role is None and text is None:
            continue
        if role not in ROLES or not isinstance(text, str):
            return {**out, "reason": f"bad_turn:{role!r}"}
        messages.append((ROLES[role], text))
    images = [image] if image is not None else []
    return {**out, "images": images, "messages": _messages(messages, len(images))}


def normalise_finevision(row: dict, subset: str, order: int) -> dict:
    source = f"finevision/{subset}"
    out = empty_row(source, str(order), order)
    try:
        images = [b for b in (_image_bytes(im) for im in (row.get("images") or [])) if b is not None]
    except TypeError as exc:
        return {**out, "reason": f"bad_schema:images ({exc})"}
    texts = row.get("texts")
    if not isinstance(texts, list):
        return {**out, "reason": f"bad_schema:texts ({type(texts).__name__})"}
    messages = []
    for turn in texts:
        if not isinstance(turn, dict):
            continue
        messages += [("user", turn.get("user") or ""), ("assistant", turn.get("assistant") or "")]
    quality = None
    if all(f"{r}_min" in row for r in RATINGS):
        quality = {r: (int(row[f"{r}_min"]) if row[f"{r}_min"] is not None else None) for r in RATINGS}
    return {**out, "images": images, "messages": _messages(messages, len(images)), "quality": quality}


def _messages(turns: list[tuple[str, str]], n_images: int) -> list[dict]:
    """Unified messages; the images attach to the first user turn (at its <image> tags)."""
    messages, placed = [], False
    for role, text in turns:
        if role == "user" and not placed:
            content, placed = _user_content(text, n_images), True
        else:
            content = [{"type": "text", "text": text.replace(IMAGE_TAG, "").strip()}]
        messages.append({"role": role, "content": content})
    return messages


def normalise_rows(rows: list[dict], kind: str, subset: str, first_order: int) -> list[dict]:
    fn = {"llava_ov": normalise_llava, "finevision": normalise_finevision}[kind]
    return [fn(row, subset, first_order + k) for k, row in enumerate(rows)]


def missing_columns(kind: str, columns: list[str]) -> list[str]:
    return [c for c in REQUIRED[kind] if c not in columns]


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=UNIFIED_SCHEMA)


def text_of(message: dict) -> str:
    """A message's text: its text parts joined as the chat template joins them (no separator); a plain string
    content as it is. Training (`inputs.encode_sample`) and curation read answers through this one function."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content if part.get("type") == "text")


def messages_json(messages: list[dict]) -> str:
    return json.dumps(messages, sort_keys=True)
