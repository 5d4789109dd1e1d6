"""lm-eval's overhead on the five shapes benchmarks: the harness's wall time against the engine's own
decode time, with our task setup and with lm-eval's defaults, side by side in one run.

    python -m benchmarks.eval_overhead [--model DIR] [--mode ar|diffusion] [--limit 300] [--repeats 3]
        [--benchmarks-dir DIR]

`ours`: the shapes YAMLs as `bard synth` writes them (prompts from a function, images left encoded until
the model reads them: `bard_core.eval_docs`) and lm-eval's per-sample image hashing off (LMEVAL_HASHMM=0,
set by `tasks.lm_model`). `defaults`: the same tasks with a Jinja ``doc_to_text``, a decoded ``image``
column and the hashing on — how a task YAML is usually written. Each row is one `simple_evaluate` of all
five benchmarks through the `bard` model; the first run of each setting also pays `datasets`' one-time
parquet → Arrow conversion (cold). Overhead = (lm-eval wall − engine decode − prompt encoding) / engine
decode. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import tempfile
from pathlib import Path

SHAPES = ("shapes_mcq", "shapes_yesno", "shapes_count", "shapes_ocr", "shapes_extract")


def lm_eval_defaults(benchmarks: Path, out: Path) -> Path:
    """A copy of the shapes task YAMLs written the usual way (Jinja prompt, decoded image column)."""
    shutil.copytree(benchmarks, out)
    for yaml in out.glob("*/*.yaml"):
        text = yaml.read_text().replace("process_docs: !function metrics.lazy_images\n", "")
        text = text.replace("doc_to_image: !function metrics.doc_to_image", "doc_to_image: [image]")
        text = text.replace("doc_to_text: !function metrics.doc_to_text", 'doc_to_text: "<image>{{question}}"')
        text = re.sub(r"(?m)^task: (\w+)", r"task: \1_defaults", text)
        yaml.write_text(text)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped tiny AR base)")
    parser.add_argument("--mode", choices=["ar", "diffusion"], default=None,
                        help="default: diffusion for a block-diffusion checkpoint")
    parser.add_argument("--limit", type=int, default=300, help="items per benchmark")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--benchmarks-dir", default=None, help="`bard synth` benchmarks (default: a new world)")
    args = parser.parse_args()

    import lm_eval.evaluator

    from bard_core.assets import shipped_base
    from bard_core.checkpoint import read_meta
    from tasks.evaluate import Suite, evaluate
    from tasks.lm_model import BardLM

    work = Path(tempfile.mkdtemp(prefix="eval_overhead_"))
    benchmarks = Path(args.benchmarks_dir) if args.benchmarks_dir else None
    if benchmarks is None:
        from bard_core.shapes.synth import synth

        synth(work / "world", seed=11, size=20, bench_size=args.limit)
        benchmarks = work / "world" / "benchmarks"
    defaults = lm_eval_defaults(benchmarks, work / "defaults")
    model = args.model or str(shipped_base())
    mode = args.mode or ("diffusion" if read_meta(model).get("block_size") else "ar")
    lm = BardLM(model, mode=mode, recipe="tiny")
    settings = {"ours": (Suite(SHAPES, (str(benchmarks),), args.limit), False),
                "defaults": (Suite(tuple(f"{n}_defaults" for n in SHAPES), (str(defaults),), args.limit), True)}
    rows = []
    for repeat in range(args.repeats):
        for name, (suite, hash_images) in settings.items():
            lm_eval.evaluator.LMEVAL_HASHMM = hash_images
            h = evaluate(lm, suite, work / f"{name}-{repeat}").harness
            rows.append({"setting": name, "run": repeat, "cold": repeat == 0, **h,
                         "lm_eval_s": h["total_s"] - h["engine_s"] - h["encode_s"]})

    print(f"lm-eval overhead — {model} ({mode}), five shapes benchmarks, {args.limit} items each")
    print(f"{'setting':<9} {'run':>3} {'total s':>8} {'engine s':>8} {'prompts s':>9} {'lm-eval s':>9} {'overhead':>9}")
    for r in rows:
        print(f"{r['setting']:<9} {r['run']:>3} {r['total_s']:>8.2f} {r['engine_s']:>8.2f} {r['encode_s']:>9.2f} "
              f"{r['lm_eval_s']:>9.2f} {100 * r['overhead']:>8.0f}%" + ("  (cold)" if r["cold"] else ""))
    summary = {name: {"median_overhead_warm": statistics.median(r["overhead"] for r in rows
                                                                if r["setting"] == name and not r["cold"]),
                      "cold_overhead": next(r["overhead"] for r in rows if r["setting"] == name and r["cold"])}
               for name in settings} if args.repeats > 1 else {}
    for name, s in summary.items():
        print(f"{name}: median warm overhead {100 * s['median_overhead_warm']:.0f}% of the engine's decode time, "
              f"cold {100 * s['cold_overhead']:.0f}%")
    print(json.dumps({"model": model, "mode": mode, "limit": args.limit, "summary": summary, "rows": rows}))


if __name__ == "__main__":
    main()
