"""The shapes world: determinism, source schemas exactly as published, planted defects really present."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bard_core.curation.dedup import phash64
from bard_core.shapes import world
from bard_core.shapes.metrics import BENCHMARKS
from bard_core.shapes.synth import RATING_COLUMNS, hamming, synth
from tests.conftest import flow_run_logs


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(world_dir: Path, source: str) -> list[dict]:
    return pq.read_table(world_dir / "sources" / source / "train-00000-of-00001.parquet").to_pylist()


def _decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 — any decoder failure means "corrupt"
        return False


def test_same_seed_gives_byte_identical_files(tmp_path):
    out = tmp_path / "w"
    synth(out, seed=3, size=24, bench_size=4)
    first = _digest(out)
    synth(out, seed=3, size=24, bench_size=4)
    assert _digest(out) == first
    other = tmp_path / "w2"
    synth(other, seed=4, size=24, bench_size=4)
    assert _digest(other)["sources/llava_ov/shapes_fv/train-00000-of-00001.parquet"] != \
        first["sources/llava_ov/shapes_fv/train-00000-of-00001.parquet"]


def test_llava_schema_is_the_published_one(world_dir):
    for subset, turn_fields in (("shapes_fv", ["from", "value"]), ("shapes_rc", ["from", "value", "role", "content"])):
        schema = pq.read_schema(world_dir / "sources/llava_ov" / subset / "train-00000-of-00001.parquet")
        assert schema.names == ["id", "image", "conversations", "data_source"]
        assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        turn = schema.field("conversations").type.value_type
        assert [f.name for f in turn] == turn_fields
    rc = _rows(world_dir, "llava_ov/shapes_rc")
    # {role, content} turns mixed with {from, value} turns and nulls in one subset
    styles = {("rc" if t["role"] is not None else "fv") for r in rc for t in r["conversations"]}
    assert styles == {"rc", "fv"}
    assert any(r["image"] is None for r in rc), "text-only rows are part of the source"
    with_image = [r for r in _rows(world_dir, "llava_ov/shapes_fv") if r["image"] is not None]
    assert all("<image>" in r["conversations"][0]["value"] for r in with_image)


def test_finevision_schema_is_the_published_one(world_dir):
    for subset in ("shapes_qa", "shapes_qa_rev", "shapes_pair"):
        schema = pq.read_schema(world_dir / "sources/finevision" / subset / "train-00000-of-00001.parquet")
        expected = ["images", "texts", "source"]
        for column in RATING_COLUMNS:
            expected += [f"{column}_ratings", f"{column}_min"]
        assert schema.names == expected
        order = [f.name for f in schema.field("texts").type.value_type]
        assert order == (["assistant", "user"] if subset == "shapes_qa_rev" else ["user", "assistant"])
        rows = _rows(world_dir, f"finevision/{subset}")
        for row in rows:
            for column in RATING_COLUMNS:
                assert len(row[f"{column}_ratings"]) == len(row["texts"])
                assert row[f"{column}_min"] == min(row[f"{column}_ratings"])
    pairs = _rows(world_dir, "finevision/shapes_pair")
    assert all(len(r["images"]) == 2 for r in pairs)


def test_sources_read_through_datasets_decode_images(world_dir):
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(world_dir / "sources/finevision/shapes_qa/*.parquet"), split="train")
    assert isinstance(ds[0]["images"][0], Image.Image)


def _planted(world_dir: Path) -> dict:
    return json.loads((world_dir / "planted.json").read_text())


def _row(world_dir: Path, record: dict) -> dict:
    return _rows(world_dir, record["source"])[record["row"]]


def _images(row: dict) -> list[bytes]:
    if "images" in row:
        return [im["bytes"] for im in row["images"]]
    return [] if row["image"] is None else [row["image"]["bytes"]]


def _answer(row: dict) -> str:
    if "texts" in row:
        return row["texts"][-1]["assistant"]
    last = row["conversations"][-1]
    return last["value"] if last.get("value") is not None else last["content"]


def test_every_defect_is_planted_in_every_source(world_dir):
    planted = _planted(world_dir)
    for defect in ("exact_duplicate", "near_duplicate", "corrupt_image", "empty_answer", "overlong_answer",
                   "benchmark_leak"):
        assert {r["source"].split("/")[0] for r in planted[defect]} == {"llava_ov", "finevision"}, defect
    assert planted["low_rating"] and all(r["source"].startswith("finevision") for r in planted["low_rating"])


def test_exact_duplicates_are_byte_identical_and_come_after_the_original(world_dir):
    for record in _planted(world_dir)["exact_duplicate"]:
        row = _row(world_dir, record)
        original = next(r for r in _planted_rows(world_dir, record["source"]) if r[0] == record["of"])[1]
        assert _images(row) == _images(original)
        assert _answer(row) == _answer(original)
        assert int(record["of"].rsplit("-", 1)[1]) < record["row"]


def _planted_rows(world_dir: Path, source: str):
    subset = source.split("/")[1]
    return [(f"{subset}-{i:06d}", r) for i, r in enumerate(_rows(world_dir, source))]


def test_near_duplicates_are_within_the_design_threshold_but_not_identical(world_dir):
    planted = _planted(world_dir)
    threshold = planted["phash_threshold"]
    for record in planted["near_duplicate"]:
        row = _row(world_dir, record)
        original = dict(_planted_rows(world_dir, record["source"]))[record["of"]]
        a, b = _images(row)[0], _images(original)[0]
        assert a != b
        distance = hamming(phash64(Image.open(io.BytesIO(a))), phash64(Image.open(io.BytesIO(b))))
        assert distance <= threshold and distance == record["distance"]


def test_clean_scenes_are_far_apart_so_dedup_cannot_chain_them(world_dir):
    planted = _planted(world_dir)
    bad_rows = {(r["source"], r["row"]) for d, rs in planted.items() if isinstance(rs, list) for r in rs}
    hashes = []
    for source in ("llava_ov/shapes_fv", "llava_ov/shapes_rc", "finevision/shapes_qa"):
        for k, row in enumerate(_rows(world_dir, source)):
            if (source, k) not in bad_rows and _images(row):
                hashes.append(phash64(Image.open(io.BytesIO(_images(row)[0]))))
    h = np.array(hashes, dtype=np.uint64)
    distances = np.bitwise_count(h[:, None] ^ h[None, :])[np.triu_indices(len(h), 1)]
    assert distances.min() > 2 * planted["phash_threshold"]


def test_corrupt_images_really_fail_to_decode_and_clean_ones_decode(world_dir):
    planted = _planted(world_dir)
    for record in planted["corrupt_image"]:
        assert not _decodes(_images(_row(world_dir, record))[0])
    for source in ("llava_ov/shapes_fv", "finevision/shapes_pair"):
        assert all(_decodes(b) for b in _images(_rows(world_dir, source)[0]))


def test_empty_and_overlong_answers(world_dir):
    planted = _planted(world_dir)
    assert all(_answer(_row(world_dir, r)).strip() == "" for r in planted["empty_answer"])
    from bard_core.tiny import build_tokenizer

    tok = build_tokenizer(512)
    lengths = [len(tok(_answer(_row(world_dir, r)))["input_ids"]) for r in planted["overlong_answer"]]
    assert min(lengths) > 512  # over the tiny recipe's token cap


def test_low_ratings_are_below_the_recipe_threshold(world_dir):
    from bard_core.recipes import get_recipe

    threshold = get_recipe("tiny").data.min_rating
    for record in _planted(world_dir)["low_rating"]:
        row = _row(world_dir, record)
        assert min(row[f"{c}_min"] for c in RATING_COLUMNS) < threshold
    clean = _rows(world_dir, "finevision/shapes_qa")[0]
    assert min(clean[f"{c}_min"] for c in RATING_COLUMNS) >= threshold


def test_benchmark_leaks_match_a_benchmark_image(world_dir):
    planted = _planted(world_dir)
    bench = {}
    for name in BENCHMARKS:
        for row in pq.read_table(world_dir / "benchmarks" / name / "test.parquet").to_pylist():
            bench[row["id"]] = row
    kinds = set()
    for record in planted["benchmark_leak"]:
        item = bench[record["item"]]
        leaked = _images(_row(world_dir, record))[0]
        distance = hamming(phash64(Image.open(io.BytesIO(leaked))), phash64(Image.open(io.BytesIO(item["image"]["bytes"]))))
        assert distance <= planted["phash_threshold"]
        kinds.add(record["kind"])
        if record["kind"] == "item":
            assert _answer(_row(world_dir, record)) == item["answer"]
    assert kinds == {"item", "image", "near"}


def test_benchmarks_are_disjoint_from_clean_training_scenes(world_dir):
    planted = _planted(world_dir)
    leak_rows = {(r["source"], r["row"]) for r in planted["benchmark_leak"]}
    bench_hashes = np.array([phash64(Image.open(io.BytesIO(r["image"]["bytes"])))
                             for name in BENCHMARKS
                             for r in pq.read_table(world_dir / "benchmarks" / name / "test.parquet").to_pylist()],
                            dtype=np.uint64)
    for source in ("llava_ov/shapes_fv", "finevision/shapes_qa_rev"):
        for k, row in enumerate(_rows(world_dir, source)):
            if (source, k) in leak_rows or not _images(row) or not _decodes(_images(row)[0]):
                continue
            h = np.uint64(phash64(Image.open(io.BytesIO(_images(row)[0]))))
            assert np.bitwise_count(bench_hashes ^ h).min() > planted["phash_threshold"]


def test_answers_agree_with_the_rendered_scene():
    import random

    rng = random.Random(5)
    for _ in range(50):
        scene = world.random_scene(rng)
        for family in world.FAMILIES:
            _, question, answer = world.ask(scene, rng, family)
            assert answer.strip(), (family, question)
        listing = world.extract_answer(scene)
        assert len(listing.splitlines()) == world.GRID ** 2
        assert sum(c.kind == "shape" for c in scene.cells) >= 1


def test_synth_rejects_sizes_too_small_to_plant_defects(tmp_path):
    with pytest.raises(ValueError, match="size"):
        synth(tmp_path, size=5)


def test_the_world_task_keeps_its_logs_readable(prefect_server, tmp_path):
    """`datasets` fingerprints with dill, which reads `dis.dis` output from a captured stdout; under a flow's print
    capture that bytecode listing went to the run's logs (60 lines in every `make demo`)."""
    from prefect import flow

    from tasks.world import world_task

    @flow(log_prints=True)
    def make_world():
        print("world starts")  # the flow's own prints still reach its logs
        return world_task(str(tmp_path / "w"), 3, 20, 4)

    state = make_world(return_state=True)
    assert state.is_completed() and Path(state.result()["benchmarks"]).is_dir()

    messages = flow_run_logs(state)
    assert "world starts" in messages
    assert not [m for m in messages if "LOAD_" in m or "RESUME" in m], messages[:5]
