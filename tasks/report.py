"""Stage-gate reports: what a person reads to see, in ten seconds, which stage passed, which failed, why.

Per gate: a Prefect markdown artifact (verdict, paired checks, the threshold sweep) and a table
artifact (one row per benchmark). Per run: ``report.md``, ``report.json`` (schema in the README) and
``tradeoff.png`` — mean gate accuracy against decode tokens/s for the AR base and every evaluated
setting of every stage, promoted settings marked — also published as a markdown artifact with the plot
inline.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path

from bard_core.gate import EvalReport, GateResult, select, setting

SCHEMA = 1


@dataclass
class StageOutcome:
    """One stage of a run: its gate verdict and every evaluation (one per threshold) it was judged on."""

    stage: str
    block_size: int | None
    checkpoint: str
    result: GateResult
    evaluations: list[EvalReport] = field(default_factory=list)


def _mean(scores: dict) -> float | None:
    values = [v for v in scores.values() if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else None


def _tok_s(report: EvalReport, batch: str | None = None) -> float | None:
    runs = report.speed.get("batch") or {}
    key = batch or max(runs, key=int, default=None)
    return runs[key]["tok_s"] if key in runs else None


def _chosen(outcome: StageOutcome) -> EvalReport | None:
    for e in outcome.evaluations:
        if e.decode == outcome.result.decode:
            return e
    return outcome.evaluations[0] if outcome.evaluations else None


def _worst(result: GateResult) -> str:
    drops = [c for c in result.checks if c.drop is not None]
    if not drops:
        return "-"
    c = max(drops, key=lambda c: c.drop)  # shown as stage − AR, like the scores table
    return f"{c.benchmark} {-100 * c.drop:+.1f} pt" + (f" ±{100 * c.se:.1f}" if c.se is not None else "")


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def entry_setting(entry: dict) -> str:
    """A `report_json` sweep entry's setting name (reports written before it was recorded: from its threshold)."""
    return entry.get("setting", setting({"threshold": entry.get("threshold")}))


def chosen_entry(stage: dict) -> dict:
    """The entry of a `report_json` stage's sweep with the decode setting its gate decided on."""
    name = setting(stage.get("decode") or {})
    return next((e for e in stage["sweep"] if entry_setting(e) == name), stage["sweep"][0] if stage["sweep"] else {})


def rejudge(report: dict, policy) -> dict:
    """`report` with each stage's setting the one `policy` (a recipe's own `GateConfig`, not the opened gates the
    chain ran under) promotes from the stage's sweep, its checks and TPF; ``gate_passed`` says whether any setting
    passed (one that none did keeps the opened gates' pick: the fastest)."""
    def evaluation(samples: str) -> EvalReport:
        return EvalReport(**json.loads((Path(samples).parent / "eval.json").read_text()))

    baseline = evaluation(report["baseline"]["samples"])
    for stage in report["stages"]:
        result = select([evaluation(e["samples"]) for e in stage["sweep"]], baseline, policy, stage["stage"],
                        stage["block_size"])
        stage["gate_passed"] = result.passed
        if result.passed:
            stage.update(decode=result.decode, tpf=result.tpf, checks=[dataclasses.asdict(c) for c in result.checks])
    return report


def report_json(recipe: str, baseline: EvalReport, outcomes: list[StageOutcome], extra: dict | None = None) -> dict:
    stages = []
    for o in outcomes:
        sweep = []
        for e in o.evaluations:
            verdict = next((s for s in o.result.sweep if s.get("setting") == setting(e.decode)), {})
            sweep.append({"setting": setting(e.decode), "threshold": e.threshold,
                          "passed": verdict.get("passed", o.result.passed),
                          "tpf": e.speed.get("tpf"), "tok_s": _tok_s(e), "tok_s_batch1": _tok_s(e, "1"),
                          "speedup": e.speed.get("speedup"), "scores": e.scores, "lossless": e.speed.get("lossless"),
                          "reasons": verdict.get("reasons", list(o.result.reasons)), "samples": e.samples_uri})
        stages.append({"stage": o.stage, "block_size": o.block_size, "checkpoint": o.checkpoint,
                       "passed": o.result.passed, "promoted_uri": o.result.promoted_uri,
                       "reasons": list(o.result.reasons), "decode": o.result.decode, "tpf": o.result.tpf,
                       "min_tpf": o.result.min_tpf, "checks": [dataclasses.asdict(c) for c in o.result.checks],
                       "sweep": sweep})
    return {"schema": SCHEMA, "recipe": recipe, "created": datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="seconds"), "passed": all(o.result.passed for o in outcomes),
            "promoted": [o.block_size for o in outcomes if o.result.passed],
            "benchmarks": list(baseline.scores),
            "baseline": {"checkpoint": baseline.checkpoint, "scores": baseline.scores, "metrics": baseline.metrics,
                         "speed": baseline.speed, "harness": baseline.harness, "samples": baseline.samples_uri},
            "stages": stages, **(extra or {})}


