"""The shapes benchmarks as lm-eval tasks: per benchmark a test parquet, a task YAML and the metrics shim that
points lm-eval at `bard_core.shapes.metrics` (what is scored how: its `FAMILIES` / `BENCHMARKS` table)."""

from __future__ import annotations

from pathlib import Path

from bard_core.shapes import world
from bard_core.shapes.metrics import BENCHMARKS, FAMILIES


def _yaml(name: str, process: str, metrics: tuple[str, ...], data_file: Path, max_tokens: int) -> str:
    metric_lines = []
    for metric in metrics:
        aggregation = "!function metrics.agg_acc_plus" if metric == "acc_plus" else "mean"
        metric_lines.append(f"  - metric: {metric}\n    aggregation: {aggregation}\n    higher_is_better: true")
    return (
        f"task: {name}\n"
        "dataset_path: parquet\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {data_file.resolve()}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "process_docs: !function metrics.lazy_images\n"
        "doc_to_image: !function metrics.doc_to_image\n"
        "doc_to_text: !function metrics.doc_to_text\n"  # a function: lm-eval compiles a Jinja template per item
        "doc_to_target: answer\n"
        "generation_kwargs:\n"
        '  until: ["<|im_end|>"]\n'
        f"  max_gen_toks: {max_tokens}\n"
        "  do_sample: false\n"
        f"process_results: !function metrics.{process}\n"
        "metric_list:\n" + "\n".join(metric_lines) + "\n"
        "metadata:\n"
        f"  version: 1.0\n  world: {world.WORLD_VERSION}\n"
    )


METRICS_SHIM = '"""lm-eval entry points of this benchmark; the code lives in bard_core.shapes.metrics."""\n' \
    "from bard_core.eval_docs import lazy_images  # noqa: F401\n" \
    "from bard_core.shapes.metrics import agg_acc_plus, doc_to_image, doc_to_text, process_count, process_exact, " \
    "process_extract, process_mcq, process_yesno  # noqa: F401\n"


def write_benchmarks(out: Path, suites: dict[str, list[dict]]) -> dict[str, int]:
    """Write `suites` (benchmark name -> items) under ``out/benchmarks/<name>/``; returns the item counts."""
    from datasets import Dataset, Features, Value, disable_progress_bars
    from datasets import Image as ImageFeature

    disable_progress_bars()
    counts = {}
    features = Features({"id": Value("string"), "image_id": Value("string"), "image": ImageFeature(),
                         "question": Value("string"), "answer": Value("string")})
    for name, items in suites.items():
        family = BENCHMARKS[name]
        process, metric_names = FAMILIES[family]
        directory = out / "benchmarks" / name
        directory.mkdir(parents=True, exist_ok=True)
        columns = {k: [item[k] if k != "image" else {"bytes": world.encode(item["image"]), "path": None}
                       for item in items] for k in features}
        Dataset.from_dict(columns, features=features).to_parquet(str(directory / "test.parquet"))
        max_tokens = 96 if family == "extract" else 8
        (directory / f"{name}.yaml").write_text(_yaml(name, process.__name__, metric_names, directory / "test.parquet",
                                                       max_tokens))
        (directory / "metrics.py").write_text(METRICS_SHIM)
        counts[name] = len(items)
    return counts
