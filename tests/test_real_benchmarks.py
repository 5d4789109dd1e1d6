"""Every real-benchmark task YAML, run by real lm-eval on a local parquet with its hub dataset's exact
columns and feature types: right answers score 1.0, wrong ones 0.0, and the official aggregates add up."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from tasks.lm_tasks import PRIMARY, TASKS_DIR

LETTERS = "ABCDEFGHIJ"
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "brown"]


def _image(k: int) -> Image.Image:
    return Image.new("RGB", (32, 24), ((40 * k) % 256, (90 * k) % 256, (150 * k) % 256))


def _mmmu_features(extra: dict):
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    return Features({"id": Value("string"), "question": Value("string"), "options": Value("string"),
                     "explanation": Value("string"), **{f"image_{i}": ImageFeature() for i in range(1, 8)},
                     "img_type": Value("string"), "answer": Value("string"), "topic_difficulty": Value("string"),
                     **extra})


def _mmmu_rows(n: int, n_options: int, open_every: int = 0) -> list[dict]:
    rows = []
    for k in range(n):
        is_open = open_every and k % open_every == open_every - 1
        rows.append({"id": f"validation_Art_{k}", "question": f"[q{k}] Which colour fills <image 1>?",
                     "options": "[]" if is_open else str(COLOURS[:n_options]), "explanation": "",
                     **{f"image_{i}": _image(k) if i == 1 else None for i in range(1, 8)},
                     "img_type": "['Photos']", "answer": str(k) if is_open else LETTERS[k % n_options],
                     "topic_difficulty": "Easy", "question_type": "open" if is_open else "multiple-choice"})
    return rows


def _datasets():
    """name -> (features, rows, right answer, wrong answer, split)."""
    from datasets import ClassLabel, Features, Sequence, Value
    from datasets import Image as ImageFeature

    img = ImageFeature()
    mme_categories = ["existence", "color", "OCR", "code_reasoning"]  # three perception subtasks, one cognition
    realworld = [{"image": _image(k), "question": f"[q{k}] Which way?\nA. left\nB. right\nC. up\nPlease answer "
                  "directly with only the letter of the correct option and nothing else.", "answer": "ABC"[k % 3]}
                 for k in range(5)] + [{"image": _image(9), "question": "[q5] How many cars?", "answer": "3"}]
    pro = [{k: v for k, v in row.items() if k != "question_type"} | {"subject": "Art"} for row in _mmmu_rows(5, 10)]
    return {
        "mmmu_pro": (_mmmu_features({"subject": Value("string")}), pro, lambda r: r["answer"],
                     lambda r: LETTERS[(LETTERS.index(r["answer"]) + 1) % 10], "test"),
        "mme": (Features({"question_id": Value("string"), "image": img, "question": Value("string"),
                          "answer": Value("string"), "category": Value("string")}),
                [{"question_id": f"{c}/{k}.png", "image": _image(k), "question": f"[q{c}{k}{a}] Is it {a}? Please "
                  "answer yes or no.", "answer": a, "category": c}
                 for c in mme_categories for k in range(2) for a in ("Yes", "No")],
                lambda r: r["answer"], lambda r: "No" if r["answer"] == "Yes" else "Yes", "test"),
        "realworldqa": (Features({"image": img, "question": Value("string"), "answer": Value("string")}), realworld,
                        lambda r: r["answer"], lambda r: "7" if r["answer"] == "3" else "D", "test"),
        "mmstar": (Features({"index": Value("int64"), "question": Value("string"), "image": img,
                             "answer": Value("string"), "category": Value("string"), "l2_category": Value("string"),
                             "meta_info": {"source": Value("string"), "split": Value("string"),
                                           "image_path": Value("string")}}),
                   [{"index": k, "question": f"[q{k}] What colour?\nOptions: A: red, B: green, C: blue, D: grey",
                     "image": _image(k), "answer": "ABCD"[k % 4], "category": ["coarse perception", "math"][k % 2],
                     "l2_category": "x", "meta_info": {"source": "s", "split": "val", "image_path": f"{k}.png"}}
                    for k in range(6)], lambda r: r["answer"], lambda r: "ABCD"[("ABCD".index(r["answer"]) + 1) % 4],
                   "val"),
        "ai2d": (Features({"question": Value("string"), "options": Sequence(Value("string")), "answer": Value("string"),
                           "image": img}),
                 [{"question": f"[q{k}] Which stage?", "options": ["egg", "larva", "pupa", "adult"],
                   "answer": str(k % 4), "image": _image(k)} for k in range(5)],
                 lambda r: LETTERS[int(r["answer"])], lambda r: LETTERS[(int(r["answer"]) + 1) % 4], "test"),
        "ocrbench": (Features({"dataset": Value("string"), "question": Value("string"),
                               "question_type": Value("string"), "answer": Sequence(Value("string")), "image": img}),
                     [{"dataset": "IIIT5K", "question": f"[q{k}] what is written in the image?",
                       "question_type": "Regular Text Recognition", "answer": [f"WORD{k}", f"word{k}x"],
                       "image": _image(k)} for k in range(4)]
                     + [{"dataset": "HME100k", "question": "[q4] Write out the expression.",
                         "question_type": "Handwritten Mathematical Expression Recognition", "answer": ["x ^ { 2 }"],
                         "image": _image(4)}],
                     lambda r: f"It says {r['answer'][0].replace(' ', '')}.", lambda r: "zzz", "test"),
        "chartqa": (Features({"image": img, "query": Value("string"), "label": Sequence(Value("string")),
                              "human_or_machine": ClassLabel(names=["human", "machine"])}),
                    [{"image": _image(k), "query": f"[q{k}] What is the peak value?", "label": [str(10 * k + 7)],
                      "human_or_machine": k % 2} for k in range(5)],
                    lambda r: f"The bars rise.\nFinal Answer: {r['label'][0]}", lambda r: "Final Answer: 99999",
                    "test"),
        "mmmu_val": (_mmmu_features({"question_type": Value("string"), "subfield": Value("string")}),
                     [r | {"subfield": "Art"} for r in _mmmu_rows(6, 4, open_every=3)],
                     lambda r: r["answer"], lambda r: "D" if r["answer"] in "ABC" else "zzz", "validation"),
    }


def _override(name: str, parquet: Path, split: str, builtin: Path) -> str:
    if name == "chartqa":
        base = builtin / "chartqa" / "chartqa.yaml"
    elif name == "mmmu_val":
        base = builtin / "mmmu" / "mmmu_art.yaml"  # one subject of lm-eval's group (task mmmu_val_art)
    else:
        base = TASKS_DIR / f"{name}.yaml"
    return (f"include: {base}\ntask: {name}_local\ndataset_path: parquet\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {parquet}\n")


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory):
    import lm_eval
    from datasets import Dataset

    root = tmp_path_factory.mktemp("real_benchmarks")
    builtin = Path(lm_eval.__file__).parent / "tasks"
    specs = _datasets()
    for name, (features, rows, _, _, split) in specs.items():
        columns = {key: [row[key] for row in rows] for key in features}
        Dataset.from_dict(columns, features=features).to_parquet(str(root / f"{name}.parquet"))
        (root / f"{name}_local.yaml").write_text(_override(name, root / f"{name}.parquet", split, builtin))
    # lm-eval's MMMU group shape: a group over subject tasks, aggregated by size
    (root / "mmmu_group.yaml").write_text("group: mmmu_local\ntask:\n  - mmmu_val_local\n  - mmmu_val_local_b\n"
                                          "aggregate_metric_list:\n  - metric: acc\n    aggregation: mean\n"
                                          "    weight_by_size: true\n")
    (root / "mmmu_b.yaml").write_text(f"include: {root / 'mmmu_val_local.yaml'}\ntask: mmmu_val_local_b\n")
    return root, specs


def _scripted(specs: dict, right: bool):
    from lm_eval.api.model import LM

    answers = {}
    for name, (_, rows, good, bad, _) in specs.items():
        for row in rows:
            key = re.search(r"\[q[^\]]*\]", row.get("question") or row.get("query")).group(0)
            answers[(name, key)] = good(row) if right else bad(row)

    class Scripted(LM):
        MULTIMODAL = True

        def generate_until(self, requests, disable_tqdm=False):
            out = []
            for r in requests:
                context, _, extra = r.args
                assert extra["visual"] and all(isinstance(im, Image.Image) for im in extra["visual"])
                assert context.count("<image>") == len(extra["visual"])  # placeholders match the images
                name = r.task_name.removesuffix("_local").removesuffix("_local_b")
                out.append(answers[(name, re.search(r"\[q[^\]]*\]", context).group(0))])
            return out

        def loglikelihood(self, requests, disable_tqdm=False):
            raise AssertionError("generative benchmarks only")

        loglikelihood_rolling = loglikelihood

    return Scripted()


@pytest.mark.parametrize("right", [True, False])
def test_every_real_benchmark_scores_right_answers_one_and_wrong_answers_zero(local_tasks, right):
    import lm_eval

    from tasks.evaluate import task_manager

    root, specs = local_tasks
    names = [f"{name}_local" for name in specs if name != "mmmu_val"] + ["mmmu_local"]  # MMMU as lm-eval's: a group
    results = lm_eval.simple_evaluate(model=_scripted(specs, right), tasks=names,
                                      task_manager=task_manager((str(root),), tuple(names)), bootstrap_iters=0)
    res = results["results"]
    for name in specs:
        local = "mmmu_local" if name == "mmmu_val" else f"{name}_local"
        assert res[local][f"{PRIMARY[name]},none"] == (1.0 if right else 0.0), name
    mme = res["mme_local"]
    assert (mme["mme_perception,none"], mme["mme_cognition,none"]) == ((600.0, 200.0) if right else (0.0, 0.0))
    assert res["ocrbench_local"]["ocrbench_score,none"] == (5.0 if right else 0.0)
    assert res["mmstar_local"]["mmstar_average,none"] == (1.0 if right else 0.0)


def test_a_group_is_judged_on_every_item_of_its_subtasks(local_tasks):
    import lm_eval

    from tasks.evaluate import _items, task_manager

    root, specs = local_tasks
    results = lm_eval.simple_evaluate(model=_scripted(specs, True), tasks=["mmmu_local"], log_samples=True,
                                      task_manager=task_manager((str(root),), ("mmmu_local",)), bootstrap_iters=0)
    items, triples = _items(results, "mmmu_local")
    assert sorted(items) == sorted(f"{t}/{k}" for t in ("mmmu_val_local", "mmmu_val_local_b") for k in range(6))
    assert set(items.values()) == {1.0} and {t for _, t, _ in triples} == {"mmmu_val_local", "mmmu_val_local_b"}


def test_option_parsing_follows_the_answer_not_the_first_capital():
    from tasks.lm_tasks.utils import option_letter

    assert option_letter("I think (E) fits", 10) == "E"
    assert option_letter("The answer is C", 10) == "C"
    assert option_letter("B. red", 4) == "B" and option_letter("blue, clearly", 4, COLOURS[:4]) == "C"
    assert option_letter("none of them", 4, COLOURS[:4]) == ""