def report_markdown(recipe: str, baseline: EvalReport, outcomes: list[StageOutcome], plot: str | None = None) -> str:
    passed = [o for o in outcomes if o.result.passed]
    failed = [o for o in outcomes if not o.result.passed]
    speed_name = baseline.speed.get("benchmark", "speed benchmark")
    head = f"# Stage gates — recipe `{recipe}`: {len(passed)} of {len(outcomes)} promoted"
    head += f"; **{', '.join(o.stage for o in failed)} failed**" if failed else ""
    lines = [head, "", f"| stage | verdict | setting | TPF ({speed_name}) | tok/s b1 | tok/s bN | lossless b1 | worst drop vs AR "
                       "| why not |", "|---|---|---|---|---|---|---|---|---|",
             f"| AR | baseline | - | {_fmt(baseline.speed.get('tpf'), '.2f')} | {_fmt(_tok_s(baseline, '1'), '.0f')} "
             f"| {_fmt(_tok_s(baseline), '.0f')} | - | - | |"]
    for o in outcomes:
        e = _chosen(o)
        verdict = "✅ promoted" if o.result.passed else "❌ failed"
        lines.append(f"| {o.stage} | {verdict} | {setting(o.result.decode)} | "
                     f"{_fmt(o.result.tpf, '.2f')} (min {_fmt(o.result.min_tpf, '.2f')}) | "
                     f"{_fmt(_tok_s(e, '1') if e else None, '.0f')} | {_fmt(_tok_s(e) if e else None, '.0f')} | "
                     f"{_lossless_cell(_with_lossless(o))} | {_worst(o.result)} | {'<br>'.join(o.result.reasons[:4]) or ''} |")
    if any(e.speed.get("lossless") for o in outcomes for e in o.evaluations):
        lines += ["", "lossless b1: tokens/s at batch 1 of the lossless mode (blocks drafted by the stage, verified "
                      "by the AR base: the AR base's answers, so its scores), × the AR base, and the share of "
                      "answers identical to the AR base's (must be 100%)"]
    if any(setting(e.decode) == "spec" for o in outcomes for e in o.evaluations):
        lines += ["", "spec: the stage's own speculative mode (blocks drafted, verified by the stage's causal view: "
                      "its own AR-order greedy answers, gated like every setting; docs/decoding.md)"]
    if any(setting(e.decode) == "draft" for o in outcomes for e in o.evaluations):
        lines += ["", "draft: the stage as the AR base's drafter (blocks drafted by the stage, verified by the AR "
                      "base: the base's greedy answers; promoted, it decodes with the base beside it; docs/decoding.md)"]
    if plot:
        lines += ["", f"![accuracy vs tokens/s]({plot})"]
    names = list(baseline.scores)
    lines += ["", "## Scores (the gate's settings; drops paired on the same items)", "",
              "| benchmark | AR | " + " | ".join(o.stage for o in outcomes) + " |",
              "|---|---|" + "---|" * len(outcomes)]
    for name in names:
        cells = []
        for o in outcomes:
            c = next((c for c in o.result.checks if c.benchmark == name), None)
            cells.append("-" if c is None or c.score is None else
                         f"{c.score:.3f}{'' if c.passed else ' ❌'}" + (f" ({100 * -c.drop:+.1f})" if c.drop is not None
                                                                        else ""))
        lines.append(f"| {name} | {baseline.scores[name]:.3f} | " + " | ".join(cells) + " |")
    for o in outcomes:
        if len(o.evaluations) > 1:
            lines += ["", f"### {o.stage}: decode settings", "", "| setting | passed | TPF | tok/s | mean score |",
                      "|---|---|---|---|---|"]
            for e, s in zip(o.evaluations, o.result.sweep):
                lines.append(f"| {setting(e.decode)} | {'yes' if s['passed'] else 'no'} | "
                             f"{_fmt(e.speed.get('tpf'), '.2f')} | {_fmt(_tok_s(e), '.0f')} | {_fmt(_mean(e.scores))} |")
    return "\n".join(lines) + "\n"


def _with_lossless(outcome: StageOutcome) -> EvalReport | None:
    """The chosen evaluation, or the first of the sweep, that measured the lossless mode beside it (the spec
    setting does not: it is a lossless mode itself)."""
    return next((e for e in [_chosen(outcome), *outcome.evaluations] if e is not None and e.speed.get("lossless")),
                None)


