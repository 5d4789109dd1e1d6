"""The ablation's variants, budgets and verdicts (issue 24); the flow end to end is in tests/test_pipeline.py."""

from __future__ import annotations

import json
import random

import pytest

from bard_core.ablations import VARIANTS, at_equal_speed, compare, compare_speed, plan, stage_steps
from bard_core.gate import setting
from bard_core.recipes import get_recipe


def _total(per_stage: dict) -> int:
    return sum(int(s["train.merge_steps"]) + int(s["train.distill_steps"]) for s in per_stage.values())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_trains_the_reference_budget(name):
    recipe = get_recipe("tiny")
    schedule = recipe.train.block_sizes
    reference = sum(s["merge"] + s["distill"] for s in stage_steps(recipe, schedule))
    sizes, per_stage = plan(VARIANTS[name], recipe, schedule)
    assert _total(per_stage) == reference == 1210  # B4 450, B8 140, B16 140, B32 480 (B4 has no teacher)
    assert sizes == {"direct": [32], "first_last": [4, 32]}.get(name, [4, 8, 16, 32])
    variant = get_recipe("tiny", VARIANTS[name].overrides)
    for B in sizes:  # every stage's settings are valid, the variant's change included
        get_recipe("tiny", {**VARIANTS[name].overrides, **per_stage[B]})
    if variant.train.teacher == "none" or name == "direct":
        assert all(s["train.distill_steps"] == "0" for s in per_stage.values())
    if VARIANTS[name].schedule == "reference" and variant.train.teacher != "none":
        assert per_stage == plan(VARIANTS["reference"], recipe, schedule)[1]  # only the settings change


def test_a_teacherless_stage_trains_its_distill_steps_as_merge_steps():
    recipe = get_recipe("tiny", {"train.merge_steps": "50", "train.distill_steps": "10"})
    sizes, reference = plan(VARIANTS["reference"], recipe, (4, 8))
    assert reference[4]["train.distill_steps"] == "0" and reference[4]["train.merge_steps"] == "50"  # B4: no teacher
    assert reference[8] == {"train.merge_steps": "50", "train.distill_steps": "10", "train.lr": "0.0002"}
    _, ar = plan(VARIANTS["teacher_ar"], recipe, (4, 8))  # the AR base teaches B4 too: it distils there
    assert ar[4]["train.distill_steps"] == "0" and _total(ar) == _total(reference) == 110
    _, direct = plan(VARIANTS["direct"], recipe, (4, 8))
    assert direct == {8: {"train.merge_steps": "110", "train.distill_steps": "0", "train.lr": "0.00025"}}
    with pytest.raises(ValueError, match="no stage between its first and last"):
        plan(VARIANTS["first_last"], recipe, (4, 8))


def test_the_decoding_variants_change_decoding_only():
    assert {n for n, v in VARIANTS.items() if v.decode_only} == {"no_correction", "confident_fallback", "no_sure_eos"}
    for name in ("no_correction", "confident_fallback", "no_sure_eos"):
        get_recipe("tiny", VARIANTS[name].overrides)  # valid decoding settings


def _items(n: int, p: float, rng: random.Random) -> dict[str, float]:
    return {f"b/{k}": float(rng.random() < p) for k in range(n)}


