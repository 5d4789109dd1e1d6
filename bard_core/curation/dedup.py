"""Deduplication and decontamination decisions (pure, on small per-row keys, never on image bytes).

Image keys: a 64-bit pHash (grey-level structure, `phash64`) and a colour signature (`colour_signature`: the
mean chroma, Cb and Cr, of an 8×8 grid). Two images are *near-identical* when their pHashes are within ``t``
bits AND no grid cell's chroma differs by more than ``c`` levels: re-encoded, resized or lightly cropped
copies pass both; the same picture in other colours fails the second, which pHash (grey levels, and blind to
contrast) cannot see. Why these keys and thresholds: docs/curation.md (`benchmarks/dedup_quality.py`).

Exact duplicates: same normalised text and same image bytes (``exact_key`` over ``images_key``).
Near duplicates: the same sample, i.e. the same number of images, pairwise near-identical in order, AND the
same conversation up to case, Unicode form and whitespace (``text_key``). The same image with another
question is another sample and is kept. Candidates are rows with one text key; among them, banded buckets
of the first image's pHash (``t + 1`` bands: two hashes within ``t`` agree on one band, by pigeonhole) find
the pairs, so the cost grows linearly with the number of rows.
Leader clustering (``near_duplicates``): rows in rank order (best rating, then earliest); a row is kept
unless it is a near duplicate of a row already kept, which it then names. Every reject lies within the
thresholds of the row it names: nothing is dropped through a chain of look-alikes.
Decontamination: an image near-identical to a benchmark image, or a question that covers at least half
of some benchmark question's ``n``-word n-grams (template n-grams common in training are ignored); the
reject names the benchmark item.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections import defaultdict

import numpy as np


def phash64(image) -> int:
    """The 64-bit perceptual hash (pHash, on grey levels) of a PIL image: the near-duplicate and
    decontamination key of every image, in curation and in the shapes world's generator alike."""
    import imagehash

    return int(str(imagehash.phash(image)), 16)


def colour_signature(image) -> bytes:
    """The mean chroma (Cb, Cr) of an 8×8 grid over a PIL image: 128 bytes. Position-aware and absolute, so a
    recoloured shape shows in its cells; a grid mean barely moves under re-encoding, resizing or a small crop."""
    from PIL import Image

    small = image.convert("RGB").resize((8, 8), Image.Resampling.BOX).convert("YCbCr")
    return np.asarray(small, dtype=np.uint8)[..., 1:].tobytes()


def colours_agree(a: bytes, b: bytes, colour_threshold: int) -> bool:
    """No cell of two colour signatures differs by more than `colour_threshold` chroma levels."""
    return len(a) == len(b) and int(np.abs(np.frombuffer(a, np.uint8).astype(np.int16)
                                          - np.frombuffer(b, np.uint8)).max(initial=0)) <= colour_threshold


def exact_key(text: str, images: str) -> str:
    """Same lower-cased, whitespace-collapsed text and the same image bytes (`images`: their `images_key`)."""
    return hashlib.sha256(f"{' '.join(text.lower().split())}\x00{images}".encode()).hexdigest()


def images_key(images: list[bytes]) -> str:
    """The identity of a row's images, byte for byte ("" for none): rows with one key show the same images."""
    if not images:
        return ""
    h = hashlib.sha256()
    for data in images:
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


def normalise_text(text: str) -> str:
    """A conversation's text as compared for near duplicates: Unicode NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def text_key(text: str) -> str:
    return hashlib.blake2b(normalise_text(text).encode(), digest_size=12).hexdigest()


def band_masks(threshold: int) -> list[tuple[int, int]]:
    """(shift, mask) of t+1 contiguous bands covering the 64 bits."""
    n = threshold + 1
    edges = [round(k * 64 / n) for k in range(n + 1)]
    return [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]


def near_duplicate_pairs(hashes: np.ndarray, threshold: int) -> np.ndarray:
    """All pairs (i < j) with popcount(h_i ^ h_j) <= threshold, found through band buckets: int64 [K, 2]."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    if len(hashes) < 2:
        return np.zeros((0, 2), dtype=np.int64)
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


