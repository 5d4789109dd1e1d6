"""Near-identical images on real photographs and on look-alikes: the labelled pairs of
`benchmarks/dedup_quality.py`, judged by curation's own test at the recipe's thresholds."""

from __future__ import annotations

import pytest

from bard_core.config import DataConfig
from bard_core.curation import dedup
from benchmarks.dedup_quality import COPIES, judge, keys, labelled_pairs, photographs, single_shape

CFG = DataConfig()


@pytest.fixture(scope="module")
def judged():
    return judge(keys(labelled_pairs(0)), CFG.phash_threshold, CFG.colour_threshold)["per_category"]


def near(a, b) -> bool:
    return dedup.images_near([dedup.phash64(a)], [dedup.colour_signature(a)], [dedup.phash64(b)],
                             [dedup.colour_signature(b)], CFG.phash_threshold, CFG.colour_threshold)


def test_photographs_reencoded_resized_or_jittered_are_caught_and_other_photographs_are_not(judged):
    for label in ("jpeg q50", "jpeg q85", "resize 0.5x", "resize 0.75x", "resize 1.5x", "resize 2x",
                  "colour jitter", "resize 0.75x + jpeg q75", "crop 2% corner"):
        r = judged[f"photo: {label}"]
        assert r["flagged"] == r["pairs"] == 20, label
    assert judged["photo: another photograph"]["flagged"] == 0
    assert judged["photo: same image, another question"]["flagged"] == 0  # another sample


def test_five_percent_crops_are_mostly_caught(judged):
    # pHash sees a 5% crop as a shift of the whole picture: a few photographs move beyond the threshold
    # (docs/curation.md has the counts); the centred crop, a smaller shift, is nearly always caught
    assert judged["photo: crop 5% centre"]["flagged"] >= 18 and judged["photo: crop 5% corner"]["flagged"] >= 14


def test_recoloured_moved_or_resized_shapes_are_not_duplicates_and_their_copies_are(judged):
    for label in ("shape: recoloured", "shape: moved", "shape: resized", "scene: one shape recoloured"):
        assert judged[label]["flagged"] == 0, label
    for label in ("shape: jpeg q50", "shape: resize 2x", "scene: jpeg q50", "scene: resize 1.5x",
                  "scene: crop 2% corner"):
        assert judged[label]["flagged"] == judged[label]["pairs"], label


def test_a_grey_photograph_and_its_copy_agree_in_colour():
    camera = photographs()["camera"]  # no chroma at all: the colour test must not make it noisy
    assert near(camera, COPIES["jpeg q50"](camera)) and near(camera, COPIES["resize 0.5x"](camera))
    red, blue = (single_shape("circle", colour, (48, 48), 30) for colour in ((220, 40, 40), (40, 80, 220)))
    assert (dedup.phash64(red) ^ dedup.phash64(blue)).bit_count() <= CFG.phash_threshold  # pHash cannot tell
    assert not near(red, blue)  # the colour signature can


def test_the_quality_benchmark_meets_its_goal():
    result = judge(keys(labelled_pairs(1)), CFG.phash_threshold, CFG.colour_threshold)  # a second draw of shapes
    assert result["precision"] >= 0.99 and result["recall"] >= 0.95, result
