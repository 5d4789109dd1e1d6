"""Curation throughput: decode + validate + pHash + colour signature of 384-px images per core, and the
near-duplicate stage (`dedup.near_duplicates`: grouping by text, banded pHash pairs, leader clustering) on
10k / 100k / 1M synthetic rows (it should grow about linearly).

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
from bard_core.curation.dedup import near_duplicates
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


def synthetic_rows(n: int, threshold: int, seed: int = 0) -> tuple[list[dict], int]:
    """n rows of one image each: random pHashes, colours and texts; 1% are planted near copies (1..threshold
    bits flipped, same colour and text) of other rows, and 5% show another row's image with their own text
    (kept: another sample)."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n).astype(np.uint64)
    colours = [bytes(c) for c in rng.integers(0, 256, (n, 128), dtype=np.uint8)]
    texts = [f"t{k}" for k in range(n)]
    planted = n // 100
    for k, s in enumerate(rng.integers(0, n // 2, planted)):
        h = int(hashes[s])
        for b in rng.choice(64, size=rng.integers(1, threshold + 1), replace=False):
            h ^= 1 << int(b)
        target = n - planted + k
        hashes[target], colours[target], texts[target] = h, colours[s], texts[s]
    for k, s in enumerate(rng.integers(0, n // 2, n // 20)):  # image reuse with other questions
        hashes[n // 2 + k], colours[n // 2 + k] = hashes[s], colours[s]
    rows = [{"phash": [int(h)], "colour": [c], "text": t} for h, c, t in zip(hashes, colours, texts)]
    return rows, planted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--side", type=int, default=384)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--threshold", type=int, default=DataConfig().phash_threshold)
    parser.add_argument("--colour-threshold", type=int, default=DataConfig().colour_threshold)
    args = parser.parse_args()

    data = images(args.images, args.side)
    cfg = DataConfig()
    inspect_image(data[0], cfg)  # warm-up
    t0 = time.perf_counter()
    for d in data:
        result = inspect_image(d, cfg)
        assert not isinstance(result, str), result
    image_seconds = time.perf_counter() - t0
    per_core = args.images / image_seconds

    dedup_seconds, rows = {}, []
    for n in (int(s) for s in args.sizes.split(",")):
        keys, planted = synthetic_rows(n, args.threshold)
        t0 = time.perf_counter()
        found = near_duplicates(keys, list(range(n)), args.threshold, args.colour_threshold)
        seconds = time.perf_counter() - t0
        dedup_seconds[str(n)] = seconds
        rows.append({"rows": n, "planted": planted, "rejected": len(found), "seconds": seconds})

    print(f"curation speed — one core; images {args.side}px ({args.images}, PNG/JPEG alternating)")
    print(f"decode + validate + pHash + colour: {per_core:.0f} images/s/core ({image_seconds:.2f} s)")
    print(f"{'rows':>9} {'planted':>8} {'rejected':>9} {'seconds':>8} {'s per 1k':>9}")
    for r in rows:
        print(f"{r['rows']:>9} {r['planted']:>8} {r['rejected']:>9} {r['seconds']:>8.2f} "
              f"{1000 * r['seconds'] / r['rows']:>9.4f}")
    print(json.dumps({"images_per_s_per_core": per_core, "image_side": args.side, "dedup_seconds": dedup_seconds,
                      "threshold": args.threshold, "colour_threshold": args.colour_threshold, "rows": rows}))


if __name__ == "__main__":
    main()