def test_verdicts_follow_the_paired_difference_and_its_noise():
    rng = random.Random(0)
    ref = [_items(600, 0.9, rng) for _ in range(3)]
    much_worse = [{k: (v if i % 3 else 0.0) for i, (k, v) in enumerate(r.items())} for r in ref]
    same = [dict(r) for r in ref]
    better = [{k: 1.0 for k in r} for r in ref]
    tpf = ([1.0] * 3, [1.0] * 3)
    steps = ([1210] * 3, [1210] * 3)
    held = compare("direct", ref, much_worse, tpf, steps)
    assert held.verdict == "held" and held.gain > 20 and held.seeds == 3 and held.n == 600
    assert compare("direct", ref, same, tpf, steps).verdict == "inside the noise"
    lost = compare("mask_noise", ref, better, tpf, steps)
    assert lost.verdict == "did not hold" and lost.gain < 0 and "did not hold" in lost.sentence()
    # two seeds that disagree: the spread over seeds, not the items' se, decides
    flip = [ref[0], ref[1]]
    other = [{k: 0.0 for k in ref[0]}, {k: 1.0 for k in ref[1]}]
    wide = compare("direct", flip, other, ([1.0] * 2, [1.0] * 2), ([1210] * 2, [1210] * 2))
    assert wide.verdict == "inside the noise" and wide.se > 40
    with pytest.raises(ValueError, match="missing"):
        compare("direct", [ref[0]], [{"b/0": 1.0}], ([1.0], [1.0]), ([1210], [1210]))
    # no step counts is not an equal budget: a report that lost them fails instead of giving verdicts
    with pytest.raises(ValueError, match="step counts for 0 and 0 seeds, scores for 3"):
        compare("direct", ref, much_worse, tpf, ([], []))
    # a variant that trained fewer steps than the reference (a lost per-stage budget) gets no verdict, however large
    # its difference: the claim is about one choice at one budget
    short = compare("direct", ref, much_worse, tpf, ([1210] * 3, [1210, 420, 1210]))
    assert short.gain == held.gain and not short.equal_budget and short.verdict == "no verdict: unequal budget"
    assert "trained 1210, 420, 1210 steps against the reference's 1210, 1210, 1210" in short.sentence()
    assert compare("direct", ref, much_worse, tpf, steps).verdict == "held"


def _forwards(nfe: list[int], tokens: int = 40) -> dict[str, tuple[int, int]]:
    return {str(i): (tokens, n) for i, n in enumerate(nfe)}


def test_a_lossless_setting_is_judged_by_its_paired_forwards():
    rng = random.Random(2)
    ref = [[rng.randint(6, 10) for _ in range(300)] for _ in range(2)]
    steps = ([7500] * 2, [7500] * 2)
    # the variant needs one more forward per item: the reference is faster by that share, well outside the noise
    slower = compare_speed("direct", [_forwards(r) for r in ref], [_forwards([n + 1 for n in r]) for r in ref], steps)
    expected = [100 * (sum(r) + len(r)) / sum(r) - 100 for r in ref]
    assert slower.gain == pytest.approx(sum(expected) / 2) and slower.verdict == "held" and slower.measure == "tpf"
    assert slower.tpf[0] == pytest.approx(sum(40 * 300 / sum(r) for r in ref) / 2) and slower.n == 300
    assert "TPF" in slower.sentence() and "% for the reference (300 paired items of the speed benchmark, 2 seeds)" \
        in slower.sentence()
    # exactly twice the forwards on every item: +100%, no noise; the mirror image loses by half
    double = compare_speed("direct", [_forwards(ref[0])], [_forwards([2 * n for n in ref[0]])], ([1], [1]))
    assert double.gain == pytest.approx(100.0) and double.se == pytest.approx(0.0, abs=1e-9)
    half = compare_speed("direct", [_forwards([2 * n for n in ref[0]])], [_forwards(ref[0])], ([1], [1]))
    assert half.gain == pytest.approx(-50.0) and half.verdict == "did not hold"
    # noise only: the variant's forwards shuffled among the items, the same total, inside the noise
    shuffled = [rng.sample(r, len(r)) for r in ref]
    same = compare_speed("direct", [_forwards(r) for r in ref], [_forwards(r) for r in shuffled], steps)
    assert same.gain == pytest.approx(0.0, abs=1e-9) and same.se > 0 and same.verdict == "inside the noise"
    # a few items a forward apart: a gain smaller than twice its error is no verdict either way
    few = compare_speed("direct", [_forwards(ref[0][:20])], [_forwards([n + (i == 0) for i, n in
                                                                         enumerate(ref[0][:20])])], ([1], [1]))
    assert 0 < few.gain < 2 * few.se and few.verdict == "inside the noise"
    with pytest.raises(ValueError, match="1 of the reference's 300 speed items are missing"):
        compare_speed("direct", [_forwards(ref[0])], [_forwards(ref[0][:299])], ([1], [1]))
    short = compare_speed("direct", [_forwards(r) for r in ref], [_forwards(r) for r in ref], ([7500] * 2, [7500, 1]))
    assert short.verdict == "no verdict: unequal budget"