def _lossless_cell(e: EvalReport | None) -> str:
    lossless = (e.speed.get("lossless") if e else None) or {}
    if not lossless:
        return "-"
    b1 = lossless["batch"]["1"]["tok_s"]
    return f"{b1:.0f} ({lossless['speedup'].get('1', 0):.2f}×, {100 * lossless['identical']:.0f}% identical)"


def tradeoff_png(path: Path, baseline: EvalReport, outcomes: list[StageOutcome]) -> Path:
    """Mean gate accuracy against decode tokens/s (batch N) for AR and every stage's threshold sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.scatter([_tok_s(baseline) or 0], [_mean(baseline.scores)], marker="s", s=70, color="black", label="AR", zorder=3)
    for o in outcomes:
        points = [(_tok_s(e) or 0, _mean(e.scores), e) for e in o.evaluations]
        line = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=o.stage)[0]
        for k, (x, y, e) in enumerate(points):  # labels alternate above and below: close points stay legible
            ax.annotate(setting(e.decode), (x, y), fontsize=7, xytext=(4, 5 if k % 2 == 0 else -11),
                        textcoords="offset points")
            if o.result.passed and e.decode == o.result.decode:
                ax.scatter([x], [y], s=220, facecolors="none", edgecolors=line.get_color(), linewidths=2, zorder=4)
    lossless = [(e.speed["lossless"]["batch"], o.stage) for o in outcomes for e in [_with_lossless(o)]
                if e is not None and e.speed.get("lossless")]
    if lossless:  # the AR base's answers (so its score), at the speed of drafting with each stage
        xs = [max(batch.items(), key=lambda kv: int(kv[0]))[1]["tok_s"] for batch, _ in lossless]
        ax.plot(xs, [_mean(baseline.scores)] * len(xs), marker="D", ls=":", color="gray", label="lossless")
        for x, (_, stage) in zip(xs, lossless):
            ax.annotate(stage, (x, _mean(baseline.scores)), fontsize=7, xytext=(4, -11), textcoords="offset points")
    ax.set_xlabel(f"tokens/s on {baseline.speed.get('benchmark', '?')} (batch N, same engine)")
    ax.set_ylabel("mean gate score")
    ax.set_title("accuracy vs decode speed (circled: promoted)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(out: str | Path, recipe: str, baseline: EvalReport, outcomes: list[StageOutcome],
                 extra: dict | None = None) -> dict:
    """report.md, report.json and tradeoff.png under `out`; returns their paths and the markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = tradeoff_png(out / "tradeoff.png", baseline, outcomes)
    markdown = report_markdown(recipe, baseline, outcomes, plot="tradeoff.png")
    (out / "report.md").write_text(markdown)
    (out / "report.json").write_text(json.dumps(report_json(recipe, baseline, outcomes, extra), indent=1,
                                                default=str))
    return {"report_md": str(out / "report.md"), "report_json": str(out / "report.json"), "tradeoff": str(png),
            "markdown": markdown}


def publish_gate(outcome: StageOutcome, baseline: EvalReport) -> None:
    """The gate's Prefect artifacts: a markdown verdict and a table of its checks."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = f"gate-{outcome.stage.lower()}"
    body = report_markdown("", baseline, [outcome]).split("\n", 1)[1]
    verdict = "PASSED" if outcome.result.passed else "FAILED"
    create_markdown_artifact(f"# Gate {outcome.stage}: {verdict}\n{body}", key=key,
                             description=f"stage gate {outcome.stage}: {verdict}")
    rows = [{"benchmark": c.benchmark, "score": c.score, "baseline": c.baseline, "drop": c.drop, "se": c.se,
             "n": c.n, "tolerance": c.tolerance, "passed": c.passed, "reason": c.reason or ""}
            for c in outcome.result.checks]
    rows.append({"benchmark": f"TPF {baseline.speed.get('benchmark', '')}", "score": outcome.result.tpf,
                 "baseline": outcome.result.min_tpf, "drop": None, "se": None, "n": None, "tolerance": None,
                 "passed": outcome.result.min_tpf is None or (outcome.result.tpf or 0) >= outcome.result.min_tpf,
                 "reason": ""})
    create_table_artifact(rows, key=f"{key}-checks", description=f"gate {outcome.stage}: paired checks")


def publish_report(paths: dict) -> None:
    """The run report as a markdown artifact, the trade-off plot inline (a data URI renders in the UI)."""
    from prefect.artifacts import create_markdown_artifact

    png = base64.b64encode(Path(paths["tradeoff"]).read_bytes()).decode()
    markdown = paths["markdown"].replace("(tradeoff.png)", f"(data:image/png;base64,{png})")
    create_markdown_artifact(markdown, key="stage-gate-report", description="stage gates: verdicts, scores, speed")
