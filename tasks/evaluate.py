"""The evaluate task: a checkpoint through lm-eval with the ``bard`` model, plus decode speed.

``evaluate(lm, suite, out)`` runs ``lm_eval.simple_evaluate`` on the suite's benchmarks (any lm-eval
task or group: ours in `tasks/lm_tasks`, lm-eval's built-ins, or YAMLs under the suite's include
paths) and returns an `EvalReport`:

- ``scores`` / ``items``: per benchmark, the mean of its primary per-item metric (`lm_tasks.PRIMARY`)
  and every item's value, by item id, so two evaluations can be compared item by item (paired);
  ``metrics``: what lm-eval reported; ``samples_uri``: one jsonl per benchmark with every item's answer,
  metrics and decode statistics.
- ``speed``: tokens per forward over the whole long-output benchmark (``tpf``), and tokens/s measured
  on its first ``speed_items`` items at batch 1 and on four batches' worth at batch N (``batch``) —
  beside the AR base (``ar``) in the same engine, interleaved part by part (`measure_speed`), tokens
  counted through EOS.
- ``harness``: lm-eval's wall time against the engine's own decode time (``overhead``, see docs/).

``evaluate_checkpoint`` loads a checkpoint once and evaluates it at every threshold of a sweep.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import task

from bard_core.config import GateConfig
from bard_core.gate import EvalReport
from tasks.lm_model import BardLM
from tasks.lm_tasks import BUILTIN_DIRS, PRIMARY, TASKS_DIR


@dataclass(frozen=True)
class Suite:
    """What an evaluation runs: benchmarks (lm-eval task or group names) and where to find their YAMLs."""

    benchmarks: tuple[str, ...]
    include_paths: tuple[str, ...] = ()
    limit: int | None = None  # items per benchmark (per subtask of a group)
    speed_benchmark: str | None = None
    speed_items: int = 32
    lossless: bool = False  # beside a block-diffusion model, its lossless mode verified by the AR base (`_lossless`)

    @classmethod
    def of_gate(cls, gate: GateConfig, include_paths: tuple[str, ...] = ()) -> Suite:
        return cls(tuple(gate.benchmarks), tuple(include_paths), gate.limit, gate.speed_benchmark, gate.speed_items,
                   gate.lossless)


_MANAGERS: dict = {}


def task_manager(include_paths: tuple[str, ...], names: tuple[str, ...]):
    """An lm-eval TaskManager that knows `names`: ours, the built-ins we use and the include paths are
    indexed in milliseconds; lm-eval's whole task tree (~15 s to index) only when a name needs it."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not Path(path).is_dir():
            raise ValueError(f"include path {path} is not a directory")
    builtin = Path(lm_eval.__file__).parent / "tasks"
    paths = [str(TASKS_DIR), *(str(builtin / d) for d in BUILTIN_DIRS), *map(str, include_paths)]
    for everything in (False, True):
        key = (tuple(paths), everything)
        if key not in _MANAGERS:
            _MANAGERS[key] = TaskManager(include_path=paths, include_defaults=everything)
        manager = _MANAGERS[key]
        unknown = [n for n in names if n not in manager.all_tasks]
        if not unknown:
            return manager
    raise ValueError(f"unknown lm-eval task(s) {unknown}: not built in, not ours, and not under "
                     f"{', '.join(map(str, include_paths)) or 'any include path'}")


def _leaves(results: dict, name: str) -> list[str]:
    children = results.get("group_subtasks", {}).get(name)
    if not children:
        return [name]
    return [leaf for child in children for leaf in _leaves(results, child)]


def _items(results: dict, name: str) -> tuple[dict[str, float], list[tuple[str, str, dict]]]:
    """(item id -> primary metric, [(item id, task, sample)]) of a benchmark (a task, or a group's leaves)."""
    leaves = _leaves(results, name)
    samples = [(leaf, s) for leaf in leaves for s in results["samples"].get(leaf, [])]
    if not samples:
        raise ValueError(f"lm-eval returned no samples for {name}")
    first = samples[0][1]
    metric = PRIMARY.get(name) or next((m for m in first["metrics"] if isinstance(first[m], (int, float))), None)
    if metric is None:
        raise ValueError(f"{name}: no numeric per-item metric to judge ({first['metrics']})")
    triples = [(str(s["doc_id"]) if leaves == [name] else f"{leaf}/{s['doc_id']}", leaf, s) for leaf, s in samples]
    return {key: float(s[metric]) for key, _, s in triples}, triples


def _reported(results: dict, name: str) -> dict[str, float]:
    out = {}
    for key, value in results["results"].get(name, {}).items():
        metric, _, _ = key.partition(",")
        if "," in key and "stderr" not in metric and isinstance(value, (int, float)):
            out[metric] = float(value)
    return out


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def _write_samples(path: Path, triples: list[tuple[str, str, dict]], stats: dict) -> None:
    with path.open("w") as fh:
        for key, task_name, s in triples:
            record = {"id": key, "task": task_name, "doc_id": s["doc_id"], "target": str(s["target"]),
                      "response": s["filtered_resps"][0] if s["filtered_resps"] else None,
                      "metrics": {m: _jsonable(s[m]) for m in s["metrics"]},
                      "decode": (stats.get((task_name, s["doc_id"])) or [None])[0]}
            fh.write(json.dumps(record, default=str) + "\n")


