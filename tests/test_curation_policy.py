"""Curation's global decisions on row keys (`bard_core.curation.policy.decide`), without Ray or files."""

from __future__ import annotations

from bard_core.config import DataConfig
from bard_core.curation import dedup
from bard_core.curation.policy import Reject, decide, duplicate_clusters

FAR = [0, (1 << 64) - 1, 0x0F0F0F0F0F0F0F0F, 0xF0F0F0F0F0F0F0F0, 0x00FF00FF00FF00FF]  # pairwise > 16 bits apart
CFG = DataConfig(phash_threshold=4, colour_threshold=20)
GREY, RED, BLUE = bytes([128] * 128), bytes([90, 240] * 64), bytes([240, 110] * 64)  # colour signatures


def key(sample_id: str, source: str, order: int, phash: int | list[int], *, exact: str | None = None,
        rating: float = 3.0, question: str = "What colour is the circle?", answer: str = "red",
        colour: bytes | list[bytes] = GREY, reason: str | None = None) -> dict:
    phash = [phash] if isinstance(phash, int) else phash
    colour = [colour] * len(phash) if isinstance(colour, bytes) else colour
    return {"sample_id": sample_id, "source": source, "order": order, "reason": reason, "phash": phash,
            "colour": colour, "exact": exact or sample_id, "question": question, "rating": rating,
            "text": dedup.text_key(f"user: {question}\nassistant: {answer}")}


def nothing() -> dedup.Contamination:
    return dedup.Contamination([], [], [], [], 4, 20, 13, set())


def reasons(rejects: dict[str, Reject]) -> dict[str, str]:
    return {k: r.reason for k, r in rejects.items()}


def within_thresholds(a: dict, b: dict, cfg: DataConfig = CFG) -> bool:
    return a["text"] == b["text"] and dedup.images_near(a["phash"], a["colour"], b["phash"], b["colour"],
                                                        cfg.phash_threshold, cfg.colour_threshold)


def test_exact_duplicates_keep_the_first_row_in_source_then_row_order_and_name_it():
    keys = [key("b2", "llava_ov", 5, FAR[0], exact="same"), key("a1", "finevision", 9, FAR[1], exact="same"),
            key("b1", "llava_ov", 1, FAR[2], exact="same"), key("c", "llava_ov", 2, FAR[3])]
    rejects = decide(keys, CFG, nothing())
    assert rejects == {"b2": Reject("exact_duplicate", "a1"), "b1": Reject("exact_duplicate", "a1")}  # "finevision" first


def test_row_level_rejects_are_left_to_their_own_reason():
    keys = [key("bad", "llava_ov", 0, FAR[0], exact="same", reason="corrupt_image"), key("ok", "llava_ov", 1, FAR[1],
                                                                                        exact="same")]
    assert decide(keys, CFG, nothing()) == {}


def test_the_same_image_with_other_conversations_is_kept_and_a_retyped_one_is_not():
    image = FAR[2]
    keys = [key("q1", "finevision", 0, image, question="What colour is the circle?"),
            key("q2", "finevision", 1, image, question="How many shapes are there?", answer="3"),
            key("q3", "finevision", 2, image ^ 0b1, question="Is there a square?", answer="no"),  # a re-encode
            key("typed", "finevision", 3, image ^ 0b10, question="what  COLOUR is the\tcircle?", answer="Red")]
    assert decide(keys, CFG, nothing()) == {"typed": Reject("near_duplicate", "q1")}


def test_a_chain_of_look_alikes_drops_only_rows_within_reach_of_a_kept_row():
    # A~B, B~C, C~D (3 bits apart each), every other pair > 4 bits: union-find dropped B, C and D for A
    a = 0
    b, c, d = a ^ 0b111, a ^ 0b111 ^ (0b111 << 8), a ^ 0b111 ^ (0b111 << 8) ^ (0b111 << 16)
    keys = [key(name, "llava_ov", k, h) for k, (name, h) in enumerate(zip("ABCD", (a, b, c, d)))]
    rejects = decide(keys, CFG, nothing())
    assert rejects == {"B": Reject("near_duplicate", "A"), "D": Reject("near_duplicate", "C")}  # C is far from A
    by_id = {k["sample_id"]: k for k in keys}
    assert all(within_thresholds(by_id[s], by_id[r.of]) for s, r in rejects.items())
    # with B rated best it leads: A and C are both within reach of B, and D, far from B, stays
    keys[1]["rating"] = 5.0
    assert decide(keys, CFG, nothing()) == {"A": Reject("near_duplicate", "B"), "C": Reject("near_duplicate", "B")}