def images_near(phash_a: list[int], colour_a: list[bytes], phash_b: list[int], colour_b: list[bytes],
                threshold: int, colour_threshold: int) -> bool:
    """Same number of images, pairwise near-identical in order (pHash within t and colours within c)."""
    return len(phash_a) == len(phash_b) and all(
        (pa ^ pb).bit_count() <= threshold and colours_agree(ca, cb, colour_threshold)
        for pa, pb, ca, cb in zip(phash_a, phash_b, colour_a, colour_b))


def near_duplicates(rows: list[dict], order: list[int], threshold: int, colour_threshold: int) -> dict[int, int]:
    """Leader clustering of `rows` (each with ``phash``, ``colour``: per image; ``text``: its `text_key`) taken in
    `order` (best first): {rejected row: the kept row it duplicates}. Rows not in the result are kept."""
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[(row["text"], len(row["phash"]))].append(i)
    neighbours: dict[int, list[int]] = defaultdict(list)
    for (_, n_images), members in groups.items():
        if len(members) < 2:
            continue
        if n_images == 0:  # the same text and no image: every pair
            pairs = [(a, b) for k, a in enumerate(members) for b in members[k + 1:]]
        else:
            found = near_duplicate_pairs(np.array([rows[i]["phash"][0] for i in members], dtype=np.uint64), threshold)
            pairs = [(members[a], members[b]) for a, b in found.tolist()]
        for a, b in pairs:
            if images_near(rows[a]["phash"], rows[a]["colour"], rows[b]["phash"], rows[b]["colour"], threshold,
                           colour_threshold):
                neighbours[a].append(b)
                neighbours[b].append(a)
    rank = {i: k for k, i in enumerate(order)}
    kept: set[int] = set()
    duplicate_of: dict[int, int] = {}
    for i in order:
        keepers = [j for j in neighbours.get(i, ()) if j in kept]
        if keepers:
            duplicate_of[i] = min(keepers, key=rank.__getitem__)
        else:
            kept.add(i)
    return duplicate_of


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words[k:k + n]) for k in range(len(words) - n + 1)}


class Contamination:
    """Benchmark images (pHash + colour) and questions (word n-grams); `check(hashes, colours, question)` →
    (reason, the benchmark item it leaks: "task:id") or None.

    A question is contaminated when it shares at least `coverage` of some benchmark question's
    n-grams, ignoring `common_ngrams` (templates every training question shares): one shared
    template n-gram is not a leak, a copied question is.
    """

    def __init__(self, benchmark_hashes: list[int], benchmark_colours: list[bytes], benchmark_questions: list[str],
                 items: list[str], threshold: int, colour_threshold: int, n: int,
                 common_ngrams: set[tuple[str, ...]] | None = None, coverage: float = 0.5):
        if not len(benchmark_hashes) == len(benchmark_colours) == len(items) or len(benchmark_questions) != len(items):
            raise ValueError("one image hash, colour signature, question and item name per benchmark item")
        self.hashes = np.asarray(benchmark_hashes, dtype=np.uint64)
        self.colours = list(benchmark_colours)
        self.items, self.threshold, self.colour_threshold = list(items), threshold, colour_threshold
        self.n, self.coverage = n, coverage
        common = common_ngrams or set()
        self.index: dict[tuple[str, ...], list[int]] = defaultdict(list)
        self.sizes: list[int] = []
        for k, q in enumerate(benchmark_questions):
            grams = ngrams(q, n)
            self.sizes.append(len(grams))
            for g in grams - common:
                self.index[g].append(k)

    def check(self, image_hashes: list[int], image_colours: list[bytes], question: str) -> tuple[str, str] | None:
        if self.hashes.size and image_hashes:
            near = np.bitwise_count(self.hashes[None, :] ^ np.asarray(image_hashes, dtype=np.uint64)[:, None])
            for i, k in np.argwhere(near <= self.threshold).tolist():  # then the few pHash matches' colours
                if colours_agree(image_colours[i], self.colours[k], self.colour_threshold):
                    return "benchmark_image", self.items[k]
        shared: dict[int, int] = defaultdict(int)
        for g in ngrams(question, self.n):
            for k in self.index.get(g, ()):
                shared[k] += 1
        leaked = [k for k, count in shared.items() if count >= self.coverage * self.sizes[k]]
        if leaked:
            return "benchmark_question", self.items[min(leaked)]
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