def _parts(requests: list[tuple], rounds: int, size: int) -> list[list[tuple]]:
    """`requests` in at most `rounds` consecutive parts, each a whole number of batches of `size`."""
    batches = -(-len(requests) // size)
    per = -(-batches // max(1, min(rounds, batches))) * size
    return [requests[i:i + per] for i in range(0, len(requests), per)]


def measure_speed(lms: dict[str, BardLM], requests: list[tuple], items: int, batch_size: int, rounds: int = 4,
                  answers: tuple[str, ...] = ()) -> dict[str, dict]:
    """Per decoder of `lms`: tokens (through EOS), forwards, engine seconds, TPF and tokens/s at batch 1 (the first
    `items` requests) and at `batch_size` (four batches' worth, so one batch's noise does not decide the figure),
    measured side by side: each list in `rounds` parts that every decoder decodes in turn (the order rotating), so
    two decoders' ratio compares them under the same load, not two moments of a shared machine (docs/evaluation.md).
    `answers`: the decoders whose batch-1 answers are kept too (what the lossless mode must reproduce)."""
    names = list(lms)
    for lm in lms.values():
        lm.decode_contexts(requests[:1], 1)  # untimed: a decoder's first call pays one-off costs (allocations, caches)
    out: dict[str, dict] = {name: {} for name in names}
    for size, chunk in ((1, requests[:items]), (batch_size, requests[:max(items, 4 * batch_size)])):
        totals = {name: [0, 0, 0.0, []] for name in names}  # tokens, nfe, seconds, answers
        for r, part in enumerate(_parts(chunk, rounds, size)):
            for name in names[r % len(names):] + names[:r % len(names)]:
                lm, t = lms[name], totals[name]
                before = lm.engine_seconds
                texts, stats = lm.decode_contexts(part, size)
                t[0] += sum(s["tokens"] for s in stats)
                t[1] += sum(s["nfe"] for s in stats)
                t[2] += lm.engine_seconds - before
                t[3] += texts
        for name, (tokens, nfe, seconds, texts) in totals.items():
            out[name][str(size)] = {"items": len(chunk), "tokens": tokens, "nfe": nfe, "seconds": round(seconds, 4),
                                    "tpf": tokens / max(1, nfe), "tok_s": tokens / max(seconds, 1e-9)}
            if name in answers and size == 1:
                out[name]["1"]["answers"] = texts
    return out


def _ratio(mine: dict, theirs: dict) -> dict:
    return {k: v["tok_s"] / max(theirs[k]["tok_s"], 1e-9) for k, v in mine.items() if k in theirs}


def _lossless(spec: BardLM, measured: dict, requests: list[tuple], ar_speed: dict, batch_size: int) -> dict:
    """The model's lossless mode (speculative, verified by the AR base) on the speed items, `measured` beside the AR
    base (`ar_speed`): TPF, the speed-up, and the share of its answers (batch 1 and the same items at batch N)
    identical to the AR base's batch-1 answers — 1.0 unless something is wrong."""
    reference = ar_speed["1"]["answers"]
    batch_n, _ = spec.decode_contexts(requests[:len(reference)], batch_size)
    mine = measured["1"].pop("answers")
    same = sum(a == b for a, b in zip(mine, reference)) + sum(a == b for a, b in zip(batch_n, reference))
    return {"verifier": spec.verifier, "batch": measured, "tpf": measured["1"]["tpf"], "items": len(reference),
            "identical": same / (2 * len(reference)), "speedup": _ratio(measured, ar_speed)}


def evaluate(lm: BardLM, suite: Suite, out: str | Path, ar: BardLM | None = None, label: str = "") -> EvalReport:
    """One evaluation (see module docstring). `ar`: the AR base, whose speed is measured beside this model's."""
    import lm_eval

    out = Path(out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    names = tuple(suite.benchmarks)
    manager = task_manager(tuple(suite.include_paths), names)
    lm.stats.clear()
    lm.requests.clear()
    lm.engine_seconds = lm.encode_seconds = 0.0
    started = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=list(names), task_manager=manager, limit=suite.limit,
                                      log_samples=True, bootstrap_iters=0)
    total = time.perf_counter() - started
    harness = {"total_s": round(total, 3), "engine_s": round(lm.engine_seconds, 3),
               "encode_s": round(lm.encode_seconds, 3),
               "overhead": (total - lm.engine_seconds - lm.encode_seconds) / max(lm.engine_seconds, 1e-9)}
    scores, items, metrics = {}, {}, {}
    for name in names:
        items[name], triples = _items(results, name)
        values = list(items[name].values())
        scores[name] = sum(values) / len(values) if values else math.nan
        metrics[name] = _reported(results, name)
        _write_samples(out / "samples" / f"{name}.jsonl", triples, lm.stats)
    speed = _speed(lm, suite, results, ar) if suite.speed_benchmark in names else {}
    report = EvalReport(checkpoint=lm.pretrained, mode=lm.mode, decode=lm.describe(), scores=scores, items=items,
                        metrics=metrics, speed=speed, harness=harness, samples_uri=str((out / "samples").resolve()),
                        label=label)
    (out / "eval.json").write_text(json.dumps(dataclasses.asdict(report), indent=1, default=str))
    return report


def _speed(lm: BardLM, suite: Suite, results: dict, ar: BardLM | None) -> dict:
    name = suite.speed_benchmark
    leaves = set(_leaves(results, name))
    records = [r for (task_name, _), rs in lm.stats.items() if task_name in leaves for r in rs]
    tokens, nfe = sum(r["tokens"] for r in records), sum(r["nfe"] for r in records)
    requests = [lm.requests[(leaf, s["doc_id"])] for leaf in _leaves(results, name) for s in results["samples"][leaf]]
    speed = {"benchmark": name, "items": len(records), "tokens": tokens, "nfe": nfe, "tpf": tokens / max(1, nfe)}
    lms = {"own": lm} if ar is None else {"own": lm, "ar": ar}
    lossless = suite.lossless and lm.mode == "diffusion" and ar is not None
    if lossless:
        lms["lossless"] = lm.variant(mode="speculative", verifier=ar)
    measured = measure_speed(lms, requests, suite.speed_items, lm.decode.batch_size,
                             answers=("ar", "lossless") if lossless else ())
    speed["batch"] = measured["own"]
    if ar is not None:
        speed["ar"] = measured["ar"]
        speed["speedup"] = _ratio(measured["own"], measured["ar"])
    if lossless:
        speed["lossless"] = _lossless(lms["lossless"], measured["lossless"], requests, measured["ar"],
                                      lm.decode.batch_size)
    return speed


def evaluate_checkpoint(model_dir: str | Path, suite: Suite, out: str | Path, *, mode: str = "diffusion",
                        thresholds: tuple[float, ...] | None = None, ar_model: str | Path | None = None,
                        recipe: str | None = None, overrides: dict | None = None,
                        decode: dict | None = None, verifier: str | Path | None = None,
                        speculative: bool = False, drafter: bool = False) -> list[EvalReport]:
    """Evaluate a checkpoint (loaded once) at each threshold of `thresholds` (None: its own decode setting);
    `speculative`: then in its own speculative mode too (mode diffusion; one more setting of the gate's sweep);
    `drafter`: then as the drafter of `ar_model` (speculative, verified by it; one more setting);
    `ar_model`: the AR base whose decode speed is measured beside each setting. `recipe` and its
    `overrides` give the decode defaults and the mask id; `decode`: explicit DecodeConfig fields."""
    if drafter and mode == "diffusion" and not ar_model:
        raise ValueError("the drafter setting is verified by the AR base: give ar_model")
    lm = BardLM(str(model_dir), mode=mode, recipe=recipe, recipe_overrides=overrides,
                verifier=str(verifier) if verifier else None, **(decode or {}))
    ar = BardLM(str(ar_model), mode="ar", recipe=recipe, recipe_overrides=overrides) if ar_model else None
    settings = [None] if mode in ("ar", "speculative") or not thresholds else list(thresholds)
    reports = []
    for tau in settings:
        variant = lm if tau is None else lm.variant(threshold=tau)
        label = mode if mode in ("ar", "speculative") else f"tau-{variant.decode.threshold:g}"
        reports.append(evaluate(variant, suite, Path(out) / label, ar=ar, label=label))
    if speculative and mode == "diffusion":
        reports.append(evaluate(lm.variant(mode="speculative", verifier="self"), suite, Path(out) / "speculative",
                                ar=ar, label="speculative"))
    if drafter and mode == "diffusion":
        reports.append(evaluate(lm.variant(mode="speculative", verifier=ar), suite, Path(out) / "drafter", ar=ar,
                                label="drafter"))
    return reports


@task(name="evaluate", task_run_name="evaluate {mode} {model_dir}")
def evaluate_task(model_dir: str, suite: Suite, out: str, mode: str = "diffusion",
                  thresholds: tuple[float, ...] | None = None, ar_model: str | None = None,
                  recipe: str | None = None, overrides: dict | None = None,
                  decode: dict | None = None, verifier: str | None = None,
                  speculative: bool = False, drafter: bool = False) -> list[EvalReport]:
    """Prefect task: `evaluate_checkpoint`."""
    return evaluate_checkpoint(model_dir, suite, out, mode=mode, thresholds=thresholds, ar_model=ar_model,
                               recipe=recipe, overrides=overrides, decode=decode, verifier=verifier,
                               speculative=speculative, drafter=drafter)