def test_near_duplicate_images_must_agree_in_colour_and_in_every_image():
    keys = [key("red", "llava_ov", 0, FAR[0], colour=RED),
            key("blue", "llava_ov", 1, FAR[0] ^ 1, colour=BLUE),  # same layout, other colours: kept
            key("red2", "llava_ov", 2, FAR[0] ^ 2, colour=bytes([95, 232] * 64)),  # a re-encode: a copy
            key("pair", "finevision", 0, [FAR[1], FAR[2]]),
            key("pair2", "finevision", 1, [FAR[1] ^ 1, FAR[3]]),  # its second image is another picture
            key("pair3", "finevision", 2, [FAR[1] ^ 1, FAR[2] ^ 4])]
    assert decide(keys, CFG, nothing()) == {"red2": Reject("near_duplicate", "red"),
                                           "pair3": Reject("near_duplicate", "pair")}


def test_near_duplicates_keep_the_best_rated_and_a_benchmark_leak_never_becomes_the_keeper():
    near = FAR[0] ^ 0b11  # 2 bits from FAR[0]
    keys = [key("low", "finevision", 0, FAR[0], rating=2.0), key("high", "finevision", 1, near, rating=5.0),
            key("alone", "finevision", 2, FAR[2])]
    assert decide(keys, CFG, nothing()) == {"low": Reject("near_duplicate", "high")}
    benchmark = near | (0b111 << 10)  # 3 bits from "high", 5 from "low": "high" shows a benchmark image
    leak = dedup.Contamination([benchmark], [GREY], ["Which?"], ["shapes_ocr:q3"], 4, 20, 13, set())
    assert decide(keys, CFG, leak) == {"high": Reject("benchmark_image", "shapes_ocr:q3")}  # "low" is kept


def test_the_manifest_lists_the_largest_duplicate_clusters_first():
    keys = [key("a", "llava_ov", 0, FAR[0])] + [key(f"a{k}", "llava_ov", k, FAR[0] ^ (1 << k)) for k in range(1, 4)]
    keys += [key("b", "finevision", 0, FAR[1]), key("b1", "finevision", 1, FAR[1], exact="b")]
    rejects = decide(keys, CFG, nothing())
    assert reasons(rejects) == {"a1": "near_duplicate", "a2": "near_duplicate", "a3": "near_duplicate",
                                "b1": "exact_duplicate"}
    clusters = duplicate_clusters(rejects, keys)
    assert [(c["kept"], c["source"], c["duplicates"]) for c in clusters] == [("a", "llava_ov", 3), ("b", "finevision", 1)]
    assert clusters[0]["examples"] == ["a1", "a2", "a3"]


def test_the_mix_selects_the_target_size_by_source_weight_and_names_the_rest():
    keys = [key(f"l{i}", "llava_ov", i, FAR[0] + (i << 40) * 977) for i in range(1, 5)]
    keys += [key(f"f{i}", "finevision", i, FAR[1] - (i << 40) * 977) for i in range(1, 5)]
    cfg = DataConfig(phash_threshold=0, target_size=4, weights={"llava_ov": 3.0, "finevision": 1.0})
    rejects = decide(keys, cfg, nothing())
    kept = [k["sample_id"] for k in keys if k["sample_id"] not in rejects]
    assert len(kept) == 4 and set(reasons(rejects).values()) == {"mix_not_selected"}
    assert sum(s.startswith("l") for s in kept) == 3  # 3 : 1
    assert decide(keys, cfg, nothing()) == rejects  # seeded: the same rows every time


def test_rows_showing_the_same_images_merge_only_when_asked_and_within_the_token_cap():
    from bard_core.curation.policy import merge_gains, merged_messages

    def row(sample_id: str, order: int, image: bytes, tokens: int, question: str) -> dict:
        return {**key(sample_id, "finevision", order, FAR[order % 5], question=question),
                "images": dedup.images_key([image]), "num_tokens": tokens, "messages": [question]}

    keys = [row("a", 0, b"img1", 100, "Q1"), row("b", 1, b"img1", 100, "Q2"), row("c", 2, b"img2", 100, "Q3"),
            row("d", 3, b"img1", 100, "Q4"), row("e", 4, b"img1", 100, "Q5")]
    assert decide(keys, DataConfig(phash_threshold=0), nothing()) == {}  # off by default: every conversation kept
    merging = DataConfig(phash_threshold=0, merge_same_image=True, max_tokens=300)
    # a, b and d fill the cap (300 tokens); e would not fit, so it leads a new merged row
    rejects = decide(keys, merging, nothing())
    assert rejects == {"b": Reject("merged_same_image", "a"), "d": Reject("merged_same_image", "a")}
    assert merge_gains(rejects, keys) == {"a": {"messages": [["Q2"], ["Q4"]], "tokens": 200}}  # in row order
    user = lambda q, image: {"role": "user", "content": ([{"type": "image", "text": None}] if image else [])  # noqa: E731
                             + [{"type": "text", "text": q}]}
    answer = {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}
    merged = merged_messages([user("Q1", True), answer], [[user("Q2", True), answer]])
    assert [m["role"] for m in merged] == ["user", "assistant", "user", "assistant"]
    assert sum(p["type"] == "image" for m in merged for p in m["content"]) == 1  # the image once, first
