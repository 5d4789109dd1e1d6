"""Near-duplicate quality: precision and recall of curation's "same sample" test on labelled pairs.

    python -m benchmarks.dedup_quality [--threshold T] [--colour-threshold C] [--sweep]

Positives (one sample, copied): real photographs (scikit-image's and scikit-learn's bundled samples) and
shapes-world scenes re-encoded as JPEG, resized 0.5–2×, cropped ≤ 5%, jittered slightly in colour, or
combinations, with the same conversation (re-typed: case and whitespace). Negatives (distinct samples that
look alike): other photographs; single shapes on a plain background recoloured, moved or resized; a
shapes-world scene with one shape recoloured; the same image with another question. The decision is
curation's own (`dedup.text_key` equal and `dedup.images_near` at the recipe's thresholds). With `--sweep`,
precision and recall for a grid of thresholds. Last line: one JSON object (``precision``, ``recall``, ``pairs``).
"""

from __future__ import annotations

import argparse
import io
import json
import random
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance

from bard_core.config import DataConfig
from bard_core.curation import dedup
from bard_core.shapes import world

PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "ihc", "retina", "rocket", "camera", "coins",
          "moon", "page", "text", "brick", "grass", "gravel", "horse", "cell", "clock_motion")


def photographs(max_side: int = 384) -> dict[str, Image.Image]:
    """The sample photographs bundled with scikit-image and scikit-learn (no download), at most `max_side` px."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    folder = Path(skimage.data.__file__).parent
    out = {}
    for name in PHOTOS:
        path = next(folder.glob(f"{name}.*"))
        out[name] = Image.open(path).convert("RGB")
    for k, array in enumerate(load_sample_images().images):
        out[("china", "flower")[k]] = Image.fromarray(array)
    for image in out.values():
        image.thumbnail((max_side, max_side))
    return out


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def resize(image: Image.Image, factor: float) -> Image.Image:
    return image.resize((max(8, round(image.width * factor)), max(8, round(image.height * factor))),
                        Image.Resampling.BICUBIC)


def crop(image: Image.Image, fraction: float, where: str) -> Image.Image:
    """Cut `fraction` of the width and height: from one corner ("corner") or evenly around ("centre")."""
    dx, dy = round(image.width * fraction), round(image.height * fraction)
    if where == "corner":
        return image.crop((dx, dy, image.width, image.height))
    return image.crop((dx // 2, dy // 2, image.width - (dx - dx // 2), image.height - (dy - dy // 2)))


def jitter(image: Image.Image, brightness: float, saturation: float) -> Image.Image:
    return ImageEnhance.Color(ImageEnhance.Brightness(image).enhance(brightness)).enhance(saturation)


COPIES = {
    "jpeg q50": lambda im: jpeg(im, 50),
    "jpeg q85": lambda im: jpeg(im, 85),
    "resize 0.5x": lambda im: resize(im, 0.5),
    "resize 0.75x": lambda im: resize(im, 0.75),
    "resize 1.5x": lambda im: resize(im, 1.5),
    "resize 2x": lambda im: resize(im, 2.0),
    "crop 2% corner": lambda im: crop(im, 0.02, "corner"),
    "crop 5% corner": lambda im: crop(im, 0.05, "corner"),
    "crop 5% centre": lambda im: crop(im, 0.05, "centre"),
    "colour jitter": lambda im: jitter(im, 1.03, 0.97),
    "resize 0.75x + jpeg q75": lambda im: jpeg(resize(im, 0.75), 75),
}


def single_shape(kind: str, colour: tuple[int, int, int], centre: tuple[int, int], size: int,
                 side: int = 96) -> Image.Image:
    image = Image.new("RGB", (side, side), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    x, y, r = centre[0], centre[1], size // 2
    if kind == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    elif kind == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=colour)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
    return image


def recoloured_scene(scene: world.Scene, rng: random.Random) -> world.Scene | None:
    """The scene with one shape in another colour (None when it has no shape)."""
    cells = list(scene.cells)
    shapes = [k for k, c in enumerate(cells) if c.kind == "shape"]
    if not shapes:
        return None
    k = rng.choice(shapes)
    other = rng.choice([c for c in world.COLOURS if c != cells[k].colour])
    cells[k] = type(cells[k])(**{**vars(cells[k]), "colour": other})
    return type(scene)(tuple(cells), scene.wash)


def labelled_pairs(seed: int = 0) -> list[tuple[str, bool, Image.Image, str, Image.Image, str]]:
    """(category, is a duplicate, image a, text a, image b, text b)."""
    rng = random.Random(seed)
    question = "user: Describe the picture.\nassistant: A picture."
    retyped = "user: describe  the PICTURE.\nassistant: a picture."
    pairs = []
    photos = photographs()
    names = list(photos)
    for image in photos.values():
        for label, copy in COPIES.items():
            pairs.append((f"photo: {label}", True, image, question, copy(image), retyped))
        pairs.append(("photo: same image, another question", False, image, question, image,
                      "user: What is in the top left corner?\nassistant: Sky."))
    for a, b in ((a, b) for k, a in enumerate(names) for b in names[k + 1:]):
        pairs.append(("photo: another photograph", False, photos[a], question, photos[b], question))
    colours = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
               "purple": (140, 50, 170), "orange": (240, 130, 20)}
    text = "user: What shape is this?\nassistant: A shape."
    for kind in ("circle", "square", "triangle"):
        for colour in colours:
            centre, size = (rng.randint(30, 66), rng.randint(30, 66)), rng.randint(24, 40)
            image = single_shape(kind, colours[colour], centre, size)
            for other in colours:
                if other != colour:
                    pairs.append(("shape: recoloured", False, image, text,
                                  single_shape(kind, colours[other], centre, size), text))
            moved = (centre[0] + rng.choice((-1, 1)) * 20, centre[1] + rng.choice((-1, 1)) * 12)
            pairs.append(("shape: moved", False, image, text, single_shape(kind, colours[colour], moved, size), text))
            pairs.append(("shape: resized", False, image, text,
                          single_shape(kind, colours[colour], centre, round(size * 1.6)), text))
            for label in ("jpeg q50", "resize 2x", "crop 2% corner"):
                pairs.append((f"shape: {label}", True, image, text, COPIES[label](image), text))
    for _ in range(40):
        scene = world.random_scene(rng)
        image = world.render(scene)
        _, q, a = world.ask(scene, rng)
        scene_text = f"user: {q}\nassistant: {a}"
        for label in ("jpeg q50", "resize 1.5x", "crop 2% corner"):
            pairs.append((f"scene: {label}", True, image, scene_text, COPIES[label](image), scene_text.upper()))
        recoloured = recoloured_scene(scene, rng)
        if recoloured is not None:
            pairs.append(("scene: one shape recoloured", False, image, scene_text, world.render(recoloured), scene_text))
    return pairs


def keys(pairs) -> list[tuple[str, bool, tuple, tuple]]:
    """Each pair's images reduced to curation's keys (pHash, colour) and its texts to text keys."""
    return [(cat, dup, (dedup.phash64(a), dedup.colour_signature(a), dedup.text_key(ta)),
             (dedup.phash64(b), dedup.colour_signature(b), dedup.text_key(tb))) for cat, dup, a, ta, b, tb in pairs]


def judge(keyed, threshold: int, colour_threshold: int) -> dict:
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    tp = fp = fn = 0
    for cat, dup, (pa, ca, ta), (pb, cb, tb) in keyed:
        said = ta == tb and dedup.images_near([pa], [ca], [pb], [cb], threshold, colour_threshold)
        per[cat][0] += 1
        per[cat][1] += said
        tp, fp, fn = tp + (said and dup), fp + (said and not dup), fn + (dup and not said)
    return {"precision": tp / max(1, tp + fp), "recall": tp / max(1, tp + fn), "pairs": len(keyed),
            "positives": tp + fn, "negatives": len(keyed) - tp - fn,
            "per_category": {c: {"pairs": n, "flagged": k} for c, (n, k) in sorted(per.items())}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threshold", type=int, default=DataConfig().phash_threshold)
    parser.add_argument("--colour-threshold", type=int, default=DataConfig().colour_threshold)
    parser.add_argument("--sweep", action="store_true", help="precision/recall over pHash 8–16 bits × colour 15–40 chroma levels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    keyed = keys(labelled_pairs(args.seed))
    if args.sweep:
        print(f"{'pHash t':>7} {'colour c':>8} {'precision':>9} {'recall':>7}")
        for t in range(8, 17, 2):
            for c in range(15, 41, 5):
                r = judge(keyed, t, c)
                print(f"{t:>7} {c:>8} {r['precision']:>9.3f} {r['recall']:>7.3f}")
    result = judge(keyed, args.threshold, args.colour_threshold)
    print(f"near-duplicate quality at pHash t={args.threshold}, colour c={args.colour_threshold}: "
          f"{result['positives']} duplicate pairs, {result['negatives']} look-alike pairs")
    print(f"{'category':<40} {'duplicate':>9} {'pairs':>6} {'flagged':>8}")
    duplicates = {cat for cat, dup, _, _ in keyed if dup}
    for cat, r in result["per_category"].items():
        print(f"{cat:<40} {'yes' if cat in duplicates else 'no':>9} {r['pairs']:>6} {r['flagged']:>8}")
    print(f"precision {result['precision']:.3f}, recall {result['recall']:.3f}")
    print(json.dumps({**result, "threshold": args.threshold, "colour_threshold": args.colour_threshold}))


if __name__ == "__main__":
    main()