def _eval(where, mode: str, decode: dict, items: dict, nfe: list[int], tpf: float) -> dict:
    """An evaluation as `tasks.evaluate` writes it: eval.json and the speed benchmark's samples."""
    (where / "samples").mkdir(parents=True)
    (where / "samples" / "shapes_extract.jsonl").write_text("".join(
        json.dumps({"doc_id": i, "decode": {"tokens": 40, "nfe": n, "edits": 0}}) + "\n" for i, n in enumerate(nfe)))
    scores = {b: sum(v.values()) / len(v) for b, v in items.items()}
    (where / "eval.json").write_text(json.dumps({"checkpoint": str(where), "mode": mode, "decode": decode,
                                                 "scores": scores, "items": items,
                                                 "speed": {"benchmark": "shapes_extract", "tpf": tpf}}))
    return {"setting": setting(decode), "threshold": decode["threshold"], "samples": str(where / "samples"),
            "scores": scores, "tpf": tpf}


def _opened_gate_run(root, name: str, nfe: list[int], own: list[float]) -> str:
    """A finished run's B32 as its opened gate left it: promoted at τ 0.9 (its own answers, per-item scores `own`,
    TPF 10), the faster of its two settings, over `draft` (the AR base's answers, `nfe` forwards per extract item)."""
    run = root / name
    ckpt = run / "B32"
    ckpt.mkdir(parents=True)
    (ckpt / "bard.json").write_text(json.dumps({"phases": [{"steps": 7500}], "history": [{"step_s": 2.0}]}))
    ar = {"shapes_extract": {str(i): 1.0 for i in range(len(nfe))}}
    base = _eval(run / "eval" / "AR", "ar", {"threshold": None}, ar, [40] * len(nfe), 1.0)
    draft = _eval(run / "eval" / "drafter", "speculative", {"engine": "speculative", "verifier": "base",
                                                             "threshold": 0.9}, ar, nfe, 40 * len(nfe) / sum(nfe))
    mine = {"shapes_extract": {str(i): v for i, v in enumerate(own)}}
    tau = _eval(run / "eval" / "tau-0.9", "diffusion", {"threshold": 0.9}, mine, [4] * len(own), 10.0)
    check = {"benchmark": "shapes_extract", "drop": 1.0 - tau["scores"]["shapes_extract"], "se": 0.0}
    (run / "report.json").write_text(json.dumps({"baseline": base, "stages": [
        {"stage": "B32", "block_size": 32, "checkpoint": str(ckpt), "decode": {"threshold": 0.9},
         "sweep": [tau, draft], "checks": [check], "tpf": 10.0}]}))
    return str(run)


