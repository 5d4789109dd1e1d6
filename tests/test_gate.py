"""The gate is a pure function: verdicts on hand-written numbers."""

from __future__ import annotations

import math

import pytest

from bard_core.config import GateConfig
from bard_core.gate import EvalReport, gate, paired, select, setting

POLICY = GateConfig(benchmarks=("mcq", "extract"), speed_benchmark="extract", default_tolerance=0.03,
                    min_tpf={4: 1.5, 8: 2.0})


def report(mcq: list[float], extract: list[float], tpf: float | None = 2.0, threshold: float = 0.9,
           mode: str = "diffusion") -> EvalReport:
    items = {"mcq": {str(i): v for i, v in enumerate(mcq)}, "extract": {str(i): v for i, v in enumerate(extract)}}
    scores = {k: sum(v.values()) / len(v) for k, v in items.items()}
    return EvalReport("ckpt", mode, {"threshold": threshold}, scores, items, speed={"tpf": tpf})


AR = report([1.0] * 90 + [0.0] * 10, [1.0] * 100, tpf=1.0, mode="ar")


def test_a_stage_within_tolerance_and_fast_enough_passes():
    result = gate(report([1.0] * 88 + [0.0] * 12, [1.0] * 100), AR, POLICY, "B4", 4)
    assert result.passed and result.reasons == ()
    mcq = next(c for c in result.checks if c.benchmark == "mcq")
    assert mcq.drop == pytest.approx(0.02) and mcq.n == 100 and mcq.se > 0 and mcq.passed


def test_a_benchmark_just_over_its_tolerance_fails_with_a_readable_reason():
    result = gate(report([1.0] * 86 + [0.0] * 14, [1.0] * 100), AR, POLICY, "B4", 4)  # 4 points down
    assert not result.passed and len(result.reasons) == 1
    assert result.reasons[0].startswith("mcq 0.860 < AR 0.900 − 0.030 (paired se 0.0")
    at_the_line = gate(report([1.0] * 87 + [0.0] * 13, [1.0] * 100), AR, POLICY, "B4", 4)  # exactly 3 points
    assert at_the_line.passed


def test_per_benchmark_tolerances_come_from_the_policy():
    strict = GateConfig(benchmarks=("mcq", "extract"), speed_benchmark="extract", tolerance={"mcq": 0.01},
                        min_tpf={4: 1.5})
    assert not gate(report([1.0] * 88 + [0.0] * 12, [1.0] * 100), AR, strict, "B4", 4).passed


def test_too_few_tokens_per_forward_fails_even_when_accurate():
    result = gate(report([1.0] * 90 + [0.0] * 10, [1.0] * 100, tpf=1.9), AR, POLICY, "B8", 8)
    assert result.reasons == ("extract TPF 1.90 < minimum 2.00 for B=8",)
    assert gate(report([1.0] * 90 + [0.0] * 10, [1.0] * 100, tpf=None), AR, POLICY, "B8", 8).reasons == \
        ("extract: no tokens-per-forward figure",)
    assert gate(report([1.0] * 90 + [0.0] * 10, [1.0] * 100, tpf=1.0), AR, POLICY, "B16", 16).passed  # no minimum


def test_a_missing_benchmark_or_item_fails():
    partial = EvalReport("ckpt", "diffusion", {}, {"mcq": 0.9}, {"mcq": dict(AR.items["mcq"])}, speed={"tpf": 3.0})
    result = gate(partial, AR, POLICY, "B4", 4)
    assert not result.passed and result.reasons == ("extract: missing from the evaluation",)
    short = report([1.0] * 90, [1.0] * 100)  # ten mcq items never answered
    assert gate(short, AR, POLICY, "B4", 4).reasons == ("mcq: 10 of 100 baseline items have no candidate result",)


def test_nan_never_passes():
    bad = report([1.0] * 100, [1.0] * 100)
    nan_score = EvalReport(bad.checkpoint, bad.mode, bad.decode, {**bad.scores, "mcq": math.nan}, bad.items,
                           speed=bad.speed)
    assert not gate(nan_score, AR, POLICY, "B4", 4).passed
    nan_item = report([math.nan] + [1.0] * 99, [1.0] * 100)
    assert not gate(nan_item, AR, POLICY, "B4", 4).passed


