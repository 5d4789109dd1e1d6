"""The shapes benchmarks: real lm-eval loads the five task YAMLs and scores with their metrics."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest
from PIL import Image

from bard_core.shapes import metrics
from bard_core.shapes.metrics import BENCHMARKS


def test_field_f1_and_exact_match():
    gold = "A1: red circle\nA2: empty\nA3: digit 7"
    assert metrics.field_f1(gold, gold) == 1.0
    assert metrics.field_f1("A1: red circle\nA2: empty", gold) == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert metrics.field_f1("A1: blue circle\nA2: red\nA3: digit 1", gold) == 0.0
    assert metrics.process_extract({"answer": gold}, [gold + "\n"])["exact_match"] == 1.0
    assert metrics.process_extract({"answer": gold}, ["A1: red circle"])["exact_match"] == 0.0


def test_relaxed_numeric_match():
    assert metrics.relaxed_match("3", "3") and metrics.relaxed_match("There are 3.", "3")
    assert not metrics.relaxed_match("4", "3") and not metrics.relaxed_match("none", "3")
    assert metrics.relaxed_match("104", "100") and not metrics.relaxed_match("106", "100")
    assert metrics.relaxed_match("0", "0") and not metrics.relaxed_match("1", "0")


def test_mcq_takes_the_option_letter():
    assert metrics.process_mcq({"answer": "B"}, ["B"])["exact_match"] == 1.0
    assert metrics.process_mcq({"answer": "B"}, ["B. red circle"])["exact_match"] == 1.0
    assert metrics.process_mcq({"answer": "B"}, ["C"])["exact_match"] == 0.0


def test_per_item_scores_are_the_primary_metric_and_average_to_it():
    from bard_core.shapes import suite

    items = [{"answer": "B", "image_id": "a"}, {"answer": "C", "image_id": "b"}, {"answer": "A", "image_id": "c"}]
    predictions = ["B", "D", "A. red circle"]
    assert suite.score_items("shapes_mcq", items, predictions) == [1.0, 0.0, 1.0]
    assert suite.score("shapes_mcq", items, predictions)["accuracy"] == pytest.approx(2 / 3)
    gold = "1: red circle\n2: empty"
    extract = suite.score_items("shapes_extract", [{"answer": gold, "image_id": "x"}] * 2, [gold, "1: red circle"])
    assert extract[0] == 1.0 and 0.0 < extract[1] < 1.0  # field F1, not exact match


def test_acc_plus_needs_both_questions_of_an_image():
    items = [("i1", 1.0), ("i1", 1.0), ("i2", 1.0), ("i2", 0.0)]
    assert metrics.agg_acc_plus(items) == 0.5
    assert metrics.process_yesno({"answer": "yes", "image_id": "i"}, ["Yes."])["acc"] == 1.0


def _scripted_lm(answers: dict[str, str] | None):
    from lm_eval.api.model import LM

    class Scripted(LM):
        """Answers each question from a lookup table (or a fixed wrong answer): a test double for the harness."""

        MULTIMODAL = True

        def __init__(self):
            super().__init__()
            self.seen_images: list = []

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for request in requests:
                context, _, extra = request.args
                self.seen_images += extra["visual"]
                question = context.split("<image>", 1)[1]
                key = (question, extra["visual"][0].convert("RGB").tobytes())
                out.append(answers[key] if answers is not None else "zzz")
            return out

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            raise AssertionError("the shapes benchmarks are generative")

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise AssertionError("the shapes benchmarks are generative")

    return Scripted()


@pytest.fixture(scope="module")
def task_manager(world_dir):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(world_dir / "benchmarks"))


EXPECTED = {"shapes_mcq": ["exact_match"], "shapes_yesno": ["acc", "acc_plus"],
            "shapes_count": ["relaxed_accuracy"], "shapes_ocr": ["exact_match"],
            "shapes_extract": ["field_f1", "exact_match"]}


def _evaluate(world_dir, task_manager, lm):
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=list(BENCHMARKS), task_manager=task_manager)["results"]


def test_lm_eval_scores_a_perfect_model_one(world_dir, task_manager):
    answers = {}
    for name in BENCHMARKS:
        for row in pq.read_table(world_dir / "benchmarks" / name / "test.parquet").to_pylist():
            pixels = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB").tobytes()
            answers[(row["question"], pixels)] = row["answer"]
    lm = _scripted_lm(answers)
    results = _evaluate(world_dir, task_manager, lm)
    for name, names in EXPECTED.items():
        for metric in names:
            assert results[name][f"{metric},none"] == 1.0, (name, metric)
    assert lm.seen_images and all(isinstance(im, Image.Image) for im in lm.seen_images)


def test_lm_eval_scores_a_wrong_model_zero(world_dir, task_manager):
    results = _evaluate(world_dir, task_manager, _scripted_lm(None))
    for name, names in EXPECTED.items():
        for metric in names:
            assert results[name][f"{metric},none"] == 0.0, (name, metric)
