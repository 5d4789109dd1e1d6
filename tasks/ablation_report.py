"""The ablation report: per variant (over seeds) every shapes score of the final stage, its worst paired drop
against the AR base, TPF and tokens/s on the speed benchmark, the tokens correction decoding replaced, training
steps and their seconds (the stages' recorded step and data time, Ray's start excluded, whether this run trained
a stage or found it cached), and the final stage at more decoding thresholds when the ablation measured them;
per claim a plain sentence (`bard_core.ablations.Comparison`), at the gate's τ and at equal speed. Writes
``ablation.md``, ``ablation.json`` and ``ablation.png`` (mean score against TPF, bars: spread over seeds) and
publishes them as Prefect artifacts.
"""

from __future__ import annotations

import base64
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


def _x(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def ablation_markdown(result: dict, plot: str | None = None) -> str:
    s = result["settings"]
    names = list(result["baseline"])
    short = [n.removeprefix("shapes_") for n in names]
    lines = [f"# Ablation — recipe `{s['recipe']}`, {s['seeds']} seed{'s' if s['seeds'] != 1 else ''}, "
             f"schedule {s['schedule']}, {s['total_steps']} training steps per variant", "",
             "Every variant: the same curated data, the same total steps, the same evaluation (paired items against "
             "the same AR base, the gate's τ). Scores are the final stage's; ± is the spread (sd) over seeds.", "",
             "## Claims", ""]
    if s.get("older_runs"):
        lines[-2:-2] = [f"Trained by other code or settings than this report's (`--report-only` reports them as they are; "
                        f"`bard ablate` without it trains them again): {', '.join(s['older_runs'])}.", ""]
    if s["seeds"] == 1:  # docs/ablation.md, "Our departures": what one seed can and cannot say
        lines[-2:-2] = ["One seed: each claim's ± is the paired items' standard error. A variant that trains differently "
                        "also differs from the reference by one training seed's luck, which one seed cannot measure "
                        "(`--seeds 3`); a decoding-only variant decodes the reference's own weights, so for it the "
                        "items' error is the whole noise.", ""]
    draft = sorted({r["setting"] for r in result["variants"] if r["setting"] in LOSSLESS})
    if draft:  # docs/ablation.md, "A lossless setting is judged on speed"
        lines[-2:-2] = [f"The gate promoted `{'`/`'.join(draft)}`: answers verified by the AR model, so the scores at "
                        "the gate are the verifier's and no claim can differ in them; such a claim is judged on speed "
                        "(the second line) and on the stages' own answers at equal speed (the third).", ""]
    for c in result["claims"]:
        lines.append(f"- *{c['statement']}*")
        for t in c["tests"]:
            lines.append(f"  - {t['sentence']}")
            if "speed" in t:
                lines.append(f"    - {t['speed']['sentence']}")
            if "at_speed" in t:
                lines.append(f"    - {t['at_speed']['sentence']}")
    lines += ["", "## Variants", "",
              "| variant | schedule | steps | train s | " + " | ".join(short) + " | mean | max drop vs AR | TPF | "
              "tok/s b1 | × AR b1 | edits |", "|---|---|---|---|" + "---|" * len(names) + "---|---|---|---|---|---|",
              "| AR base | - | - | - | " + " | ".join(f"{result['baseline'][n]:.3f}" for n in names)
              + f" | {sum(result['baseline'].values()) / len(names):.3f} | - | 1.00 | - | 1.00 | - |"]
    for r in result["variants"]:
        def pm(key: str, spec: str, r: dict = r) -> str:  # mean ± the spread over seeds
            return _x(r[key], spec) + (f" ± {r[key + '_sd']:{spec}}" if r[key + "_sd"] is not None else "")

        lines.append(f"| `{r['variant']}` | {'→'.join(map(str, r['schedule']))} | {r['steps'][0]} | "
                     f"{_x(r['train_seconds'], '.0f')} | " + " | ".join(_x(r["scores"][n], ".3f") for n in names)
                     + f" | {pm('mean_score', '.3f')} | {pm('max_drop', '.3f')} | {pm('tpf', '.2f')} `{r['setting']}` | "
                     f"{_x(r['tok_s_batch1'], '.0f')} | {_x(r['speedup_batch1'], '.2f')} | {_x(r['edits'], '.0f')} |")
    failed = [r["variant"] for r in result["variants"] if r.get("gate_failed")]
    lines += ["", "Each final stage at the setting the recipe's own gate promotes (the runs' gates were opened so that "
              "every stage trains)" + (f"; where it promotes none ({', '.join(f'`{v}`' for v in failed)}), its "
                                       "fastest setting" if failed else "") + ".",
              "", "`edits`: tokens the correction step replaced in the final stage's answers to the whole suite "
              "(mean over seeds).", "",
              "Variants: " + "; ".join(f"`{r['variant']}`: {r['what']}" for r in result["variants"])]
    if s.get("speed_taus") or any("speed" in t for c in result["claims"] for t in c["tests"]):
        # docs/ablation.md, "At equal speed"; with a lossless promoted setting the curve is the stages' own answers
        lines += ["", "## Speed and accuracy per decoding threshold", "",
                  "Each variant's final stage at the gate's τ (first; the highest τ when the gate promoted a lossless "
                  "setting) and at the ablation's `speed_taus`; a claim's "
                  "comparison at equal speed keeps the faster side at its gate's τ and takes the slower side at "
                  "the τ of the nearest TPF.", "",
                  "| variant | τ | TPF | " + " | ".join(short) + " | mean |", "|---|---|---|" + "---|" * len(names) + "---|"]
        for r in result["variants"]:
            for q in r["curve"]:
                lines.append(f"| `{r['variant']}` | {q['threshold']:g} | {q['tpf']:.2f} | "
                             + " | ".join(_x(q["scores"].get(n), ".3f") for n in names) + f" | {q['mean_score']:.3f} |")
        tests = [t for c in result["claims"] for t in c["tests"] if t.get("along_the_curve")]
        taus = sorted({q["threshold"] for t in tests for q in t["along_the_curve"]}, reverse=True)
        if tests:
            lines += ["", "Reference − variant at equal speed along the curve: the variant at each τ, the reference at "
                      "its τ of the nearest TPF; points of mean score ± their standard error (reference's τ, TPF "
                      "reference / variant; *: the speeds differ by more than 10%, no verdict):", "",
                      "| variant | " + " | ".join(f"τ {t:g}" for t in taus) + " |", "|---|" + "---|" * len(taus)]
            for t in tests:
                cells = {q["threshold"]: f"{q['gain']:+.1f} ± {q['se']:.1f} (τ "
                                         f"{'/'.join(dict.fromkeys(f'{x:g}' for x in q['reference_thresholds']))}: "
                                         f"{q['tpf_reference']:.2f} / {q['tpf_variant']:.2f})"
                                         + ("*" if q["verdict"].endswith("same speed") else "")
                         for q in t["along_the_curve"]}
                lines.append(f"| `{t['variant']}` | " + " | ".join(cells.get(x, "-") for x in taus) + " |")
    if plot:
        lines += ["", f"![mean score against tokens per forward]({plot})"]
    return "\n".join(lines) + "\n"


def ablation_png(path: Path, result: dict) -> Path:
    """Mean score of the final stage against its TPF per variant, bars the spread over seeds; a line through
    its other decoding thresholds when it has them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    base = result["baseline"]
    ax.axhline(sum(base.values()) / len(base), color="black", lw=1, ls="--", label="AR base")
    for r in result["variants"]:
        bars = ax.errorbar([r["tpf"]], [r["mean_score"]], xerr=[r["tpf_sd"] or 0], yerr=[r["mean_score_sd"] or 0],
                           fmt="s" if r["variant"] == "reference" else "o", capsize=3, label=r["variant"])
        if len(r["curve"]) > 1:  # the other thresholds: the variant's speed-accuracy curve
            line = sorted(r["curve"], key=lambda q: q["tpf"])
            ax.plot([q["tpf"] for q in line], [q["mean_score"] for q in line], lw=1, alpha=0.7,
                    color=bars.lines[0].get_color())
    ax.set_xlabel(f"tokens per forward on the speed benchmark (final stage, B{result['settings']['schedule'][-1]})")
    ax.set_ylabel("mean score over the suite")
    ax.set_title("ablation: accuracy and parallelism per variant")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_ablation(out: str | Path, runs: dict[str, list[dict]], settings: dict) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = ablation_json(runs, settings)
    png = ablation_png(out / "ablation.png", result)
    markdown = ablation_markdown(result, plot="ablation.png")
    (out / "ablation.md").write_text(markdown)
    (out / "ablation.json").write_text(json.dumps(result, indent=1))
    return {"ablation_md": str(out / "ablation.md"), "ablation_json": str(out / "ablation.json"), "plot": str(png),
            "markdown": markdown, "result": result}


def publish_ablation(paths: dict) -> None:
    """The report as a markdown artifact (the plot inline) and the variants as a table artifact."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    png = base64.b64encode(Path(paths["plot"]).read_bytes()).decode()
    create_markdown_artifact(paths["markdown"].replace("(ablation.png)", f"(data:image/png;base64,{png})"),
                             key="ablation-report", description="ablation: claims, variants, plot")
    rows = [{k: r[k] for k in ("variant", "claim", "seeds", "mean_score", "mean_score_sd", "max_drop", "tpf",
                               "tok_s_batch1", "train_seconds")} for r in paths["result"]["variants"]]
    create_table_artifact(rows, key="ablation-variants", description="ablation: one row per variant")
