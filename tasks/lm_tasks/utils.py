"""Prompts and metrics of the real-benchmark YAMLs (lm-eval calls them through ``!function utils.*``).

Each follows its benchmark's official protocol (FACTS.md): option-letter exact match for MMMU-Pro,
MMStar, AI2D and RealWorldQA; MME's yes/no accuracy, acc+ (both questions of an image right) and the
perception / cognition scores (Σ over subtasks of 100·(acc + acc+)); OCRBench's substring match.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict

LETTERS = "ABCDEFGHIJ"
OPTION_PROMPT = "Answer with the option's letter from the given choices directly."
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_IMAGE_TAG = re.compile(r"<image ([1-7])>")


def _options(value) -> list[str]:
    return list(ast.literal_eval(value)) if isinstance(value, str) else list(value or [])


def _lettered(options: list[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))


def option_letter(response: str, n_options: int, options: list[str] | None = None) -> str:
    """The option a free-form answer chose, "" when it names none: a letter among the first `n_options`
    that opens the answer (``B``, ``(B)``, ``B.``), follows "answer (is)", or stands in parentheses;
    else the one option whose text the answer contains."""
    letters, text = LETTERS[:n_options], response.strip()
    for pattern in (rf"(?i:answer)(?: is)?:?\s*\(?([{letters}])\b", rf"\(([{letters}])\)",
                    rf"^([{letters}])(?:[.:)\s]|$)"):
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    hits = [LETTERS[i] for i, option in enumerate(options or []) if option and str(option).lower() in text.lower()]
    return hits[0] if len(hits) == 1 else ""


# --- MMMU-Pro (standard, 10 options) -----------------------------------------------------------------

def mmmu_pro_text(doc: dict) -> str:
    prompt = f"{doc['question']}\n{_lettered(_options(doc['options']))}\n{OPTION_PROMPT}"
    return _IMAGE_TAG.sub("<image>", prompt)


def mmmu_pro_images(doc: dict) -> list:
    prompt = f"{doc['question']}\n{_lettered(_options(doc['options']))}"
    return [doc[f"image_{k}"] for k in _IMAGE_TAG.findall(prompt) if doc.get(f"image_{k}") is not None]


def mmmu_pro_process(doc: dict, results: list[str]) -> dict:
    options = _options(doc["options"])
    return {"acc": float(option_letter(results[0], len(options), options) == doc["answer"].strip())}


# --- MME ---------------------------------------------------------------------------------------------

def mme_text(doc: dict) -> str:
    return f"<image>{doc['question']}"


def _yes_no(response: str) -> str:
    words = re.findall(r"[a-z]+", response.lower())
    return words[0] if words and words[0] in ("yes", "no") else "other"


def mme_process(doc: dict, results: list[str]) -> dict:
    correct = float(_yes_no(results[0]) == doc["answer"].strip().lower())
    record = (doc["category"], doc["question_id"], correct)
    return {"acc": correct, "mme_perception": record, "mme_cognition": record}


def _mme_score(records: list[tuple[str, str, float]], categories: tuple[str, ...]) -> float:
    by_category: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for category, question_id, correct in records:
        if category in categories:
            by_category[category].append((question_id, correct))
    score = 0.0
    for rows in by_category.values():
        per_image: dict[str, list[float]] = defaultdict(list)
        for question_id, correct in rows:
            per_image[question_id].append(correct)
        acc = sum(c for _, c in rows) / len(rows)
        acc_plus = sum(all(v == 1.0 for v in vals) for vals in per_image.values()) / len(per_image)
        score += 100 * (acc + acc_plus)
    return score


def mme_perception(records: list) -> float:
    return _mme_score(records, MME_PERCEPTION)


def mme_cognition(records: list) -> float:
    return _mme_score(records, MME_COGNITION)


# --- RealWorldQA ---------------------------------------------------------------------------------------

def realworldqa_text(doc: dict) -> str:
    return f"<image>{doc['question']}"


def realworldqa_process(doc: dict, results: list[str]) -> dict:
    answer, response = doc["answer"].strip(), results[0].strip()
    if len(answer) == 1 and answer.upper() in LETTERS:  # a multiple-choice item: its options are in the question
        n_options = max([LETTERS.index(m) + 1 for m in re.findall(r"(?m)^([A-J])[.:]", doc["question"])] or [4])
        return {"exact_match": float(option_letter(response, n_options) == answer.upper())}
    normalise = lambda s: " ".join(s.lower().rstrip(".").split())  # noqa: E731
    return {"exact_match": float(normalise(response) == normalise(answer))}


# --- MMStar ------------------------------------------------------------------------------------------

def mmstar_text(doc: dict) -> str:
    return f"<image>{doc['question']}\n{OPTION_PROMPT}"


def mmstar_process(doc: dict, results: list[str]) -> dict:
    correct = float(option_letter(results[0], 4) == doc["answer"].strip())
    return {"acc": correct, "mmstar_average": (doc["category"], correct)}


def mmstar_average(records: list[tuple[str, float]]) -> float:
    """MMStar's headline figure: the mean over its six categories of the category accuracy."""
    by_category: dict[str, list[float]] = defaultdict(list)
    for category, correct in records:
        by_category[category].append(correct)
    return sum(sum(v) / len(v) for v in by_category.values()) / max(1, len(by_category))


# --- AI2D --------------------------------------------------------------------------------------------

def ai2d_text(doc: dict) -> str:
    return f"<image>{doc['question']}\n{_lettered(_options(doc['options']))}\n{OPTION_PROMPT}"


def ai2d_process(doc: dict, results: list[str]) -> dict:
    options = _options(doc["options"])
    return {"exact_match": float(option_letter(results[0], len(options), options) == LETTERS[int(doc["answer"])])}


# --- OCRBench ----------------------------------------------------------------------------------------

def ocrbench_text(doc: dict) -> str:
    return f"<image>{doc['question']}"


def ocrbench_process(doc: dict, results: list[str]) -> dict:
    response = results[0]
    if doc["question_type"] == "Handwritten Mathematical Expression Recognition":
        squash = lambda s: s.strip().replace("\n", " ").replace(" ", "")  # noqa: E731
        hit = any(squash(a) in squash(response) for a in doc["answer"])
    else:
        norm = lambda s: s.lower().strip().replace("\n", " ")  # noqa: E731
        hit = any(norm(a) in norm(response) for a in doc["answer"])
    return {"acc": float(hit), "ocrbench_score": float(hit)}


def total(values: list[float]) -> float:
    """OCRBench's score: correct answers summed (out of 1000 on the full set)."""
    return float(sum(values))
