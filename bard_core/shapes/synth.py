"""`bard synth`: write the shapes world — two training sources with planted defects and five benchmarks.

Layout of ``OUT``::

    sources/llava_ov/<subset>/train-00000-of-00001.parquet    LLaVA-OneVision-1.5 instruct schema
    sources/finevision/<subset>/train-00000-of-00001.parquet  FineVision schema
    benchmarks/shapes_<name>/test.parquet, shapes_<name>.yaml, metrics.py   lm-eval tasks
    planted.json   which rows carry which defect (curation scores itself against it)
    world.json     world version, seed, sizes, perceptual-hash threshold

Every clean scene (training or benchmark) differs from every other by more than ``2 × phash_threshold``
bits of 64-bit pHash, so a near-duplicate (within the threshold of its original, by construction)
can never chain two clean scenes together, and the benchmarks are disjoint from training except
through the planted leaks. Same seed → byte-identical files. The benchmarks' lm-eval files are written by
`bard_core.shapes.lm_tasks`; this module draws the scenes and the sources with their planted defects (over
300 lines: every defect is planted here, next to the clean rows it must stay apart from).
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from bard_core.curation.dedup import phash64
from bard_core.shapes import world
from bard_core.shapes.lm_tasks import write_benchmarks
from bard_core.shapes.metrics import BENCHMARKS
from bard_core.shapes.world import Scene

LLAVA_SUBSETS = ("shapes_fv", "shapes_rc")  # {from,value} turns; {role,content} turns mixed with nulls
FINEVISION_SUBSETS = ("shapes_qa", "shapes_qa_rev", "shapes_pair")  # user-first, assistant-first, two images
RATING_COLUMNS = ("relevance", "image_correspondence", "visual_dependency", "formatting")
DEFECTS = ("exact_duplicate", "near_duplicate", "corrupt_image", "empty_answer", "overlong_answer",
           "low_rating", "benchmark_leak")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class SceneBank:
    """Draws scenes that are pairwise more than ``separation`` pHash bits apart."""

    def __init__(self, rng: random.Random, separation: int):
        self.rng, self.separation = rng, separation
        self._hashes = np.zeros(0, dtype=np.uint64)
        self.rejected = 0

    def draw(self) -> tuple[Scene, Image.Image, int]:
        while True:
            scene = world.random_scene(self.rng)
            image = world.render(scene)
            h = phash64(image)
            if self._hashes.size:
                distance = np.bitwise_count(self._hashes ^ np.uint64(h)).min()
                if distance <= self.separation:
                    self.rejected += 1
                    continue
            self._hashes = np.append(self._hashes, np.uint64(h))
            return scene, image, h


def _shift(image: Image.Image, dx: int, dy: int) -> Image.Image:
    return Image.fromarray(np.roll(np.asarray(image), (dy, dx), axis=(0, 1)))


NEAR_TRANSFORMS = {
    "jpeg90": lambda im: Image.open(io.BytesIO(world.encode(im, "JPEG", 90))).convert("RGB"),
    "shift+1x": lambda im: _shift(im, 1, 0),
    "shift+1y": lambda im: _shift(im, 0, 1),
    "shift-1x": lambda im: _shift(im, -1, 0),
    "shift+2x": lambda im: _shift(im, 2, 0),
    "jpeg75": lambda im: Image.open(io.BytesIO(world.encode(im, "JPEG", 75))).convert("RGB"),
}


def near_duplicate(image: Image.Image, rng: random.Random, threshold: int) -> tuple[bytes, str, int]:
    """Re-encode or shift `image`; returns (bytes, transform, distance), distance ≤ threshold."""
    original = phash64(image)
    names = list(NEAR_TRANSFORMS)
    rng.shuffle(names)
    for name in names + ["jpeg90"]:
        candidate = NEAR_TRANSFORMS[name](image)
        distance = hamming(original, phash64(candidate))
        if distance <= threshold:
            fmt = "JPEG" if name.startswith("jpeg") else "PNG"
            data = world.encode(image, "JPEG", int(name[4:])) if fmt == "JPEG" else world.encode(candidate)
            return data, name, distance
    raise AssertionError("JPEG re-encoding of a shapes image moved its pHash beyond the threshold")


@dataclass
class Conversation:
    """A source-independent training conversation: images plus (question, answer) turns."""

    images: list[bytes]
    turns: list[tuple[str, str]]
    family: str
    meta: dict = field(default_factory=dict)


@dataclass
class SynthResult:
    out: Path
    rows: dict[str, int]
    planted: dict[str, int]
    benchmarks: dict[str, int]
    rejected_scenes: int


def _conversation(bank: SceneBank, rng: random.Random, subset: str) -> Conversation:
    if subset == "shapes_pair":
        (s1, i1, _), (s2, i2, _) = bank.draw(), bank.draw()
        question, answer = world.pair_question(s1, s2)
        return Conversation([world.encode(i1), world.encode(i2)], [(question, answer)], "pair")
    scene, image, _ = bank.draw()
    n_turns = rng.choices([1, 2, 3], weights=[6, 3, 1])[0]
    turns, family = [], ""
    for _ in range(n_turns):
        family, question, answer = world.ask(scene, rng)
        turns.append((question, answer))
    fmt = "JPEG" if rng.random() < 0.15 else "PNG"  # original encodings are kept downstream
    return Conversation([world.encode(image, fmt, 92)], turns, family)


TEXT_ONLY = [
    ("Which colours can a shape have in the shapes world?", "red, green, blue, yellow"),
    ("Which shapes exist in the shapes world?", "circle, square, triangle"),
    ("How many cells does a grid have?", str(world.GRID * world.GRID)),
]


# --- source writers --------------------------------------------------------------------------------

def _image_struct(data: bytes | None) -> dict | None:
    return None if data is None else {"bytes": data, "path": None}


def llava_row(conv: Conversation, row_id: str, subset: str, rng: random.Random) -> dict:
    """LLaVA-OneVision-1.5 instruct row; `shapes_rc` uses {role, content}, sometimes mixed per turn."""
    turns = []
    for k, (question, answer) in enumerate(conv.turns):
        if k == 0 and conv.images:
            question = "<image>\n" + question if rng.random() < 0.8 else question + "\n<image>"
        pairs = [("human", "user", question), ("gpt", "assistant", answer)]
        for old_role, new_role, text in pairs:
            style = "fv" if subset == "shapes_fv" else ("rc" if rng.random() < 0.8 else "fv")
            if style == "fv":
                turns.append({"from": old_role, "value": text, "role": None, "content": None})
            else:
                turns.append({"from": None, "value": None, "role": new_role, "content": text})
    if subset == "shapes_fv":
        turns = [{"from": t["from"], "value": t["value"]} for t in turns]
    return {"id": row_id, "image": _image_struct(conv.images[0] if conv.images else None),
            "conversations": turns, "data_source": f"shapes/{conv.family}"}


def finevision_row(conv: Conversation, subset: str, rng: random.Random, low: bool = False) -> dict:
    n = len(conv.turns)
    ratings = {c: [rng.choice([4, 5, 5]) for _ in range(n)] for c in RATING_COLUMNS}
    if low:
        column = rng.choice(RATING_COLUMNS)
        ratings[column][rng.randrange(n)] = rng.choice([1, 2])
    if subset == "shapes_qa_rev":
        texts = [{"assistant": a, "user": q} for q, a in conv.turns]
    else:
        texts = [{"user": q, "assistant": a} for q, a in conv.turns]
    row = {"images": [_image_struct(b) for b in conv.images], "texts": texts, "source": f"shapes/{conv.family}"}
    for column in RATING_COLUMNS:
        row[f"{column}_ratings"] = ratings[column]
        row[f"{column}_min"] = min(ratings[column])
    return row


def _features(kind: str, subset: str):
    from datasets import Features, List, Value
    from datasets import Image as ImageFeature

    if kind == "llava_ov":
        turn = {"from": Value("string"), "value": Value("string")}
        if subset != "shapes_fv":
            turn |= {"role": Value("string"), "content": Value("string")}
        return Features({"id": Value("string"), "image": ImageFeature(), "conversations": List(turn),
                         "data_source": Value("string")})
    text = ({"assistant": Value("string"), "user": Value("string")} if subset == "shapes_qa_rev"
            else {"user": Value("string"), "assistant": Value("string")})
    columns = {"images": List(ImageFeature()), "texts": List(text), "source": Value("string")}
    for column in RATING_COLUMNS:
        columns[f"{column}_ratings"] = List(Value("int64"))
        columns[f"{column}_min"] = Value("int64")
    return Features(columns)


def _write_parquet(rows: list[dict], features, path: Path) -> None:
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {name: [r[name] for r in rows] for name in features}
    Dataset.from_dict(columns, features=features).to_parquet(str(path))


# --- benchmarks --------------------------------------------------------------------------------------

def _benchmark_items(bank: SceneBank, rng: random.Random, family: str, n: int) -> list[dict]:
    items = []
    for index in range(n):
        scene, image, _ = bank.draw()
        image_id = f"{family}-{index:05d}"
        if family == "yesno":  # MME style: one true and one false statement per image
            for want in (True, False):
                question, answer = world.q_yesno(scene, rng, want)
                items.append({"image_id": image_id, "image": image, "scene": scene, "question": question,
                              "answer": answer})
        else:
            _, question, answer = world.ask(scene, rng, family)
            items.append({"image_id": image_id, "image": image, "scene": scene, "question": question,
                          "answer": answer})
    for k, item in enumerate(items):
        item["id"] = f"{family}-q{k:05d}"
    return items


# --- the whole world ----------------------------------------------------------------------------

def _defects(bank: SceneBank, rng: random.Random, kind: str, subset: str, clean: list[Conversation],
             suites: dict[str, list[dict]], threshold: int, leak_offset: int) -> list[tuple[Conversation, dict]]:
    """Defective rows for one subset, each with its record (`defect` plus what identifies the defect)."""
    found: list[tuple[Conversation, dict]] = []
    n_clean = len(clean)
    for j in range(max(2, n_clean // 40)):
        k = rng.randrange(n_clean)
        found.append((clean[k], {"defect": "exact_duplicate", "of": k}))

        k = rng.randrange(n_clean)
        original = Image.open(io.BytesIO(clean[k].images[0])).convert("RGB")
        data, transform, distance = near_duplicate(original, rng, threshold)
        found.append((Conversation([data] + clean[k].images[1:], clean[k].turns, clean[k].family),
                      {"defect": "near_duplicate", "of": k, "transform": transform, "distance": distance}))

        good = _conversation(bank, rng, subset)
        head = good.images[0]
        cut = head[: len(head) // 2] if rng.random() < 0.5 else bytes(rng.randrange(256) for _ in range(200))
        found.append((Conversation([cut] + good.images[1:], good.turns, good.family), {"defect": "corrupt_image"}))

        good = _conversation(bank, rng, subset)
        turns = good.turns[:-1] + [(good.turns[-1][0], rng.choice(["", "   "]))]
        found.append((Conversation(good.images, turns, good.family), {"defect": "empty_answer"}))

        good = _conversation(bank, rng, subset)
        long_answer = " ".join([world.extract_answer(world.random_scene(rng))] * 40)
        turns = good.turns[:-1] + [(good.turns[-1][0], long_answer)]
        found.append((Conversation(good.images, turns, good.family), {"defect": "overlong_answer"}))

        if kind == "finevision":
            found.append((_conversation(bank, rng, subset), {"defect": "low_rating"}))

        name = rng.choice(list(suites))
        item = rng.choice(suites[name])
        leak = ("item", "image", "near")[(j + leak_offset) % 3]
        if leak == "item":  # the benchmark image with its own question and answer
            conv = Conversation([world.encode(item["image"])], [(item["question"], item["answer"])], "leak")
        elif leak == "image":  # the benchmark image with a training-style question
            conv = Conversation([world.encode(item["image"])], [world.ask(item["scene"], rng)[1:]], "leak")
        else:  # a near copy of the benchmark image
            data, _, _ = near_duplicate(item["image"], rng, threshold)
            conv = Conversation([data], [world.ask(item["scene"], rng)[1:]], "leak")
        if subset == "shapes_pair":
            conv.images.append(clean[rng.randrange(n_clean)].images[1])
        found.append((conv, {"defect": "benchmark_leak", "benchmark": name, "item": item["id"], "kind": leak}))
    return found


def _write_subset(out: Path, kind: str, subset: str, clean: list[Conversation],
                  defects: list[tuple[Conversation, dict]], rng: random.Random,
                  planted: dict[str, list[dict]]) -> int:
    """Clean rows first, then the defects shuffled (so every duplicate comes after its original)."""
    order = list(range(len(defects)))
    rng.shuffle(order)
    entries = [(c, {}) for c in clean] + [defects[i] for i in order]
    rows, ids = [], []
    for position, (conv, info) in enumerate(entries):
        row_id = f"{subset}-{position:06d}"
        ids.append(row_id)
        if kind == "llava_ov":
            rows.append(llava_row(conv, row_id, subset, rng))
        else:
            rows.append(finevision_row(conv, subset, rng, low=info.get("defect") == "low_rating"))
        if info:
            record = {"source": f"{kind}/{subset}", "id": row_id, "row": position,
                      **{k: v for k, v in info.items() if k != "defect"}}
            if "of" in record:
                record["of"] = ids[record["of"]]
            planted[info["defect"]].append(record)
    _write_parquet(rows, _features(kind, subset), out / "sources" / kind / subset / "train-00000-of-00001.parquet")
    return len(rows)


def synth(out: str | Path, seed: int = 0, size: int = 600, bench_size: int = 60,
          phash_threshold: int = 4) -> SynthResult:
    """Write the shapes world under `out` (see module docstring). `size`: clean rows per source."""
    if size < 20 or bench_size < 4:
        raise ValueError(f"size={size} / bench_size={bench_size} too small: need size >= 20, bench_size >= 4")
    out = Path(out)
    rng = random.Random(seed)
    bank = SceneBank(random.Random(seed + 1), separation=2 * phash_threshold)

    suites = {name: _benchmark_items(bank, rng, BENCHMARKS[name], bench_size) for name in BENCHMARKS}
    bench_counts = write_benchmarks(out, suites)

    planted: dict[str, list[dict]] = {d: [] for d in DEFECTS}
    rows_written: dict[str, int] = {}
    for kind, subsets in (("llava_ov", LLAVA_SUBSETS), ("finevision", FINEVISION_SUBSETS)):
        per_subset = [size // len(subsets) + (i < size % len(subsets)) for i in range(len(subsets))]
        for subset, n_clean in zip(subsets, per_subset):
            clean = [_conversation(bank, rng, subset) for _ in range(n_clean)]
            defects = _defects(bank, rng, kind, subset, clean, suites, phash_threshold, len(rows_written))
            if kind == "llava_ov" and subset == "shapes_rc":
                clean += [Conversation([], [qa], "text") for qa in TEXT_ONLY]
            rows_written[f"{kind}/{subset}"] = _write_subset(out, kind, subset, clean, defects, rng, planted)

    summary = {"world_version": world.WORLD_VERSION, "seed": seed, "size": size, "bench_size": bench_size,
               "phash_threshold": phash_threshold, "separation": 2 * phash_threshold,
               "rows": rows_written, "benchmarks": bench_counts, "rejected_scenes": bank.rejected}
    (out / "planted.json").write_text(json.dumps({"world_version": world.WORLD_VERSION,
                                                  "phash_threshold": phash_threshold, **planted},
                                                 indent=1, sort_keys=True))
    (out / "world.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    return SynthResult(out, rows_written, {k: len(v) for k, v in planted.items()}, bench_counts, bank.rejected)