def test_a_run_that_promoted_a_lossless_setting_is_compared_on_speed_and_on_its_own_answers(tmp_path):
    from bard_core.config import GateConfig
    from tasks.ablation_render import ablation_markdown
    from tasks.ablation_report import ablation_json, run_summary

    rng = random.Random(3)
    nfe = [rng.randint(6, 10) for _ in range(200)]
    policy = GateConfig(benchmarks=("shapes_extract",), min_tpf={32: 3.0})  # 3 points (the default), TPF 3
    runs = {"reference": _opened_gate_run(tmp_path, "reference-seed0", nfe, [1.0] * 200),
            "direct": _opened_gate_run(tmp_path, "direct-seed0", [n + 2 for n in nfe],
                                       [float(i % 4 > 0) for i in range(200)])}
    opened = run_summary(runs["direct"])  # as the run's opened gate chose: its own answers, 25 points down
    assert opened["setting"] == "τ=0.9" and opened["forwards"] is None and opened["max_drop"] == pytest.approx(0.25)
    reference, direct = (run_summary(runs[k], policy=policy) for k in ("reference", "direct"))
    # the reference's own answers pass the recipe's gate at τ 0.9 (TPF 10); the variant's lose 25 points: `draft`
    assert reference["setting"] == "τ=0.9" and reference["gate_passed"]
    assert direct["setting"] == "draft" and direct["forwards"]["7"] == (40, nfe[7] + 2) and direct["max_drop"] == 0
    assert direct["tpf"] == pytest.approx(8000 / (sum(nfe) + 400)) and direct["mean_score"] == 1.0  # the verifier's
    assert [(q["setting"], q["tpf"]) for q in direct["curve"]] == [("τ=0.9", 10.0)]  # its own answers, not the draft
    # with every setting failing the recipe's gate, the opened gate's pick stays, and the report says so
    strict = run_summary(runs["direct"], policy=GateConfig(benchmarks=("shapes_extract",), min_tpf={32: 99.0}))
    assert strict["setting"] == "τ=0.9" and strict["gate_passed"] is False
    reference = run_summary(_opened_gate_run(tmp_path, "reference-2", nfe, [1.0] * 199 + [0.0]), policy=policy)
    assert reference["setting"] == "τ=0.9"  # 0.5 points down: its own answers still pass, and are faster
    lossless = run_summary(_opened_gate_run(tmp_path, "reference-3", nfe, [float(i % 10 > 0) for i in range(200)]),
                           policy=policy)
    assert lossless["setting"] == "draft"
    result = ablation_json({"reference": [lossless], "direct": [direct]}, {"speed_taus": []})
    (test,) = result["claims"][0]["tests"]
    assert test["gain"] == 0.0 and test["verdict"] == "inside the noise"  # the same answers: no score can differ
    assert test["speed"]["verdict"] == "held" and test["speed"]["gain_percent"] == pytest.approx(
        100 * (sum(nfe) + 400) / sum(nfe) - 100)
    assert test["at_speed"]["gain"] == pytest.approx(15.0) and test["at_speed"]["verdict"] == "held"  # own answers
    text = ablation_markdown({**result, "settings": {"recipe": "tiny-long", "seeds": 1, "schedule": [32],
                                                     "total_steps": 7500, "speed_taus": []}})
    assert "The gate promoted `draft`" in text and test["speed"]["sentence"] in text
    assert "| `direct` | 0.9 | 10.00 |" in text  # the curve of its own answers is shown
    assert "`draft` |" in text and "where it promotes none" not in text and "## Per seed" not in text
    two = ablation_json({"reference": [lossless, reference], "direct": [direct, direct]}, {"speed_taus": []})
    text = ablation_markdown({**two, "settings": {"recipe": "tiny-long", "seeds": 2, "schedule": [32],
                                                  "total_steps": 7500, "speed_taus": []}})
    per_seed = text[text.index("## Per seed"):].splitlines()  # every seed's own row, as the means above are made of
    assert f"| `reference` | 0 | `draft` | {lossless['tpf']:.2f} | 1.000 | 0.000 |" in per_seed[6]
    assert per_seed[7].startswith(f"| `reference` | 1 | `τ=0.9` | 10.00 | {reference['mean_score']:.3f} | 0.005 |")
    assert per_seed[7].endswith("| - | 0.9: 0.995 @ 10.00 |")  # its own answers at τ 0.9: 199 of 200
    assert [line.split(" | ")[1] for line in per_seed[8:10]] == ["0", "1"]


