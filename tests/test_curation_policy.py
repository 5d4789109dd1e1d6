"""Curation's global decisions on row keys (`bard_core.curation.policy.decide`), without Ray or files."""

from __future__ import annotations

from bard_core.config import DataConfig
from bard_core.curation import dedup
from bard_core.curation.policy import decide

FAR = [0, (1 << 64) - 1, 0x0F0F0F0F0F0F0F0F, 0xF0F0F0F0F0F0F0F0, 0x00FF00FF00FF00FF]  # pairwise > 16 bits apart


def key(sample_id: str, source: str, order: int, phash: int, *, exact: str | None = None, rating: float = 3.0,
        question: str = "What colour is the circle?", reason: str | None = None) -> dict:
    return {"sample_id": sample_id, "source": source, "order": order, "reason": reason, "phash": [phash],
            "exact": exact or sample_id, "question": question, "rating": rating}


def nothing() -> dedup.Contamination:
    return dedup.Contamination([], [], 4, 13, set())


def test_exact_duplicates_keep_the_first_row_in_source_then_row_order():
    keys = [key("b2", "llava_ov", 5, FAR[0], exact="same"), key("a1", "finevision", 9, FAR[1], exact="same"),
            key("b1", "llava_ov", 1, FAR[2], exact="same"), key("c", "llava_ov", 2, FAR[3])]
    reasons = decide(keys, DataConfig(phash_threshold=4), nothing())
    assert reasons == {"b2": "exact_duplicate", "b1": "exact_duplicate"}  # "finevision" sorts first


def test_row_level_rejects_are_left_to_their_own_reason():
    keys = [key("bad", "llava_ov", 0, FAR[0], exact="same", reason="corrupt_image"), key("ok", "llava_ov", 1, FAR[1],
                                                                                        exact="same")]
    assert decide(keys, DataConfig(phash_threshold=4), nothing()) == {}


def test_near_duplicates_keep_the_best_rated_and_a_benchmark_leak_never_becomes_the_keeper():
    near = FAR[0] ^ 0b11  # 2 bits from FAR[0]
    keys = [key("low", "finevision", 0, FAR[0], rating=2.0), key("high", "finevision", 1, near, rating=5.0),
            key("alone", "finevision", 2, FAR[2])]
    assert decide(keys, DataConfig(phash_threshold=4), nothing()) == {"low": "near_duplicate"}
    benchmark = near | (0b111 << 10)  # 3 bits from "high", 5 from "low": "high" shows a benchmark image
    reasons = decide(keys, DataConfig(phash_threshold=4), dedup.Contamination([benchmark], [], 4, 13, set()))
    assert reasons == {"high": "benchmark_image"}  # and "low", no longer its near duplicate's loser, is kept


def test_the_mix_selects_the_target_size_by_source_weight_and_names_the_rest():
    keys = [key(f"l{i}", "llava_ov", i, FAR[0] + (i << 40) * 977) for i in range(1, 5)]
    keys += [key(f"f{i}", "finevision", i, FAR[1] - (i << 40) * 977) for i in range(1, 5)]
    cfg = DataConfig(phash_threshold=0, target_size=4, weights={"llava_ov": 3.0, "finevision": 1.0})
    reasons = decide(keys, cfg, nothing())
    kept = [k["sample_id"] for k in keys if k["sample_id"] not in reasons]
    assert len(kept) == 4 and set(reasons.values()) == {"mix_not_selected"}
    assert sum(s.startswith("l") for s in kept) == 3  # 3 : 1
    assert decide(keys, cfg, nothing()) == reasons  # seeded: the same rows every time
