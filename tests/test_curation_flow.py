"""Curation on a real local Ray inside a real Prefect flow, scored against the world's planted defects."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bard_core.curation.normalise import sample_id

EXPECTED_REASON = {"exact_duplicate": "exact_duplicate", "near_duplicate": "near_duplicate",
                   "corrupt_image": "image_undecodable", "empty_answer": "empty_answer",
                   "overlong_answer": "over_token_cap", "low_rating": "low_rating",
                   "benchmark_leak": "benchmark_image"}


def _planted_ids(world_dir: Path) -> dict[str, str]:
    planted = json.loads((world_dir / "planted.json").read_text())
    out = {}
    for defect, records in planted.items():
        if isinstance(records, list):
            for r in records:
                source_id = r["id"] if r["source"].startswith("llava_ov") else str(r["row"])
                out[sample_id(r["source"], source_id)] = defect
    return out


@pytest.fixture(scope="module")
def curated(world_dir, tiny_model_dir, tmp_path_factory, prefect_server, local_ray):
    from flows.curate import CurateParams, curate_flow

    out = tmp_path_factory.mktemp("curated") / "data"
    params = CurateParams(sources={"llava_ov": str(world_dir / "sources/llava_ov"),
                                   "finevision": str(world_dir / "sources/finevision")},
                          out=str(out), benchmarks_dir=str(world_dir / "benchmarks"), processor=str(tiny_model_dir))
    return params, curate_flow(params), out


def _rejects(out: Path) -> list[dict]:
    return pq.read_table(glob.glob(str(out / "rejects" / "*.parquet"))).to_pylist()


def test_every_planted_defect_is_removed_for_its_reason_and_no_clean_row_is(curated, world_dir):
    _, result, out = curated
    expected = _planted_ids(world_dir)
    got = {r["sample_id"]: r["reason"].split(":")[0] for r in _rejects(out)}
    assert set(got) == set(expected)  # nothing clean removed, nothing planted kept
    for sid, defect in expected.items():
        assert got[sid] == EXPECTED_REASON[defect], (defect, got[sid])


def test_every_reject_names_what_it_duplicates_or_contaminates(curated, world_dir):
    _, _, out = curated
    planted = json.loads((world_dir / "planted.json").read_text())
    rejects = {r["sample_id"]: r for r in _rejects(out)}
    kept = set(pq.read_table(glob.glob(str(out / "data" / "*.parquet")), columns=["sample_id"]).column(
        "sample_id").to_pylist())
    image_of = {f"{path.parent.name}:{r['id']}": (path.parent.name, r["image_id"])
                for path in (world_dir / "benchmarks").glob("*/test.parquet")
                for r in pq.read_table(path, columns=["id", "image_id"]).to_pylist()}
    checked = Counter()
    for defect in ("exact_duplicate", "near_duplicate", "benchmark_leak"):
        for r in planted[defect]:
            llava = r["source"].startswith("llava_ov")
            row = rejects[sample_id(r["source"], r["id"] if llava else str(r["row"]))]
            if defect == "benchmark_leak":
                # the item whose image it shows (yesno asks two questions of one image: either names it)
                assert image_of[row["contaminates"]] == image_of[f"{r['benchmark']}:{r['item']}"]
                assert row["duplicate_of"] is None
            else:  # the clean row it copies (`of`: its row id, "<subset>-<position>")
                original = sample_id(r["source"], r["of"] if llava else str(int(r["of"].rsplit("-", 1)[1])))
                assert row["duplicate_of"] == original and original in kept and row["contaminates"] is None
            checked[defect] += 1
    assert min(checked.values()) > 0 and len(checked) == 3
    manifest = json.loads((out / "manifest.json").read_text())
    clusters = manifest["duplicate_clusters"]
    assert clusters and all(c["kept"] in kept and c["duplicates"] >= len(c["examples"]) > 0 for c in clusters)
    assert [c["duplicates"] for c in clusters] == sorted((c["duplicates"] for c in clusters), reverse=True)


def test_counts_identity_and_manifest(curated):
    _, result, out = curated
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows_in"] == manifest["kept"] + sum(manifest["rejected_by_reason"].values())
    kept = pq.read_table(glob.glob(str(out / "data" / "*.parquet")))
    assert kept.num_rows == manifest["kept"] == result["num_rows"]
    for source, c in manifest["per_source"].items():
        assert c["in"] == c["kept"] + sum(c["rejected"].values()), source
    assert set(kept.column_names) >= {"sample_id", "source_id", "source", "images", "messages", "quality", "phash",
                                      "num_tokens"}
    assert len(set(kept.column("sample_id").to_pylist())) == kept.num_rows
    assert all(n > 0 for n in kept.column("num_tokens").to_pylist())


def test_kept_rows_are_written_interleaved_across_sources(curated):
    # training streams a shard in file order through a small buffer: rows grouped by source would make
    # every batch one subset's for tens of steps
    _, _, out = curated
    sources = pq.read_table(sorted(glob.glob(str(out / "data" / "*.parquet"))), columns=["source"]).column(
        "source").to_pylist()
    runs = 1 + sum(a != b for a, b in zip(sources, sources[1:]))
    assert len(set(sources)) >= 4 and runs > len(sources) / 3, (runs, len(sources))


def test_rerun_gives_the_same_fingerprint_and_output(curated):
    from flows.curate import curate_flow

    params, first, out = curated
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "data").glob("*.parquet"))}
    second = curate_flow(params)
    assert second["fingerprint"] == first["fingerprint"]
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "data").glob("*.parquet"))} == digest
    fresh = out.with_name("again")
    third = curate_flow(params.model_copy(update={"out": str(fresh)}))
    assert third["fingerprint"] == first["fingerprint"] and third["counts"] == first["counts"]
    key = lambda t: sorted(t.column("sample_id").to_pylist())  # noqa: E731
    assert key(pq.read_table(glob.glob(str(fresh / "data" / "*.parquet")))) == \
        key(pq.read_table(glob.glob(str(out / "data" / "*.parquet"))))
    # the same sources copied elsewhere: the same data, so the same curation (and the stages keyed on it) is reused
    moved = out.parent / "moved-sources"
    for kind, uri in params.sources.items():
        shutil.copytree(uri, moved / kind)
    written = (out / "manifest.json").stat().st_mtime_ns
    fourth = curate_flow(params.model_copy(update={"sources": {k: str(moved / k) for k in params.sources}}))
    assert fourth["fingerprint"] == first["fingerprint"] and (out / "manifest.json").stat().st_mtime_ns == written


def test_report_artifacts_are_on_the_server(curated):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {"curation-report", "curation-rejects"} <= keys


_SEED = iter(range(10_000))


def _png(size=(96, 96), mode="RGB", fmt="PNG") -> bytes:
    """A distinct smooth random picture each call (solid colours would all be near duplicates)."""
    rng = np.random.default_rng(next(_SEED))
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(small, "RGB").resize(size, Image.BILINEAR)
    buffer = io.BytesIO()
    (image.convert(mode) if mode != "RGB" else image).save(buffer, format=fmt)
    return buffer.getvalue()


def _turns(q, a):
    return [{"from": "human", "value": "<image>\n" + q if q is not None else None}, {"from": "gpt", "value": a}]


def test_hostile_rows_run_to_completion_with_the_right_reasons(tmp_path, tiny_model_dir, local_ray):
    from bard_core.recipes import get_recipe
    from tasks.curate import run_curation

    sixteen = io.BytesIO()
    Image.fromarray((np.arange(96 * 96, dtype=np.uint16).reshape(96, 96) * 5) ** 2 % 65535).save(sixteen, format="PNG")
    cases = [  # (image bytes, question, answer, expected reason or None)
        (_png()[:80], "Q?", "A", "image_undecodable"),
        (b"\x89PNG garbage", "Q?", "A", "image_undecodable"),
        (_png(size=(4200, 4200)), "Q?", "A", "image_too_many_pixels"),
        (_png(size=(12, 12)), "Q?", "A", "image_too_small"),
        (_png(size=(2000, 32)), "Q?", "A", None),  # long but within the aspect cap (62 < 200)
        (_png(mode="CMYK", fmt="JPEG"), "Q1?", "A", None),
        (_png(mode="P"), "Q2?", "A", None),
        (_png(mode="LA"), "Q3?", "A", None),
        (sixteen.getvalue(), "Q4?", "A", None),
        (_png(), "Q5?", "   ", "empty_answer"),
        (_png(), "Q6?", "word " * 900, "over_token_cap"),
    ]
    rows = [{"id": f"h{k}", "image": {"bytes": b, "path": None}, "conversations": _turns(q, a), "data_source": "x"}
            for k, (b, q, a, _) in enumerate(cases)]
    rows.append({"id": "nullturns", "image": None, "conversations": [None, {"from": "human", "value": "Hi"}, None],
                 "data_source": "x"})
    root = tmp_path / "llava"
    (root / "good").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "good" / "train.parquet")
    (root / "wrongtype").mkdir()
    pq.write_table(pa.table({"id": ["w0", "w1"], "image": [None, None], "conversations": ["oops", "no"],
                             "data_source": ["x", "x"]}), root / "wrongtype" / "train.parquet")
    (root / "missing").mkdir()
    pq.write_table(pa.table({"id": ["m0", "m1", "m2"], "image": [None] * 3}), root / "missing" / "train.parquet")

    cfg = get_recipe("tiny").data
    ref = run_curation({"llava_ov": str(root)}, tmp_path / "out", cfg, str(tiny_model_dir))
    got = {r["source_id"]: r["reason"] for r in _rejects(tmp_path / "out")}
    for k, (_, _, _, reason) in enumerate(cases):
        if reason:
            assert got[f"h{k}"] == reason, (k, got.get(f"h{k}"))
        else:
            assert f"h{k}" not in got, (k, got[f"h{k}"])
    assert got["nullturns"] == "empty_answer"
    assert got["w0"].startswith("bad_schema:conversations") and got["w1"].startswith("bad_schema")
    assert {got[f"m{k}"] for k in range(3)} == {"missing_column:conversations"}
    assert ref.counts["rows_in"] == len(cases) + 1 + 2 + 3 == ref.counts["kept"] + ref.counts["rejected"]
    kept = pq.read_table(glob.glob(str(tmp_path / "out" / "data" / "*.parquet")))
    for images in kept.column("images").to_pylist():
        assert all(Image.open(io.BytesIO(b)).mode == "RGB" for b in images)


def test_one_image_with_three_questions_is_three_samples_or_one_merged_row(tmp_path, tiny_model_dir, local_ray):
    import dataclasses

    from bard_core.recipes import get_recipe
    from tasks.curate import run_curation

    images = [_png() for _ in range(3)]
    rows = [{"id": f"i{i}q{q}", "image": {"bytes": image, "path": None},
             "conversations": _turns(f"Question {q} about picture {i}?", f"Answer {q}."), "data_source": "x"}
            for i, image in enumerate(images) for q in range(3)]
    (tmp_path / "llava" / "s").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "llava" / "s" / "train.parquet")
    cfg = get_recipe("tiny").data
    separate = run_curation({"llava_ov": str(tmp_path / "llava")}, tmp_path / "separate", cfg, str(tiny_model_dir))
    assert separate.counts["kept"] == 9 and separate.counts["rejected"] == 0  # same image, other question: kept

    merged = run_curation({"llava_ov": str(tmp_path / "llava")}, tmp_path / "merged",
                          dataclasses.replace(cfg, merge_same_image=True), str(tiny_model_dir))
    assert merged.counts["kept"] == 3 and merged.counts["rows_in"] == 9
    kept = pq.read_table(glob.glob(str(tmp_path / "merged" / "data" / "*.parquet"))).to_pylist()
    for row in kept:
        users = [m for m in row["messages"] if m["role"] == "user"]
        texts = [p["text"] for m in users for p in m["content"] if p["type"] == "text"]
        assert len(users) == 3 and len({t.split("picture ")[1] for t in texts}) == 1  # one picture's questions
        assert sum(p["type"] == "image" for m in row["messages"] for p in m["content"]) == 1
    leaders = {r["sample_id"] for r in kept}
    rejects = _rejects(tmp_path / "merged")
    assert {r["reason"] for r in rejects} == {"merged_same_image"} and len(rejects) == 6
    assert all(r["duplicate_of"] in leaders for r in rejects)


def test_streamed_source_matches_the_parquet_reader_row_for_row_and_the_data_seed_orders_the_rows(world_dir, tiny_model_dir, tmp_path, local_ray):
    from bard_core.recipes import get_recipe
    from tasks.curate import run_curation

    cfg = get_recipe("tiny").data
    local = run_curation({"finevision": str(world_dir / "sources/finevision")}, tmp_path / "a", cfg, str(tiny_model_dir))
    streamed = run_curation({"finevision": f"stream://{world_dir / 'sources/finevision'}"}, tmp_path / "b", cfg,
                            str(tiny_model_dir))
    assert streamed.counts == local.counts and streamed.fingerprint != local.fingerprint
    ids = lambda p: pq.read_table(sorted(glob.glob(str(p / "data" / "*.parquet")))).column("sample_id").to_pylist()  # noqa: E731
    # the same rows in the same order: the written order follows the rows and the data seed, not the fingerprint
    # (a re-curation for any other reason used to reorder them, and so every batch a stage trained on)
    assert ids(tmp_path / "a") == ids(tmp_path / "b") and len(ids(tmp_path / "a")) == local.num_rows
    reseeded = run_curation({"finevision": str(world_dir / "sources/finevision")}, tmp_path / "c",
                            dataclasses.replace(cfg, seed=cfg.seed + 1), str(tiny_model_dir))
    assert reseeded.counts == local.counts and reseeded.fingerprint != local.fingerprint
    assert Counter(ids(tmp_path / "c")) == Counter(ids(tmp_path / "a")) and ids(tmp_path / "c") != ids(tmp_path / "a")