def test_at_equal_speed_the_faster_side_stays_at_its_gate_point_and_the_slower_goes_as_fast():
    rng = random.Random(1)
    good, poor = _items(600, 0.95, rng), _items(600, 0.75, rng)
    # the reference: accurate and slow at its gate τ, as fast as the variant only at τ 0.5 and then poorer
    reference = [{"threshold": 0.9, "tpf": 1.2, "items": good}, {"threshold": 0.7, "tpf": 1.4, "items": good},
                 {"threshold": 0.5, "tpf": 1.75, "items": poor}]
    variant = [{"threshold": 0.9, "tpf": 1.7, "items": _items(600, 0.9, rng)},
               {"threshold": 0.5, "tpf": 2.5, "items": poor}]
    steps = ([1210], [1210])
    at_gate = compare("mask_noise", [good], [variant[0]["items"]], ([1.2], [1.7]), steps)
    same_speed = at_equal_speed("mask_noise", [reference], [variant], steps)
    assert same_speed.thresholds == ((0.5,), (0.9,)) and same_speed.tpf == (1.75, 1.7)
    assert at_gate.verdict == "held" and same_speed.verdict == "did not hold"  # the ranking turns at equal speed
    assert "at equal speed" in same_speed.sentence() and "TPF 1.75 at τ 0.5 vs 1.70 at τ 0.9" in same_speed.sentence()
    # the faster side may be either: the variant is slower, so it is the one taken at a lower τ
    swapped = at_equal_speed("mask_noise", [variant], [reference], steps)
    assert swapped.thresholds == ((0.9,), (0.5,)) and swapped.gain == pytest.approx(-same_speed.gain)
    # no setting of the slower side within 10% of the faster's TPF: no verdict, and the gap is said
    far = at_equal_speed("mask_noise", [reference[:2]], [variant], steps)
    assert far.verdict == "no verdict: no setting at the same speed" and far.speed_gap == pytest.approx(0.3 / 1.7)
    assert "the nearest speeds differ by 18%" in far.sentence()
    # per seed its own pair; a variant with fewer steps still gets no verdict
    two = at_equal_speed("mask_noise", [reference, reference], [variant, variant], ([1210] * 2, [1210, 420]))
    assert two.seeds == 2 and two.thresholds == ((0.5, 0.5), (0.9, 0.9)) and two.verdict == "no verdict: unequal budget"
    with pytest.raises(ValueError, match="1 seeds against the reference's 2"):
        at_equal_speed("mask_noise", [reference, reference], [variant], steps)
    # along the curve: the variant at a given τ, the reference at its point of the nearest TPF
    fast = at_equal_speed("mask_noise", [reference], [variant], steps, threshold=0.5)
    assert fast.thresholds == ((0.5,), (0.5,)) and fast.tpf == (1.75, 2.5) and fast.gain == 0.0
    assert fast.verdict == "no verdict: no setting at the same speed"  # 1.75 is 30% slower than 2.5
    with pytest.raises(ValueError, match="no point at τ 0.7"):
        at_equal_speed("mask_noise", [reference], [variant], steps, threshold=0.7)


def test_bard_ablate_dry_run_prints_every_run_and_refuses_bad_variants(capsys):
    from flows.cli import main

    assert main(["ablate", "--dry-run", "--variants", "direct,no_correction", "--seeds", "2"]) == 0
    runs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["variant"], r["seed"]) for r in runs] == [("reference", 0), ("direct", 0), ("no_correction", 0),
                                                          ("reference", 1), ("direct", 1), ("no_correction", 1)]
    assert runs[1]["block_sizes"] == [8] and runs[3]["overrides"]["train.seed"] == "1"
    assert runs[2]["overrides"]["decode.max_edits_per_position"] == "0"
    assert main(["ablate", "--dry-run", "--variants", "nope"]) == 2
    assert "unknown variants ['nope']" in capsys.readouterr().err
    assert main(["ablate", "--dry-run", "--variants", "first_last"]) == 2  # the quick schedule is B4 → B8
    assert "no stage between its first and last" in capsys.readouterr().err
    for bad, said in (("0.5,x", "comma-separated numbers"), ("0.5,1", "decoding thresholds lie in (0, 1)")):
        assert main(["ablate", "--dry-run", "--speed-taus", bad]) == 2
        assert said in capsys.readouterr().err


