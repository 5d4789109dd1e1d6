"""Curation's global decisions (DESIGN.md §3), pure: given every row's keys, which rows are rejected and why.

The engine (`tasks/curate.py`) projects each row to its keys — ``sample_id``, ``source``, ``order`` (row
order within its source), ``reason`` (a row-level reject already), ``exact`` (`dedup.exact_key`),
``phash`` and ``colour`` (its images' pHashes and colour signatures), ``text`` (`dedup.text_key` of the whole
conversation), ``question``, ``rating``, and for ``data.merge_same_image`` ``images`` (`dedup.images_key`) and
``num_tokens`` — and applies the rejects this returns. Each names what it duplicates or was merged into (the
kept ``sample_id``) or contaminates (the benchmark item).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import NamedTuple

from bard_core.config import DataConfig
from bard_core.curation import dedup

DUPLICATES = ("exact_duplicate", "near_duplicate")
MERGED = "merged_same_image"  # not lost: its turns continue the kept row it names


class Reject(NamedTuple):
    reason: str
    of: str | None = None  # duplicates: the kept sample_id; contamination: the benchmark item ("task:id")


def decide(keys: list[dict], cfg: DataConfig, contamination: dedup.Contamination) -> dict[str, Reject]:
    """Global decisions on the key projection: sample_id → Reject (dedup, contamination, mix)."""
    rejects: dict[str, Reject] = {}
    live = [k for k in keys if not k["reason"]]
    # exact duplicates: earliest wins (sources in a fixed order, then row order)
    live.sort(key=lambda k: (k["source"], k["order"]))
    first: dict[str, str] = {}
    for k in live:
        if k["exact"] in first:
            rejects[k["sample_id"]] = Reject("exact_duplicate", first[k["exact"]])
        else:
            first[k["exact"]] = k["sample_id"]
    live = [k for k in live if k["sample_id"] not in rejects]
    for k in live:  # decontamination before near-dup: a leak must not become a keeper
        found = contamination.check(k["phash"], k["colour"], k["question"])
        if found:
            rejects[k["sample_id"]] = Reject(*found)
    live = [k for k in live if k["sample_id"] not in rejects]
    # leader order: best rating, then a fixed order of sources, then row order
    order = sorted(range(len(live)), key=lambda i: (-live[i]["rating"],
                                                     hashlib.sha256(live[i]["source"].encode()).hexdigest(),
                                                     live[i]["order"]))
    for i, keeper in dedup.near_duplicates(live, order, cfg.phash_threshold, cfg.colour_threshold).items():
        rejects[live[i]["sample_id"]] = Reject("near_duplicate", live[keeper]["sample_id"])
    live = [k for k in live if k["sample_id"] not in rejects]
    if cfg.merge_same_image:
        for absorbed, leader in same_image_merges(live, cfg.max_tokens).items():
            rejects[absorbed] = Reject(MERGED, leader)
        live = [k for k in live if k["sample_id"] not in rejects]
    mixed = dedup.mix_keep([k["sample_id"] for k in live], [k["source"] for k in live], cfg.weights,
                           cfg.target_size, cfg.seed)
    for k, ok in zip(live, mixed):
        if not ok:
            rejects[k["sample_id"]] = Reject("mix_not_selected")
    return rejects


def same_image_merges(keys: list[dict], max_tokens: int) -> dict[str, str]:
    """Rows showing the very same images (``images`` key), merged as FineVision merges them: into the first in
    source then row order, each next one while the merged row's token estimate stays within `max_tokens` (one
    that would not fit starts a new merged row). {absorbed sample_id: the sample_id it continues}."""
    groups: dict[str, list[dict]] = {}
    for k in sorted(keys, key=lambda k: (k["source"], k["order"])):
        if k["images"]:
            groups.setdefault(k["images"], []).append(k)
    merged: dict[str, str] = {}
    for members in groups.values():
        leader, tokens = members[0], members[0]["num_tokens"]
        for k in members[1:]:
            if tokens + k["num_tokens"] <= max_tokens:  # a sum over-counts the shared image's tokens: safe
                merged[k["sample_id"]], tokens = leader["sample_id"], tokens + k["num_tokens"]
            else:
                leader, tokens = k, k["num_tokens"]
    return merged


def merge_gains(rejects: dict[str, Reject], keys: list[dict]) -> dict[str, dict]:
    """Per row that others were merged into: the turns it gains (their ``messages``, in source then row order)
    and their tokens."""
    by_id = {k["sample_id"]: k for k in keys}
    gains: dict[str, dict] = {}
    for sample in sorted((s for s, r in rejects.items() if r.reason == MERGED),
                         key=lambda s: (by_id[s]["source"], by_id[s]["order"])):
        entry = gains.setdefault(rejects[sample].of, {"messages": [], "tokens": 0})
        entry["messages"].append(by_id[sample]["messages"])
        entry["tokens"] += by_id[sample]["num_tokens"]
    return gains


def merged_messages(leader: list[dict], others: list[list[dict]]) -> list[dict]:
    """The leader's turns, then each merged row's turns with their image parts dropped (the leader shows the
    images once, at its first turn)."""
    out = list(leader)
    for messages in others:
        for m in messages:
            content = [p for p in m["content"] if p.get("type") != "image"]
            if content:
                out.append({**m, "content": content})
    return out


def duplicate_clusters(rejects: dict[str, Reject], keys: list[dict], top: int = 10) -> list[dict]:
    """The largest groups of duplicates by the row they kept: keeper, its source, how many rows name it, and a
    few of them — for a person to eyeball in the manifest."""
    named = Counter(r.of for r in rejects.values() if r.reason in DUPLICATES)
    source = {k["sample_id"]: k["source"] for k in keys}
    examples: dict[str, list[str]] = {}
    for sample, r in rejects.items():
        if r.reason in DUPLICATES and len(examples.setdefault(r.of, [])) < 3:
            examples[r.of].append(sample)
    return [{"kept": keeper, "source": source.get(keeper), "duplicates": n, "examples": sorted(examples[keeper])}
            for keeper, n in sorted(named.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
