"""lm-eval task YAMLs for the real benchmarks, and the primary metric of every benchmark the gate knows.

The YAMLs point at the standard hub datasets (FACTS.md); ChartQA and MMMU are lm-eval's own
(``chartqa``, ``mmmu_val``). `PRIMARY` names, per benchmark, the per-item metric whose mean the gate
judges (an official figure that is not a mean of items — MME's perception score, OCRBench's /1000,
MMStar's category average — is reported beside it, never gated on). A task missing from `PRIMARY`
is judged on the first numeric metric of its samples.
"""

from __future__ import annotations

from pathlib import Path

from bard_core.shapes.metrics import BENCHMARKS as SHAPES
from bard_core.shapes.metrics import primary

TASKS_DIR = Path(__file__).resolve().parent
BUILTIN_DIRS = ("chartqa", "mmmu")  # lm-eval's own tasks we use, indexed without its whole task tree

PRIMARY = {
    **{name: primary(name) for name in SHAPES},
    "mmmu_val": "acc",
    "mmmu_pro": "acc",
    "mme": "acc",
    "realworldqa": "exact_match",
    "mmstar": "acc",
    "ai2d": "exact_match",
    "chartqa": "relaxed_accuracy",
    "ocrbench": "acc",
}
