"""The shapes world: scenes, their rendering, and the question families asked about them.

A scene is a ``GRID × GRID`` grid of cells numbered ``1`` … ``9`` in reading order. Each
cell is empty, holds a coloured shape centred in the cell, or holds a black digit. A cell is exactly
``CELL`` pixels, so with Qwen3-VL's 16-px patches merged 2×2 one visual token covers one cell.

Question families (``FAMILIES``), each a pure function ``(scene, rng) -> (question, answer)``:
``colour``/``shape``/``count`` (short answer), ``yesno``, ``mcq`` (A–D), ``ocr`` (digit reading) and
``extract`` (a listing of every cell, ≥ 40 tokens: the long output where parallel decoding pays).
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GRID = 3
CELL = 32
IMAGE_SIZE = GRID * CELL
# Cells are numbered 1…9 in reading order: a cell name is one token, so a question names its cell in
# one token the model can attend to (row-letter + column-digit names split into two pre-tokens).
CELL_NAMES = tuple(str(k + 1) for k in range(GRID * GRID))
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
DIGITS = tuple(str(d) for d in range(10))
BACKGROUND_LEVEL = 200  # mean grey of the background wash
BACKGROUND_AMPLITUDE = 55
WORLD_VERSION = "shapes-v2"  # bump whenever rendering, questions or answer formats change


@dataclass(frozen=True)
class Cell:
    """One grid cell: ``kind`` is "empty", "shape" or "digit"."""

    kind: str
    colour: str | None = None
    shape: str | None = None
    digit: str | None = None

    def describe(self) -> str:
        if self.kind == "shape":
            return f"{self.colour} {self.shape}"
        if self.kind == "digit":
            return f"digit {self.digit}"
        return "empty"


@dataclass(frozen=True)
class Scene:
    """Cells (row-major) and a smooth background wash: ``wash`` holds (fx, fy, phase) per wave.

    The wash makes distinct scenes distinct to a perceptual hash (plain white backgrounds put many
    different scenes within a few bits of each other), as natural images are; it carries no answer.
    """

    cells: tuple[Cell, ...]
    wash: tuple[tuple[float, float, float], ...] = ()

    @property
    def key(self) -> str:
        """Canonical identity of the scene (two scenes with the same key render identically)."""
        return "|".join(c.describe() for c in self.cells)

    def cell(self, name: str) -> Cell:
        return self.cells[CELL_NAMES.index(name)]

    def names(self, kind: str) -> list[str]:
        return [n for n, c in zip(CELL_NAMES, self.cells) if c.kind == kind]


def random_scene(rng: random.Random, p_empty: float = 0.3, p_digit: float = 0.2) -> Scene:
    cells = []
    for _ in range(GRID * GRID):
        u = rng.random()
        if u < p_empty:
            cells.append(Cell("empty"))
        elif u < p_empty + p_digit:
            cells.append(Cell("digit", digit=rng.choice(DIGITS)))
        else:
            cells.append(Cell("shape", colour=rng.choice(list(COLOURS)), shape=rng.choice(SHAPES)))
    wash = tuple((round(rng.uniform(-1.2, 1.2), 4), round(rng.uniform(-1.2, 1.2), 4),
                  round(rng.uniform(0, 2 * math.pi), 4)) for _ in range(4))
    scene = Scene(tuple(cells), wash)
    if not scene.names("shape"):  # every scene has something to ask colour/shape questions about
        return random_scene(rng, p_empty, p_digit)
    return scene


def _background(wash: tuple[tuple[float, float, float], ...]) -> np.ndarray:
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / IMAGE_SIZE
    field = np.zeros((IMAGE_SIZE, IMAGE_SIZE))
    for fx, fy, phase in wash:
        field += np.cos(2 * math.pi * (fx * xx + fy * yy) + phase)
    grey = BACKGROUND_LEVEL + BACKGROUND_AMPLITUDE * field / max(len(wash), 1) * 2
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


@lru_cache(maxsize=1)
def _digit_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=24)


def render(scene: Scene) -> Image.Image:
    """Draw the scene as an RGB image of IMAGE_SIZE² pixels; shapes are centred in their cells."""
    image = Image.fromarray(_background(scene.wash), "RGB")
    draw = ImageDraw.Draw(image)
    margin = 5
    for index, cell in enumerate(scene.cells):
        top, left = (index // GRID) * CELL, (index % GRID) * CELL
        box = (left + margin, top + margin, left + CELL - margin - 1, top + CELL - margin - 1)
        if cell.kind == "shape":
            fill = COLOURS[cell.colour]
            if cell.shape == "circle":
                draw.ellipse(box, fill=fill)
            elif cell.shape == "square":
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
        elif cell.kind == "digit":
            draw.text((left + CELL / 2, top + CELL / 2), cell.digit, fill=(0, 0, 0), font=_digit_font(),
                      anchor="mm")
    return image


def encode(image: Image.Image, fmt: str = "PNG", quality: int = 90) -> bytes:
    """Encode deterministically (no timestamps or optimisation passes that vary between runs)."""
    buffer = io.BytesIO()
    if fmt == "PNG":
        image.save(buffer, format="PNG", compress_level=6)
    else:
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# --- question families ---------------------------------------------------------------------------

def q_colour(scene: Scene, rng: random.Random) -> tuple[str, str]:
    name = rng.choice(scene.names("shape"))
    return f"What colour is the shape in cell {name}?", scene.cell(name).colour


def q_shape(scene: Scene, rng: random.Random) -> tuple[str, str]:
    name = rng.choice(scene.names("shape"))
    return f"What shape is in cell {name}?", scene.cell(name).shape


def q_count(scene: Scene, rng: random.Random) -> tuple[str, str]:
    what = rng.choice(["colour", "shape", "any", "empty", "digit"])
    if what == "colour":
        colour = rng.choice(list(COLOURS))
        n = sum(c.colour == colour for c in scene.cells)
        return f"How many {colour} shapes are there?", str(n)
    if what == "shape":
        shape = rng.choice(SHAPES)
        n = sum(c.shape == shape for c in scene.cells)
        return f"How many {shape}s are there?", str(n)
    if what == "empty":
        return "How many cells are empty?", str(len(scene.names("empty")))
    if what == "digit":
        return "How many digits are there?", str(len(scene.names("digit")))
    return "How many shapes are there?", str(len(scene.names("shape")))


def q_yesno(scene: Scene, rng: random.Random, want: bool | None = None) -> tuple[str, str]:
    """Is there a <colour> <shape>? Balanced: `want` picks a true or false statement when given."""
    present = {(c.colour, c.shape) for c in scene.cells if c.kind == "shape"}
    want = rng.random() < 0.5 if want is None else want
    pool = sorted(present) if want else sorted({(c, s) for c in COLOURS for s in SHAPES} - present)
    colour, shape = rng.choice(pool)
    return f"Is there a {colour} {shape}?", "yes" if want else "no"


def q_mcq(scene: Scene, rng: random.Random) -> tuple[str, str]:
    name = rng.choice(CELL_NAMES)
    truth = scene.cell(name).describe()
    distractors = {truth}
    while len(distractors) < 4:
        distractors.add(Cell("shape", colour=rng.choice(list(COLOURS)), shape=rng.choice(SHAPES)).describe()
                        if rng.random() < 0.7 else rng.choice(["empty", f"digit {rng.choice(DIGITS)}"]))
    options = sorted(distractors)
    rng.shuffle(options)
    letters = "ABCD"
    body = "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options))
    question = f"What is in cell {name}?\n{body}\nAnswer with the option's letter."
    return question, letters[options.index(truth)]


def q_ocr(scene: Scene, rng: random.Random) -> tuple[str, str]:
    names = scene.names("digit")
    if not names:
        return q_colour(scene, rng)
    name = rng.choice(names)
    return f"What digit is written in cell {name}?", scene.cell(name).digit


def q_extract(scene: Scene, rng: random.Random) -> tuple[str, str]:
    return "List the contents of every cell.", extract_answer(scene)


def extract_answer(scene: Scene) -> str:
    return "\n".join(f"{n}: {c.describe()}" for n, c in zip(CELL_NAMES, scene.cells))


FAMILIES = {
    "colour": q_colour,
    "shape": q_shape,
    "count": q_count,
    "yesno": q_yesno,
    "mcq": q_mcq,
    "ocr": q_ocr,
    "extract": q_extract,
}
# Sampling weights for training conversations: the long listing is over-weighted because it is
# where block decoding is measured.
FAMILY_WEIGHTS = {"colour": 1, "shape": 1, "count": 1, "yesno": 1, "mcq": 1, "ocr": 1, "extract": 2}


def check_family_weights(weights: dict[str, float]) -> dict[str, float]:
    """`weights` if they can draw families: known names, non-negative, not all zero (else ValueError)."""
    unknown = sorted(set(weights) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown question famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                         f"valid: {', '.join(FAMILIES)}")
    negative = sorted(name for name, w in weights.items() if w < 0)
    if negative:
        raise ValueError(f"family weights must be >= 0 ({', '.join(negative)} are not)")
    if not any(w > 0 for w in weights.values()):
        raise ValueError("family weights are all zero: no family could be drawn")
    return weights


def ask(scene: Scene, rng: random.Random, family: str | None = None,
        weights: dict[str, float] | None = None) -> tuple[str, str, str]:
    """One (family, question, answer) about the scene; the family is drawn by `weights` (default
    FAMILY_WEIGHTS; families missing from `weights` are never drawn) if None."""
    if family is None:
        weights = FAMILY_WEIGHTS if weights is None else check_family_weights(weights)
        names = list(weights)
        family = rng.choices(names, weights=[weights[n] for n in names])[0]
    if family not in FAMILIES:
        raise ValueError(f"unknown question family {family!r}; valid: {', '.join(FAMILIES)}")
    question, answer = FAMILIES[family](scene, rng)
    return family, question, answer


def pair_question(first: Scene, second: Scene) -> tuple[str, str]:
    """The two-image comparison the sources carry: which scene has more shapes (or are they equal)."""
    n1, n2 = len(first.names("shape")), len(second.names("shape"))
    if n1 == n2:
        return "Do both images have the same number of shapes? Answer yes or no.", "yes"
    return "Which image has more shapes? Answer first or second.", "first" if n1 > n2 else "second"


def corpus(rng: random.Random, n_scenes: int = 300) -> list[str]:
    """Text of the world (questions and answers of every family), for training the tokenizer."""
    lines: list[str] = []
    for _ in range(n_scenes):
        scene = random_scene(rng)
        for family in FAMILIES:
            _, q, a = ask(scene, rng, family)
            lines += [q, a]
    lines += ["Which image has more shapes? Answer first or second.", "first", "second",
              "Describe the image.", "The image shows a grid of cells."]
    return lines
