"""Metrics of the shapes benchmarks, as pure functions lm-eval calls through the task YAMLs.

``process_*(doc, results)`` receive one benchmark row and ``[generated_text]`` and return per-item
metric values; ``agg_*`` aggregate a list of per-item values.
- mcq / ocr: exact match on the normalised answer (mcq: the first option letter in the output);
- yesno: accuracy and MME's acc+ (an image counts only if both of its questions are right);
- count: relaxed accuracy (numeric answer within 5 % of the truth, as ChartQA);
- extract: field-level F1 over ``cell: content`` pairs, and exact match of the whole listing.
"""

from __future__ import annotations

import re
from collections import defaultdict

from bard_core.eval_docs import open_image

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_LETTER = re.compile(r"\b([A-D])\b")


def normalise(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def doc_to_text(doc: dict) -> str:
    """The prompt lm-eval sends: the image, then the question."""
    return "<image>" + doc["question"]


def doc_to_image(doc: dict) -> list:
    return [open_image(doc["image"])]


def _prediction(results: list[str]) -> str:
    return results[0] if results else ""


def process_exact(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(normalise(_prediction(results)) == normalise(doc["answer"]))}


def process_mcq(doc: dict, results: list[str]) -> dict:
    match = _LETTER.search(_prediction(results).strip())
    letter = match.group(1) if match else ""
    return {"exact_match": float(letter == doc["answer"].strip())}


def process_yesno(doc: dict, results: list[str]) -> dict:
    words = normalise(_prediction(results)).split()
    said = words[0].strip(",.!") if words else ""
    correct = float(said == normalise(doc["answer"]))
    return {"acc": correct, "acc_plus": (doc["image_id"], correct)}


def agg_acc_plus(items: list[tuple[str, float]]) -> float:
    per_image: dict[str, list[float]] = defaultdict(list)
    for image_id, correct in items:
        per_image[image_id].append(correct)
    if not per_image:
        return 0.0
    return sum(all(v == 1.0 for v in values) for values in per_image.values()) / len(per_image)


def relaxed_match(prediction: str, answer: str, tolerance: float = 0.05) -> bool:
    found = _NUMBER.search(prediction)
    if not found:
        return False
    try:
        truth = float(answer)
    except ValueError:
        return normalise(prediction) == normalise(answer)
    value = float(found.group(0))
    if truth == 0:
        return value == 0
    return abs(value - truth) / abs(truth) <= tolerance


def process_count(doc: dict, results: list[str]) -> dict:
    return {"relaxed_accuracy": float(relaxed_match(_prediction(results), doc["answer"]))}


def parse_listing(text: str) -> dict[str, str]:
    """``"A1: red circle\\nA2: empty"`` → ``{"a1": "red circle", "a2": "empty"}`` (first value wins)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and normalise(key) not in fields:
            fields[normalise(key)] = normalise(value)
    return fields


def field_f1(prediction: str, answer: str) -> float:
    predicted, truth = set(parse_listing(prediction).items()), set(parse_listing(answer).items())
    if not predicted or not truth:
        return float(predicted == truth)
    hits = len(predicted & truth)
    if hits == 0:
        return 0.0
    precision, recall = hits / len(predicted), hits / len(truth)
    return 2 * precision * recall / (precision + recall)


def process_extract(doc: dict, results: list[str]) -> dict:
    prediction = _prediction(results)
    return {
        "field_f1": field_f1(prediction, doc["answer"]),
        "exact_match": float(parse_listing(prediction) == parse_listing(doc["answer"])),
    }


# The one table of what is scored how: per question family, its per-item scorer and the metrics it reports
# (the first is the primary one, whose mean the gate compares); per shapes benchmark, the family it asks.
# The benchmarks' task YAMLs (bard_core.shapes.synth), the engine-side suite and the pre-training curve read it.
FAMILIES = {
    "colour": (process_exact, ("exact_match",)),
    "shape": (process_exact, ("exact_match",)),
    "count": (process_count, ("relaxed_accuracy",)),
    "yesno": (process_yesno, ("acc", "acc_plus")),
    "mcq": (process_mcq, ("exact_match",)),
    "ocr": (process_exact, ("exact_match",)),
    "extract": (process_extract, ("field_f1", "exact_match")),
}
BENCHMARKS = {f"shapes_{family}": family for family in ("mcq", "yesno", "count", "ocr", "extract")}


def primary(benchmark_or_family: str) -> str:
    """The primary metric of a shapes benchmark or question family."""
    return FAMILIES[BENCHMARKS.get(benchmark_or_family, benchmark_or_family)][1][0]

