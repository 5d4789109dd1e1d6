"""Document helpers shared by our lm-eval task YAMLs: images stay encoded until a model reads them.

lm-eval iterates a task's documents several times (building requests, scoring, logging), and a
`datasets` ``Image`` column decodes every image on every pass. ``process_docs: lazy_images`` turns the
image columns into encoded bytes once, and `open_image` gives the model a PIL image that decodes on
first use (``PIL.Image.open`` reads only the header). docs/evaluation.md has the measured cost.
"""

from __future__ import annotations

import io

from PIL import Image


def lazy_images(dataset):
    """The dataset with every image column (plain or a sequence of images) left undecoded."""
    from datasets import Image as ImageFeature
    from datasets import Sequence

    for name, feature in dataset.features.items():
        if isinstance(feature, ImageFeature):
            dataset = dataset.cast_column(name, ImageFeature(decode=False))
        elif isinstance(feature, (Sequence, list)):
            inner = feature.feature if isinstance(feature, Sequence) else feature[0]
            if isinstance(inner, ImageFeature):
                dataset = dataset.cast_column(name, Sequence(ImageFeature(decode=False)))
    return dataset


def open_image(value) -> Image.Image | None:
    """A lazily decoded PIL image from an undecoded image cell ({"bytes", "path"}), or a PIL image as is."""
    if value is None or isinstance(value, Image.Image):
        return value
    if value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"]))
    return Image.open(value["path"])