def test_speed_taus_default_per_size_and_can_be_switched_off():
    from flows.cli import build_parser
    from flows.cli_ablate import ablation_params

    def taus(*argv: str) -> list[float]:
        return ablation_params(build_parser().parse_args(["ablate", *argv])).speed_taus

    assert taus() == [0.5] and taus("--full") == [0.7, 0.5, 0.3]
    assert taus("--speed-taus", "0.3,0.8,0.3") == [0.8, 0.3] and taus("--full", "--speed-taus", "") == []


def test_a_finished_run_is_known_by_its_settings_and_a_bad_marker_means_run_again(tmp_path):
    from flows.ablation import FINISHED, AblationParams, fingerprint, finished, variant_runs

    params = AblationParams(variants=["no_correction"], root=str(tmp_path))
    (_, _, run), (_, _, other) = variant_runs(params)
    assert fingerprint(run) != fingerprint(other)  # the decoding override is part of it
    run_dir = tmp_path / run.run_name
    run_dir.mkdir()
    (run_dir / "report.json").write_text("{}")
    assert not finished(run)  # no marker
    for bad in ("", "{\"fingerprint\": ", "[1, 2]", json.dumps({"fingerprint": fingerprint(other)})):
        (run_dir / FINISHED).write_text(bad)
        assert not finished(run), bad
    (run_dir / FINISHED).write_text(json.dumps({"fingerprint": fingerprint(run)}))
    assert finished(run)
    (run_dir / "report.json").unlink()
    assert not finished(run)  # a marker without its report is not a finished run


def test_a_variant_that_would_be_the_reference_on_a_recipe_is_not_run_and_its_claim_is_said_untested(capsys):
    from bard_core.ablations import VARIANTS, as_reference
    from flows.cli import main
    from tasks.ablation_render import ablation_markdown

    long = (4, 8, 16, 32)
    found = {n: as_reference(v, "tiny-long", {}, long) for n, v in VARIANTS.items()}
    # tiny-long trains with mask noise, no prefix noise and no distill steps
    assert {n: why for n, why in found.items() if why} == {
        "teacher_ar": "no stage reads train.teacher=ar (no stage distils)",
        "teacher_none": "no stage reads train.teacher=none (no stage distils)",
        "mask_noise": "tiny-long already has noise.kind=mask", "no_prefix_noise": "tiny-long already has noise.prefix_prob=0"}
    assert not any(as_reference(v, "tiny", {}, long) for v in VARIANTS.values())  # every one changes the tiny recipe
    with_distill = {"train.stages": '{"8": {"distill_steps": 40}}'}  # one stage that distils: the teacher matters
    assert as_reference(VARIANTS["teacher_ar"], "tiny-long", with_distill, long) is None
    assert as_reference(VARIANTS["mask_noise"], "tiny-long", {"noise.kind": "mixed"}, long) is None

    assert main(["ablate", "--recipe", "tiny-long", "--full", "--dry-run", "--variants", "mask_noise,direct"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"variant": "mask_noise", "not_run": "tiny-long already has noise.kind=mask"}
    assert [(r["variant"], r["seed"]) for r in lines[1:]] == [(n, s) for s in range(3) for n in ("reference", "direct")]
    assert main(["ablate", "--recipe", "tiny-long", "--full", "--dry-run", "--variants", "mask_noise,teacher_ar"]) == 2
    err = capsys.readouterr().err
    assert "every variant asked for would train and decode as the reference" in err and len(err.splitlines()) == 1
    result = {"settings": {"recipe": "tiny-long", "seeds": 1, "schedule": [32], "total_steps": 7500, "speed_taus": [],
                           "not_run": {"mask_noise": found["mask_noise"]}}, "baseline": {"shapes_mcq": 0.9},
              "variants": [], "claims": []}
    assert ("Not run, so their claims are untested here — each would train and decode as the reference on `tiny-long`: "
            "`mask_noise` (tiny-long already has noise.kind=mask).") in ablation_markdown(result)
