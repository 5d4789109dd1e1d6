"""Deduplication and decontamination decisions (pure, on small per-row keys, never on image bytes).

Exact duplicates: same normalised text and same image bytes (``exact_key``).
Near duplicates: 64-bit pHashes within Hamming distance ``t``. Candidates come from banded buckets:
the hash is cut into ``t + 1`` bands, and two hashes within distance ``t`` must agree on at least one
band (pigeonhole), so only bucket-mates are compared and cost grows linearly with the number of
hashes. Confirmed pairs are joined into connected components (union-find); each component keeps
its best member — highest minimum rating, then earliest — deterministically.
Decontamination: an image within ``t`` of any benchmark image, or a question that covers at least half
of some benchmark question's ``n``-word n-grams (template n-grams common in training are ignored).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np


def phash64(image) -> int:
    """The 64-bit perceptual hash (pHash, on grey levels) of a PIL image: the near-duplicate and
    decontamination key of every image, in curation and in the shapes world's generator alike."""
    import imagehash

    return int(str(imagehash.phash(image)), 16)


def exact_key(text: str, images: list[bytes]) -> str:
    h = hashlib.sha256(" ".join(text.lower().split()).encode())
    for data in images:
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


def band_masks(threshold: int) -> list[tuple[int, int]]:
    """(shift, mask) of t+1 contiguous bands covering the 64 bits."""
    n = threshold + 1
    edges = [round(k * 64 / n) for k in range(n + 1)]
    return [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]


class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_duplicate_pairs(hashes: np.ndarray, threshold: int) -> np.ndarray:
    """All pairs (i < j) with popcount(h_i ^ h_j) <= threshold, found through band buckets: int64 [K, 2]."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    found = []
    for shift, mask in band_masks(threshold):
        keys = (hashes >> np.uint64(shift)) & np.uint64(mask)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            members = order[s:e]
            a, b = np.triu_indices(len(members), 1)
            i, j = members[a], members[b]
            close = np.bitwise_count(hashes[i] ^ hashes[j]) <= threshold
            if close.any():
                found.append(np.stack([np.minimum(i, j)[close], np.maximum(i, j)[close]], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found), axis=0).astype(np.int64)


def near_duplicate_groups(image_hashes: list[list[int]], threshold: int) -> np.ndarray:
    """Component id per row: rows sharing any near-identical image (any of their images) join one group."""
    flat, owner = [], []
    for row, hashes in enumerate(image_hashes):
        for h in hashes:
            flat.append(h), owner.append(row)
    uf = UnionFind(len(image_hashes))
    if flat:
        owner_arr = np.asarray(owner)
        for i, j in near_duplicate_pairs(np.asarray(flat, dtype=np.uint64), threshold):
            uf.union(int(owner_arr[i]), int(owner_arr[j]))
    return np.array([uf.find(i) for i in range(len(image_hashes))])


def keep_best(groups: list, ratings: list[float], orders: list[int]) -> list[bool]:
    """Per row: True if it is its group's best member (highest rating, then earliest order)."""
    best: dict = {}
    for i, g in enumerate(groups):
        rank = (-ratings[i], orders[i], i)
        if g not in best or rank < best[g][0]:
            best[g] = (rank, i)
    keep = [False] * len(groups)
    for _, i in best.values():
        keep[i] = True
    return keep


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words[k:k + n]) for k in range(len(words) - n + 1)}


class Contamination:
    """Benchmark images (pHash) and questions (word n-grams); `check(hashes, question)` → reason or None.

    A question is contaminated when it shares at least `coverage` of some benchmark question's
    n-grams, ignoring `common_ngrams` (templates every training question shares): one shared
    template n-gram is not a leak, a copied question is.
    """

    def __init__(self, benchmark_hashes: list[int], benchmark_questions: list[str], threshold: int, n: int,
                 common_ngrams: set[tuple[str, ...]] | None = None, coverage: float = 0.5):
        self.hashes = np.asarray(benchmark_hashes, dtype=np.uint64)
        self.threshold, self.n, self.coverage = threshold, n, coverage
        common = common_ngrams or set()
        self.index: dict[tuple[str, ...], list[int]] = defaultdict(list)
        self.sizes: list[int] = []
        for k, q in enumerate(benchmark_questions):
            grams = ngrams(q, n)
            self.sizes.append(len(grams))
            for g in grams - common:
                self.index[g].append(k)

    def check(self, image_hashes: list[int], question: str) -> str | None:
        if self.hashes.size and image_hashes:
            h = np.asarray(image_hashes, dtype=np.uint64)
            if (np.bitwise_count(self.hashes[None, :] ^ h[:, None]) <= self.threshold).any():
                return "benchmark_image"
        shared: dict[int, int] = defaultdict(int)
        for g in ngrams(question, self.n):
            for k in self.index.get(g, ()):
                shared[k] += 1
        if any(count >= self.coverage * self.sizes[k] for k, count in shared.items()):
            return "benchmark_question"
        return None


def common_ngrams(questions: list[str], n: int, min_count: int) -> set[tuple[str, ...]]:
    """n-grams that occur in at least `min_count` training questions: templates, not leaks."""
    counts: dict[tuple[str, ...], int] = defaultdict(int)
    for q in questions:
        for g in ngrams(q, n):
            counts[g] += 1
    return {g for g, c in counts.items() if c >= min_count}


def mix_keep(sample_ids: list[str], sources: list[str], weights: dict[str, float], target: int | None,
             seed: int) -> list[bool]:
    """Deterministic weighted selection to `target` rows: each source gets target·w/Σw rows (at most all
    of them), chosen by a seeded hash order of sample ids. None keeps everything."""
    if target is None:
        return [True] * len(sample_ids)
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(sources):
        by_source[s.split("/")[0]].append(i)
    total = sum(weights.get(k, 0.0) for k in by_source) or 1.0
    keep = [False] * len(sample_ids)
    for kind, rows in by_source.items():
        quota = min(len(rows), round(target * weights.get(kind, 0.0) / total))
        ranked = sorted(rows, key=lambda i: hashlib.sha256(f"{seed}:{sample_ids[i]}".encode()).hexdigest())
        for i in ranked[:quota]:
            keep[i] = True
    return keep
