"""Curation's global decisions (DESIGN.md §3), pure: given every row's keys, which rows are rejected and why.

The engine (`tasks/curate.py`) projects each row to its keys — ``sample_id``, ``source``, ``order`` (row
order within its source), ``reason`` (a row-level reject already), ``exact`` (`dedup.exact_key`),
``phash`` (its images' pHashes), ``question`` and ``rating`` — and applies the reasons this returns.
"""

from __future__ import annotations

import hashlib

from bard_core.config import DataConfig
from bard_core.curation import dedup


def decide(keys: list[dict], cfg: DataConfig, contamination: dedup.Contamination) -> dict[str, str]:
    """Global decisions on the key projection: sample_id → reject reason (dedup, contamination, mix)."""
    reasons: dict[str, str] = {}
    live = [k for k in keys if not k["reason"]]
    # exact duplicates: earliest wins (sources in a fixed order, then row order)
    live.sort(key=lambda k: (k["source"], k["order"]))
    seen: set[str] = set()
    for k in live:
        if k["exact"] in seen:
            reasons[k["sample_id"]] = "exact_duplicate"
        seen.add(k["exact"])
    live = [k for k in live if k["sample_id"] not in reasons]
    for k in live:  # decontamination before near-dup: a leak must not become a group's keeper
        reason = contamination.check(k["phash"], k["question"])
        if reason:
            reasons[k["sample_id"]] = reason
    live = [k for k in live if k["sample_id"] not in reasons]
    groups = dedup.near_duplicate_groups([k["phash"] for k in live], cfg.phash_threshold)
    ratings = [k["rating"] for k in live]
    orders = [(hashlib.sha256(k["source"].encode()).hexdigest(), k["order"]) for k in live]
    rank = {o: i for i, o in enumerate(sorted(set(orders)))}
    keep = dedup.keep_best(list(groups), ratings, [rank[o] for o in orders])
    for k, ok in zip(live, keep):
        if not ok:
            reasons[k["sample_id"]] = "near_duplicate"
    live = [k for k, ok in zip(live, keep) if ok]
    mixed = dedup.mix_keep([k["sample_id"] for k in live], [k["source"] for k in live], cfg.weights,
                           cfg.target_size, cfg.seed)
    for k, ok in zip(live, mixed):
        if not ok:
            reasons[k["sample_id"]] = "mix_not_selected"
    return reasons
