"""The ablation report's content: per variant (over seeds) every shapes score of the final stage, its worst paired
drop against the AR base, TPF and tokens/s on the speed benchmark, the tokens correction decoding replaced, training
steps and their seconds (the stages' recorded step and data time, Ray's start excluded, whether this run trained
a stage or found it cached), and the final stage at more decoding thresholds when the ablation measured them;
per claim a plain sentence (`bard_core.ablations.Comparison`), at the gate's τ and at equal speed. Its files and
Prefect artifacts (``ablation.md``, ``ablation.json``, ``ablation.png``): `tasks/ablation_render.py`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from bard_core.ablations import CLAIMS, VARIANTS, at_equal_speed, compare, compare_speed
from bard_core.gate import setting
from tasks.report import chosen_entry, entry_setting, rejudge

SCHEMA = 1
LOSSLESS = ("spec", "draft")  # settings whose answers are the verifier's (bard_core.gate.setting)


def _point(eval_json: Path) -> dict:
    """One decoding setting of a final stage: its TPF on the speed benchmark, scores and per-item results."""
    e = json.loads(eval_json.read_text())
    return {"threshold": e["decode"]["threshold"], "setting": setting(e["decode"]), "tpf": e["speed"]["tpf"],
            "scores": e["scores"], "mean_score": sum(e["scores"].values()) / len(e["scores"]),
            "items": {f"{b}/{k}": v for b, values in e["items"].items() for k, v in values.items()}}


def _forwards(eval_json: Path) -> dict[str, tuple[int, int]]:
    """Per item of the speed benchmark: (tokens, forwards) as decoded (the samples beside `eval_json`)."""
    bench = json.loads(eval_json.read_text())["speed"]["benchmark"]
    rows = [json.loads(line) for line in (eval_json.parent / "samples" / f"{bench}.jsonl").read_text().splitlines()]
    return {str(r["doc_id"]): (r["decode"]["tokens"], r["decode"]["nfe"]) for r in rows}


def run_summary(run_dir: str | Path, speed_taus: list[float] | tuple = (), policy=None) -> dict:
    """One pipeline run of a variant: its final stage's scores, items, drops and speed; its training cost; its
    `curve`: the final stage's own answers at the gate's thresholds (the chosen one first) and at `speed_taus`
    (``speed/tau-X``, `flows.ablation.speed_points`), fastest last. When the gate chose a lossless setting
    (``spec``/``draft``), the curve starts at the gate's highest threshold and `forwards` holds that setting's
    per-item speed. `policy`: the recipe's own `GateConfig` — the runs' gates were opened, so that every stage is
    trained, and promoted each stage's fastest setting; the summary takes the setting the recipe's gate promotes
    (`tasks.report.rejudge`; where none passes, still the fastest: ``gate_passed`` False)."""
    report = json.loads((Path(run_dir) / "report.json").read_text())
    if not report["stages"]:
        raise ValueError(f"{run_dir}: the run evaluated no stage")
    if policy is not None:
        report = rejudge(report, policy)
    final = report["stages"][-1]
    chosen = chosen_entry(final)
    lossless = entry_setting(chosen) in LOSSLESS
    top = _point(Path(chosen["samples"]).parent / "eval.json")
    own = [_point(Path(e["samples"]).parent / "eval.json") for e in final["sweep"]
           if entry_setting(e) not in LOSSLESS and e.get("threshold") is not None and e["samples"] != chosen["samples"]]
    more = [Path(run_dir) / "speed" / f"tau-{t:g}" / "eval.json" for t in speed_taus
            if t not in {q["threshold"] for q in own + ([] if lossless else [top])}]
    missing = [str(f.parent) for f in more if not f.exists()]
    if missing:
        raise ValueError(f"{run_dir}: the final stage is not evaluated at {', '.join(missing)}")
    own = sorted(own, key=lambda q: -q["threshold"])
    first = own[:1] if lossless else [top]
    rest = own[1:] if lossless else own
    curve = first + sorted(rest + [_point(f) for f in more], key=lambda q: q["tpf"])
    forwards = _forwards(Path(chosen["samples"]).parent / "eval.json") if lossless else None
    items = top["items"]
    steps, seconds = 0, 0.0
    for stage in report["stages"]:  # what training the variant took, whether this run trained it or found it cached
        meta = json.loads((Path(stage["checkpoint"]) / "bard.json").read_text())
        steps += sum(p["steps"] for p in meta["phases"])
        seconds += sum(h.get("step_s", 0.0) + h.get("data_s", 0.0) for h in meta["history"])
    checks = [c for c in final["checks"] if c["drop"] is not None]
    worst = max(checks, key=lambda c: c["drop"])
    every = [c["drop"] for s in report["stages"] for c in s["checks"] if c["drop"] is not None]
    speedup = chosen.get("speedup") or {}
    edits = sum(json.loads(line)["decode"]["edits"] for f in sorted(Path(chosen["samples"]).glob("*.jsonl"))
                for line in f.read_text().splitlines())  # what correction decoding changed, over the whole suite
    return {"run": str(run_dir), "schedule": [s["block_size"] for s in report["stages"]],
            "final_block_size": final["block_size"], "scores": chosen["scores"],
            "mean_score": sum(chosen["scores"].values()) / len(chosen["scores"]), "items": items,
            "max_drop": worst["drop"], "max_drop_se": worst["se"], "worst": worst["benchmark"],
            "max_drop_any_stage": max(every), "tpf": final["tpf"], "tok_s_batch1": chosen.get("tok_s_batch1"),
            "tok_s": chosen.get("tok_s"), "speedup_batch1": speedup.get("1"),
            "train_seconds": seconds, "steps": steps, "edits": edits, "curve": curve,
            "setting": entry_setting(chosen), "forwards": forwards, "gate_passed": final.get("gate_passed"),
            "baseline": report["baseline"]["scores"]}


def _mean_sd(values: list) -> tuple[float | None, float | None]:
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None)


def ablation_json(runs: dict[str, list[dict]], settings: dict) -> dict:
    """`runs`: variant → its `run_summary` per seed (the reference's first, in seed order)."""
    rows = []
    for name, per_seed in runs.items():
        row = {"variant": name, "claim": VARIANTS[name].claim, "what": VARIANTS[name].what, "seeds": len(per_seed),
               "schedule": per_seed[0]["schedule"], "steps": [r["steps"] for r in per_seed]}
        for key in ("mean_score", "max_drop", "max_drop_any_stage", "tpf", "tok_s_batch1", "tok_s", "speedup_batch1",
                    "train_seconds", "edits"):
            row[key], row[f"{key}_sd"] = _mean_sd([r[key] for r in per_seed])
        row["scores"] = {b: _mean_sd([r["scores"][b] for r in per_seed])[0] for b in per_seed[0]["scores"]}
        row["curve"] = _curve(per_seed)
        row["runs"] = [r["run"] for r in per_seed]
        row["per_seed"] = [{"seed": i, "setting": r["setting"], "tpf": r["tpf"], "mean_score": r["mean_score"],
                            "max_drop": r["max_drop"], "speedup_batch1": r["speedup_batch1"], "steps": r["steps"],
                            "curve": [{k: q[k] for k in ("threshold", "tpf", "mean_score")} for q in r["curve"]]}
                           for i, r in enumerate(per_seed)]
        row["setting"] = per_seed[0]["setting"]
        row["gate_failed"] = any(r.get("gate_passed") is False for r in per_seed)
        rows.append(row)
    reference = runs["reference"]
    comparisons = []
    for name, per_seed in runs.items():
        if name == "reference":
            continue
        c = compare(name, [r["items"] for r in reference], [r["items"] for r in per_seed],
                    ([r["tpf"] for r in reference], [r["tpf"] for r in per_seed]),
                    ([r["steps"] for r in reference], [r["steps"] for r in per_seed]))
        comparisons.append({"claim": c.claim, "variant": name, "gain": c.gain, "se": c.se, "seeds": c.seeds, "n": c.n,
                            "tpf_reference": c.tpf[0], "tpf_variant": c.tpf[1], "equal_budget": c.equal_budget,
                            "verdict": c.verdict,
                            "sentence": c.sentence()})
        lossless = all(r["forwards"] is not None for r in reference + per_seed)
        if lossless:  # the scores at the promoted setting are the verifier's on both sides: judge the speed
            v = compare_speed(name, [r["forwards"] for r in reference], [r["forwards"] for r in per_seed],
                              ([r["steps"] for r in reference], [r["steps"] for r in per_seed]))
            comparisons[-1]["speed"] = {"gain_percent": v.gain, "se": v.se, "n": v.n, "tpf_reference": v.tpf[0],
                                        "tpf_variant": v.tpf[1], "verdict": v.verdict, "sentence": v.sentence()}
        if (settings.get("speed_taus") or lossless) and all(r["curve"] for r in reference + per_seed):
            m = at_equal_speed(name, [r["curve"] for r in reference], [r["curve"] for r in per_seed],
                               ([r["steps"] for r in reference], [r["steps"] for r in per_seed]))
            comparisons[-1]["at_speed"] = {"gain": m.gain, "se": m.se, "tpf_reference": m.tpf[0],
                                           "tpf_variant": m.tpf[1], "thresholds": m.thresholds,
                                           "speed_gap": m.speed_gap, "verdict": m.verdict, "sentence": m.sentence()}
            comparisons[-1]["along_the_curve"] = _along_the_curve(name, reference, per_seed)
    claims = []
    for key, claim in CLAIMS.items():
        tests = [c for c in comparisons if c["claim"] == key]
        if tests:
            claims.append({"claim": key, "statement": claim.statement, "tests": tests})
    return {"schema": SCHEMA, "settings": settings, "baseline": reference[0]["baseline"], "variants": rows,
            "claims": claims}


def _along_the_curve(name: str, reference: list[dict], per_seed: list[dict]) -> list[dict]:
    """At each decoding threshold the variant measured in every seed, reference − variant at equal speed
    (`at_equal_speed` with that threshold: the reference at its point of the nearest TPF)."""
    steps = ([r["steps"] for r in reference], [r["steps"] for r in per_seed])
    shared = set.intersection(*({q["threshold"] for q in r["curve"]} for r in per_seed))
    out = []
    for t in sorted(shared, reverse=True):
        c = at_equal_speed(name, [r["curve"] for r in reference], [r["curve"] for r in per_seed], steps, t)
        out.append({"threshold": t, "reference_thresholds": c.thresholds[0], "gain": c.gain, "se": c.se,
                    "tpf_reference": c.tpf[0], "tpf_variant": c.tpf[1], "speed_gap": c.speed_gap,
                    "verdict": c.verdict})
    return out


def _curve(per_seed: list[dict]) -> list[dict]:
    """A variant's final stage per decoding threshold, means over seeds (the gate's first, then fastest last)."""
    out: dict[float, list[dict]] = {}
    for run in per_seed:
        for q in run["curve"]:
            out.setdefault(q["threshold"], []).append(q)
    return [{"threshold": t, "tpf": _mean_sd([q["tpf"] for q in qs])[0],
             "mean_score": _mean_sd([q["mean_score"] for q in qs])[0],
             "scores": {b: _mean_sd([q["scores"][b] for q in qs])[0] for b in qs[0]["scores"]}}
            for t, qs in out.items()]
