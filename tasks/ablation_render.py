"""The ablation report's files and Prefect artifacts, from `tasks.ablation_report.ablation_json`: ``ablation.md``
(claims, variants, per seed when there are several, the speed-accuracy table), ``ablation.json`` and
``ablation.png`` (mean score against TPF, bars: spread over seeds).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from tasks.ablation_report import LOSSLESS, ablation_json


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
    if s.get("not_run"):
        lines[-2:-2] = [f"Not run, so their claims are untested here — each would train and decode as the reference on "
                        f"`{s['recipe']}`: " + "; ".join(f"`{n}` ({why})" for n, why in s["not_run"].items()) + ".", ""]
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
    if s["seeds"] > 1:
        lines += _per_seed(result)
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


def _per_seed(result: dict) -> list[str]:
    """One row per variant and seed: what the means over seeds above are made of."""
    lines = ["", "## Per seed", "", "Each final stage per training seed (`train.seed`: data order and noise): at the "
             "setting its gate promotes, and its own answers at each τ measured (mean score @ TPF).", "",
             "| variant | seed | setting | TPF | mean | max drop vs AR | × AR b1 | own answers: τ mean @ TPF |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["variants"]:
        for q in r.get("per_seed", []):
            curve = "; ".join(f"{c['threshold']:g}: {c['mean_score']:.3f} @ {c['tpf']:.2f}" for c in q["curve"])
            lines.append(f"| `{r['variant']}` | {q['seed']} | `{q['setting']}` | {q['tpf']:.2f} | {q['mean_score']:.3f} "
                         f"| {q['max_drop']:.3f} | {_x(q['speedup_batch1'], '.2f')} | {curve or '-'} |")
    return lines


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
