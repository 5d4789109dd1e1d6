"""Curation throughput: decode + validate + pHash of 384-px images per core, and the near-duplicate
stage on 10k / 100k / 1M synthetic 64-bit hashes (it should grow about linearly).

    python -m benchmarks.curation_speed [--images 600] [--sizes 10000,100000,1000000]

One process, one core for the image stage (per-core figure); the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
from PIL import Image

from bard_core.config import DataConfig
from bard_core.curation.dedup import near_duplicate_groups, near_duplicate_pairs
from bard_core.curation.filters import inspect_image


def images(n: int, side: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small, "RGB").resize((side, side), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG" if k % 2 else "PNG", quality=90)
        out.append(buffer.getvalue())
    return out


def synthetic_hashes(n: int, threshold: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """n random hashes, 1% of them planted near copies (1..threshold bits flipped) of others."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n).astype(np.uint64)
    planted = n // 100
    src = rng.integers(0, n - planted, planted)
    for k, s in enumerate(src):
        h = hashes[s]
        for b in rng.choice(64, size=rng.integers(1, threshold + 1), replace=False):
            h ^= np.uint64(1 << int(b))
        hashes[n - planted + k] = h
    return hashes, planted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--side", type=int, default=384)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--threshold", type=int, default=4)
    args = parser.parse_args()

    data = images(args.images, args.side)
    cfg = DataConfig()
    inspect_image(data[0], cfg)  # warm-up
    t0 = time.perf_counter()
    for d in data:
        result = inspect_image(d, cfg)
        assert not isinstance(result, str), result
    seconds = time.perf_counter() - t0
    per_core = args.images / seconds

    dedup_seconds, rows = {}, []
    for n in (int(s) for s in args.sizes.split(",")):
        hashes, planted = synthetic_hashes(n, args.threshold)
        t0 = time.perf_counter()
        pairs = near_duplicate_pairs(hashes, args.threshold)
        t_pairs = time.perf_counter() - t0
        t0 = time.perf_counter()
        near_duplicate_groups([[int(h)] for h in hashes], args.threshold)  # pairs again + union-find
        t_groups = time.perf_counter() - t0
        dedup_seconds[str(n)] = t_groups
        rows.append({"hashes": n, "planted": planted, "pairs_found": int(len(pairs)), "pairs_s": t_pairs,
                     "components_s": t_groups})

    print(f"curation speed — one core; images {args.side}px ({args.images}, PNG/JPEG alternating)")
    print(f"decode + validate + pHash: {per_core:.0f} images/s/core ({seconds:.2f} s)")
    print(f"{'hashes':>9} {'planted':>8} {'pairs':>7} {'pairs s':>8} {'s per 1k':>9} {'whole stage s':>14}")
    for r in rows:
        comp = f"{r['components_s']:.2f}"
        print(f"{r['hashes']:>9} {r['planted']:>8} {r['pairs_found']:>7} {r['pairs_s']:>8.2f} "
              f"{1000 * r['pairs_s'] / r['hashes']:>9.4f} {comp:>14}")
    print(json.dumps({"images_per_s_per_core": per_core, "image_side": args.side, "dedup_seconds": dedup_seconds,
                      "threshold": args.threshold, "rows": rows}))


if __name__ == "__main__":
    main()
