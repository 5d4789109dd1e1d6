"""The stage gate: a pure function from two evaluations and a policy to a verdict (DESIGN.md §5).

``gate(candidate, baseline, policy, stage, block_size)`` passes a stage when, on every gate benchmark,
the candidate's score is at least the baseline's minus the benchmark's tolerance — judged on the items
both answered (paired), with the paired standard error reported — and its tokens per forward on the
long-output benchmark reach the policy's minimum for that block size. ``policy.z > 0`` turns the
accuracy check into a one-sided non-inferiority test (drop + z·se ≤ tolerance). A missing benchmark, a
missing item, a NaN score or a missing speed figure fails; it never passes.

``select(candidates, ...)`` is the gate over a sweep of decode settings (thresholds, and the stage's own
speculative mode): of the settings that pass, the one with the most tokens per forward (ties: the higher
threshold) is promoted with its decode setting. ``setting(decode)`` names a setting for people and reports.

Standard library only (flows import it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bard_core.config import GateConfig


@dataclass(frozen=True)
class EvalReport:
    """One checkpoint evaluated with one decode setting (DESIGN.md §2)."""

    checkpoint: str
    mode: str  # "ar" | "diffusion" | "speculative"
    decode: dict  # the decode setting (threshold, block size, ...)
    scores: dict[str, float]  # benchmark -> mean of its per-item primary metric (what the gate judges)
    items: dict[str, dict[str, float]] = field(default_factory=dict)  # benchmark -> item id -> primary metric
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # benchmark -> lm-eval's reported metrics
    speed: dict = field(default_factory=dict)  # see tasks/evaluate.py (tpf, batch 1/N tok/s, AR side by side)
    harness: dict = field(default_factory=dict)  # wall time of lm-eval vs the engine's own decode time
    samples_uri: str | None = None  # per-item jsonl (responses, metrics, decode stats)
    label: str = ""

    @property
    def threshold(self) -> float | None:
        return self.decode.get("threshold") if self.mode == "diffusion" else None


@dataclass(frozen=True)
class Check:
    benchmark: str
    score: float | None
    baseline: float | None
    drop: float | None  # baseline − score on the paired items (positive: the candidate is worse)
    se: float | None  # standard error of the paired drop
    n: int  # paired items
    tolerance: float
    passed: bool
    reason: str | None = None


@dataclass(frozen=True)
class GateResult:
    stage: str
    passed: bool
    reasons: tuple[str, ...]
    promoted_uri: str | None = None
    checks: tuple[Check, ...] = ()
    tpf: float | None = None
    min_tpf: float | None = None
    decode: dict = field(default_factory=dict)  # the setting the verdict is about (the chosen one)
    sweep: tuple[dict, ...] = ()  # per evaluated setting: threshold, passed, tpf, reasons


def setting(decode: dict) -> str:
    """A decode setting's name: ``spec`` for the speculative (lossless, self-verified) mode, ``draft`` for the
    speculative mode verified by another model (the AR base), else ``τ=<threshold>``."""
    if decode.get("engine") == "speculative" or decode.get("mode") == "speculative":
        return "spec" if decode.get("verifier") in (None, "self") else "draft"
    threshold = decode.get("threshold")
    return "-" if threshold is None else f"τ={threshold:g}"


def paired(baseline: dict[str, float], candidate: dict[str, float]) -> tuple[float, float, int, list[str]]:
    """(mean drop baseline − candidate, its standard error, n) over the baseline's items, and the ids
    of baseline items the candidate lacks."""
    missing = [k for k in baseline if k not in candidate]
    diffs = [baseline[k] - candidate[k] for k in baseline if k in candidate]
    n = len(diffs)
    if n == 0:
        return math.nan, math.nan, 0, missing
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n), n, missing


def _bad(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _check(name: str, candidate: EvalReport, baseline: EvalReport, policy: GateConfig) -> Check:
    tol = policy.tolerance_for(name)
    score, base = candidate.scores.get(name), baseline.scores.get(name)
    if name not in baseline.scores:
        return Check(name, score, None, None, None, 0, tol, False, f"{name}: no baseline score")
    if name not in candidate.scores:
        return Check(name, None, base, None, None, 0, tol, False, f"{name}: missing from the evaluation")
    if _bad(score) or _bad(base):
        return Check(name, score, base, None, None, 0, tol, False, f"{name}: score is NaN (candidate {score}, "
                                                                      f"baseline {base})")
    base_items, cand_items = baseline.items.get(name), candidate.items.get(name)
    if not base_items or cand_items is None:
        drop, se, n = base - score, None, 0  # no per-item results: unpaired means, no standard error
    else:
        drop, se, n, missing = paired(base_items, cand_items)
        if missing:
            return Check(name, score, base, None, None, n, tol, False,
                         f"{name}: {len(missing)} of {len(base_items)} baseline items have no candidate result")
        if any(_bad(v) for v in cand_items.values()):
            return Check(name, score, base, None, None, n, tol, False, f"{name}: NaN item scores")
    margin = policy.z * (se or 0.0)
    if drop + margin <= tol + 1e-12:
        return Check(name, score, base, drop, se, n, tol, True)
    se_text = f"paired se {se:.3f}" if se is not None else "unpaired"
    test = f" + {policy.z:g}·se" if policy.z else ""
    return Check(name, score, base, drop, se, n, tol, False,
                 f"{name} {score:.3f} < AR {base:.3f} − {tol:.3f}{test} ({se_text}, n={n})")


def gate(candidate: EvalReport, baseline: EvalReport, policy: GateConfig, stage: str,
         block_size: int | None) -> GateResult:
    """The verdict on one decode setting of a stage (see module docstring)."""
    checks = tuple(_check(name, candidate, baseline, policy) for name in policy.benchmarks)
    reasons = [c.reason for c in checks if not c.passed]
    tpf = candidate.speed.get("tpf")
    min_tpf = policy.min_tpf.get(block_size) if block_size is not None else None
    if min_tpf is not None:
        if _bad(tpf):
            reasons.append(f"{policy.speed_benchmark}: no tokens-per-forward figure")
        elif tpf + 1e-12 < min_tpf:
            reasons.append(f"{policy.speed_benchmark} TPF {tpf:.2f} < minimum {min_tpf:.2f} for B={block_size}")
    return GateResult(stage, not reasons, tuple(reasons), None, checks, tpf, min_tpf, dict(candidate.decode))


def select(candidates: list[EvalReport], baseline: EvalReport, policy: GateConfig, stage: str,
           block_size: int | None) -> GateResult:
    """The gate over a threshold sweep: the passing setting with the most tokens per forward (ties: the
    higher threshold), or a failure whose reasons name every setting's failures."""
    if not candidates:
        return GateResult(stage, False, ("no evaluation to judge",))
    results = [gate(c, baseline, policy, stage, block_size) for c in candidates]
    sweep = tuple({"setting": setting(c.decode), "threshold": c.threshold, "passed": r.passed, "tpf": r.tpf,
                   "reasons": list(r.reasons)} for c, r in zip(candidates, results))
    passing = [(r, c) for r, c in zip(results, candidates) if r.passed]
    if passing:
        best, _ = max(passing, key=lambda rc: (rc[0].tpf or 0.0, rc[1].threshold or 0.0))
        return GateResult(stage, True, (), None, best.checks, best.tpf, best.min_tpf, best.decode, sweep)
    many = len(candidates) > 1
    reasons = tuple((f"{setting(c.decode)}: " if many else "") + reason
                    for c, r in zip(candidates, results) for reason in r.reasons)
    closest = min(zip(results, candidates), key=lambda rc: (len(rc[0].reasons), -(rc[1].threshold or 0.0)))[0]
    return GateResult(stage, False, reasons, None, closest.checks, closest.tpf, closest.min_tpf, closest.decode,
                      sweep)