def test_pairing_sees_what_the_means_hide():
    base = {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0}
    same_items = paired(base, dict(base))
    swapped = paired(base, {"a": 0.0, "b": 1.0, "c": 0.0, "d": 1.0})  # the same mean, every item changed
    assert same_items[:3] == (0.0, 0.0, 4) and swapped[0] == 0.0 and swapped[1] > 0.5


def test_non_inferiority_needs_the_drop_plus_z_standard_errors_inside_the_tolerance():
    candidate = report([1.0] * 88 + [0.0] * 12, [1.0] * 100)  # 2 points down, se ≈ 1.4 points
    assert gate(candidate, AR, POLICY, "B4", 4).passed
    strict = GateConfig(**{**POLICY.__dict__, "z": 1.645})
    result = gate(candidate, AR, strict, "B4", 4)
    assert not result.passed and "+ 1.645·se" in result.reasons[0]


def test_the_sweep_promotes_the_fastest_passing_threshold():
    slow = report([1.0] * 90 + [0.0] * 10, [1.0] * 100, tpf=2.0, threshold=0.9)
    fast = report([1.0] * 88 + [0.0] * 12, [1.0] * 100, tpf=3.5, threshold=0.7)
    wrong = report([1.0] * 70 + [0.0] * 30, [1.0] * 100, tpf=6.0, threshold=0.5)  # fastest, but inaccurate
    result = select([slow, fast, wrong], AR, POLICY, "B4", 4)
    assert result.passed and result.decode == {"threshold": 0.7} and result.tpf == 3.5
    assert [s["passed"] for s in result.sweep] == [True, True, False]
    tie = select([report([1.0] * 90 + [0.0] * 10, [1.0] * 100, 2.0, 0.7), slow], AR, POLICY, "B4", 4)
    assert tie.decode == {"threshold": 0.9}  # same speed: the safer, higher threshold


def test_the_stages_own_speculative_mode_competes_in_the_sweep_like_any_setting():
    block = report([1.0] * 90 + [0.0] * 10, [1.0] * 100, tpf=1.8, threshold=0.9)
    spec_decode = {"engine": "speculative", "mode": "speculative", "threshold": 0.9}
    spec = EvalReport("ckpt", "speculative", spec_decode, block.scores, block.items, speed={"tpf": 2.6})
    result = select([block, spec], AR, POLICY, "B4", 4)
    assert result.passed and result.decode == spec_decode and result.tpf == 2.6 and setting(result.decode) == "spec"
    assert [s["setting"] for s in result.sweep] == ["τ=0.9", "spec"]
    # its answers are its own causal ones: when they lose accuracy it is not promoted, and says so
    worse = EvalReport("ckpt", "speculative", spec_decode, {"mcq": 0.8, "extract": 1.0},
                       {"mcq": {str(i): float(i < 80) for i in range(100)}, "extract": block.items["extract"]},
                       speed={"tpf": 5.0})
    result = select([block, worse], AR, POLICY, "B4", 4)
    assert result.passed and result.decode == {"threshold": 0.9}
    assert result.sweep[1]["setting"] == "spec" and not result.sweep[1]["passed"]
    failed = select([worse], AR, POLICY, "B4", 4)
    assert not failed.passed and failed.reasons[0].startswith("mcq 0.800 < AR 0.900")


def test_a_sweep_with_no_passing_setting_names_every_failure():
    result = select([report([0.0] * 100, [1.0] * 100, threshold=0.9), report([1.0] * 90 + [0.0] * 10, [1.0] * 100,
                                                                             tpf=1.0, threshold=0.5)],
                    AR, POLICY, "B4", 4)
    assert not result.passed
    assert result.reasons[0].startswith("τ=0.9: mcq 0.000 < AR 0.900")
    assert result.reasons[1] == "τ=0.5: extract TPF 1.00 < minimum 1.50 for B=4"
    assert select([], AR, POLICY, "B4", 4).reasons == ("no evaluation to judge",)
