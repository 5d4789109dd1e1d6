"""Curation transforms as pure functions (no Ray): normalisers, filters, dedup, decontamination, mixing."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bard_core.config import DataConfig
from bard_core.curation import dedup
from bard_core.curation.filters import check_row, inspect_image
from bard_core.curation.normalise import normalise_finevision, normalise_llava, text_of, to_table

CFG = DataConfig(max_tokens=200, min_rating=3, phash_threshold=4, min_image_side=32)


def png(size=(96, 96), mode="RGB", color=(200, 30, 30), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color if mode in ("RGB", "CMYK") else 128).save(buffer, format=fmt)
    return buffer.getvalue()


def count_tokens(text: str, sizes) -> int:
    return len(text.split()) + 9 * len(sizes)


def turn(**kw):
    return {"from": None, "value": None, "role": None, "content": None, **kw}


def test_llava_from_value_with_image_tag():
    row = {"id": "a", "image": {"bytes": png(), "path": None},
           "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}
    out = normalise_llava(row, "s", 0)
    assert out["reason"] is None and out["source"] == "llava_ov/s" and out["source_id"] == "a"
    assert out["messages"][0] == {"role": "user", "content": [{"type": "image", "text": None},
                                                             {"type": "text", "text": "What colour?"}]}
    assert out["messages"][1]["role"] == "assistant" and text_of(out["messages"][1]) == "red"


def test_llava_role_content_mixed_with_nulls_and_trailing_tag():
    row = {"id": "b", "image": {"bytes": png(), "path": None},
           "conversations": [turn(role="user", content="Describe it.\n<image>"), None, turn(**{"from": "gpt", "value": "ok"}),
                             turn(role="user", content="More?"), turn(role="assistant", content="no")]}
    out = normalise_llava(row, "s", 3)
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user", "assistant"]
    assert out["messages"][0]["content"] == [{"type": "text", "text": "Describe it."}, {"type": "image", "text": None}]


def test_llava_text_only_and_untagged_image():
    text_only = normalise_llava({"id": "c", "image": None, "conversations": [{"from": "human", "value": "Hi"},
                                                                               {"from": "gpt", "value": "Hello"}]}, "s", 0)
    assert text_only["images"] == [] and text_only["messages"][0]["content"] == [{"type": "text", "text": "Hi"}]
    untagged = normalise_llava({"id": "d", "image": {"bytes": png(), "path": None},
                                "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}, "s", 0)
    assert untagged["messages"][0]["content"][0]["type"] == "image"  # images without a tag go first


def test_llava_bad_types_become_rejects():
    assert normalise_llava({"id": "e", "image": None, "conversations": "oops"}, "s", 0)["reason"].startswith("bad_schema")
    assert normalise_llava({"id": "f", "image": 42, "conversations": []}, "s", 0)["reason"].startswith("bad_schema")
    assert normalise_llava({"id": "g", "image": None, "conversations": [{"from": "robot", "value": "x"}]},
                           "s", 0)["reason"].startswith("bad_turn")


@pytest.mark.parametrize("order", [("user", "assistant"), ("assistant", "user")])
def test_finevision_any_field_order_many_images_and_ratings(order):
    texts = [dict((k, {"user": "Q1", "assistant": "A1"}[k]) for k in order),
             dict((k, {"user": "Q2", "assistant": "A2"}[k]) for k in order)]
    row = {"images": [{"bytes": png(), "path": None}, {"bytes": png(color=(0, 0, 255)), "path": None}], "texts": texts,
           "source": "x", **{f"{r}_min": 4 for r in ("relevance", "image_correspondence", "visual_dependency",
                                                      "formatting")}}
    out = normalise_finevision(row, "fv", 7)
    assert out["source_id"] == "7" and len(out["images"]) == 2
    assert [p["type"] for p in out["messages"][0]["content"]] == ["image", "image", "text"]
    assert [text_of(m) for m in out["messages"]] == ["Q1", "A1", "Q2", "A2"]
    assert out["quality"]["formatting"] == 4


def test_unified_rows_fit_the_schema():
    row = normalise_llava({"id": "a", "image": None, "conversations": [{"from": "human", "value": "Q"},
                                                                         {"from": "gpt", "value": "A"}]}, "s", 0)
    table = to_table([check_row(row, CFG, count_tokens)])
    assert table.num_rows == 1 and table.column("num_tokens")[0].as_py() > 0


@pytest.mark.parametrize(("data", "reason"), [
    (png()[:60], "image_undecodable"),
    (b"not an image at all", "image_undecodable"),
    (png(size=(10, 10)), "image_too_small"),
    (png(size=(8000, 33)), "image_too_elongated"),
])
def test_bad_images_get_named_reasons(data, reason):
    cfg = DataConfig(max_aspect_ratio=100.0, min_image_side=32)
    assert inspect_image(data, cfg) == reason


def test_decompression_bomb_is_refused_before_decoding():
    assert inspect_image(png(size=(3000, 3000)), DataConfig(max_image_pixels=1000 * 1000)) == "image_too_many_pixels"


@pytest.mark.parametrize("mode", ["CMYK", "P", "LA", "I;16", "L"])
def test_unusual_modes_are_converted_to_rgb(mode):
    if mode == "I;16":
        buffer = io.BytesIO()
        Image.fromarray(np.arange(96 * 96, dtype=np.uint16).reshape(96, 96) * 7).save(buffer, format="PNG")
        data = buffer.getvalue()
        assert Image.open(io.BytesIO(data)).mode.startswith("I")
    else:
        data = png(mode=mode, fmt="JPEG" if mode == "CMYK" else "PNG")
    kept, phash, colour, size = inspect_image(data, CFG)
    assert Image.open(io.BytesIO(kept)).mode == "RGB" and size == (96, 96) and 0 <= phash < 2**64
    assert isinstance(colour, bytes) and len(colour) == 128


def test_rgb_images_keep_their_original_bytes():
    data = png(fmt="JPEG")
    assert inspect_image(data, CFG)[0] == data


def _row(answer="red", question="What colour?", quality=None, images=None):
    images = [png()] if images is None else images
    content = [{"type": "image", "text": None}] * len(images) + ([{"type": "text", "text": question}] if question else [])
    return {"sample_id": "x", "source_id": "x", "source": "finevision/s", "images": images,
            "messages": [{"role": "user", "content": content},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "quality": quality, "phash": [], "colour": [], "num_tokens": None, "order": 0, "reason": None}


def test_text_rating_and_token_filters():
    assert check_row(_row(answer="  "), CFG, count_tokens)["reason"] == "empty_answer"
    assert check_row(_row(question="", images=[]), CFG, count_tokens)["reason"] == "empty_user_text"
    low = {"relevance": 5, "image_correspondence": 2, "visual_dependency": 5, "formatting": 5}
    assert check_row(_row(quality=low), CFG, count_tokens)["reason"] == "low_rating:image_correspondence"
    assert check_row(_row(answer="word " * 300), CFG, count_tokens)["reason"] == "over_token_cap"
    good = check_row(_row(), CFG, count_tokens)
    assert good["reason"] is None and len(good["phash"]) == len(good["colour"]) == 1 and good["num_tokens"] > 9


def test_image_parts_must_match_the_images():
    row = _row()
    row["images"] = [png(), png()]
    assert check_row(row, CFG, count_tokens)["reason"] == "image_placeholder_mismatch"


def brute_pairs(hashes, t):
    return {(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
            if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= t}


@pytest.mark.parametrize("t", [0, 2, 4, 6])
def test_banded_search_finds_exactly_the_pairs_brute_force_finds(t):
    rng = np.random.default_rng(t)
    base = rng.integers(0, 2**63, 60, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 60).astype(np.uint64)
    near = []
    for h in base[:20]:  # flip up to t+2 random bits: some within t, some just beyond
        flips = rng.choice(64, size=rng.integers(0, t + 3), replace=False)
        for b in flips:
            h = h ^ np.uint64(1 << int(b))
        near.append(h)
    hashes = np.concatenate([base, np.array(near, dtype=np.uint64)])
    found = {tuple(p) for p in dedup.near_duplicate_pairs(hashes, t).tolist()}
    assert found == brute_pairs(hashes, t)


def test_contamination_ignores_templates_catches_copies_and_names_the_item():
    bench = ["What is in cell 6? A. yellow triangle B. blue circle C. red square D. yellow square Answer with the option's letter."]
    train = [f"What is in cell {k}? A. red circle B. green square C. blue triangle D. empty Answer with the option's letter."
             for k in range(1, 10)]
    c = dedup.Contamination([1 << 60], [0], bench, ["shapes_mcq:q7"], threshold=4, colour_threshold=3, n=8,
                            common_ngrams=dedup.common_ngrams(train, 8, 3))
    assert c.check([], [], train[0]) is None
    assert c.check([], [], "Please answer: " + bench[0]) == ("benchmark_question", "shapes_mcq:q7")
    grey, red = bytes([128] * 128), bytes([90, 240] * 64)
    c2 = dedup.Contamination([0b1010, 0b1010], [red, grey], ["", ""], ["t:a", "t:b"], threshold=2,
                             colour_threshold=20, n=8)
    assert c2.check([0b1000], [bytes([100, 230] * 64)], "anything") == ("benchmark_image", "t:a")  # near in both
    assert c2.check([0b1000], [grey], "anything") == ("benchmark_image", "t:b")
    assert c2.check([0b1000], [bytes([200, 90] * 64)], "x") is None  # the same picture in other colours
    assert c2.check([2**50], [red], "x") is None


def test_mixing_is_deterministic_and_follows_weights():
    ids = [f"s{i}" for i in range(400)]
    sources = ["llava_ov/a"] * 200 + ["finevision/b"] * 200
    keep = dedup.mix_keep(ids, sources, {"llava_ov": 3.0, "finevision": 1.0}, 200, seed=0)
    assert sum(keep[:200]) == 150 and sum(keep[200:]) == 50
    assert keep == dedup.mix_keep(ids, sources, {"llava_ov": 3.0, "finevision": 1.0}, 200, seed=0)
    assert keep != dedup.mix_keep(ids, sources, {"llava_ov": 3.0, "finevision": 1.0}, 200, seed=1)
    assert all(dedup.mix_keep(ids, sources, {"llava_ov": 1.0}, None, 0))


def test_exact_key_normalises_text_but_not_images():
    x, y = dedup.images_key([b"x"]), dedup.images_key([b"y"])
    assert dedup.exact_key("Hello  World", x) == dedup.exact_key("hello world", x)
    assert dedup.exact_key("hello world", x) != dedup.exact_key("hello world", y)


def test_curation_speed_benchmark_prints_a_table_and_a_json_line():
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "benchmarks.curation_speed", "--images", "20", "--sizes", "1000,5000"],
                         capture_output=True, text=True, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["images_per_s_per_core"] > 0 and set(result["dedup_seconds"]) == {"1000", "5000"}
    assert all(r["rejected"] == r["planted"] for r in result["rows"])  # the copies, not the reused images
