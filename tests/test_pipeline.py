"""The pipeline flow end to end on a minimal recipe: real Prefect server, real local Ray, real lm-eval."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import SHORT, flow_run_logs

pytestmark = pytest.mark.slow

MINIMAL = {**SHORT, "gate.limit": "4", "gate.thresholds": "[0.9]", "gate.speed_items": "2",
           "gate.default_tolerance": "1", "gate.min_tpf": '{"4": 0.5, "8": 0.5}'}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _params(world_dir, root, run_name, **kw):
    from flows.pipeline import PipelineParams

    return PipelineParams(sources={"llava_ov": str(world_dir / "sources/llava_ov"),
                                   "finevision": str(world_dir / "sources/finevision")},
                          include_paths=[str(world_dir / "benchmarks")], block_sizes=[4, 8], overrides=MINIMAL,
                          root=str(root), run_name=run_name, registry=str(root / "registry"), **kw)


@pytest.fixture(scope="module")
def first_run(prefect_server, local_ray, world_dir, tmp_path_factory):
    from flows.pipeline import pipeline_flow

    root = tmp_path_factory.mktemp("pipeline")
    return pipeline_flow(_params(world_dir, root, "first"), return_state=True), root


def test_the_pipeline_chains_curation_stages_gates_and_promotions(first_run):
    from tasks import registry

    state, root = first_run
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["promoted"] == [4, 8] and summary["run"] == "first"
    report = json.loads((root / "first" / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["B4", "B8"] and report["passed"]
    assert {"world", "curate", "baseline_eval", "B4_train", "B4_eval", "B8_train", "B8_eval", "total"} <= \
        set(report["timing"])
    history = registry.read(root / "registry", "tiny")["history"]
    assert [e["stage"] for e in history] == ["B4", "B8"] and all(e["run"] == "first" for e in history)
    b8 = json.loads((Path(report["stages"][1]["checkpoint"]) / "bard.json").read_text())
    b4 = report["stages"][0]["checkpoint"]
    assert b8["parent"] == b8["teacher"] == b4  # the chain: B8 starts from B4 and distils from it
    assert Path(b4).parent == root / "cache" / "stages"  # checkpoints are cached by content, outside the run

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:  # each stage's progress artifact, complete
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[state.state_details.flow_run_id])))
    progress = {a.key: a.data for a in artifacts if a.type == "progress"}
    assert progress == {"train-b4": 100.0, "train-b8": 100.0}
    logs = "\n".join(flow_run_logs(state))  # and in the run's logs, a line a minute and a closing one per stage
    for stage, ckpt in ((s["stage"], s["checkpoint"]) for s in report["stages"]):
        steps = json.loads((Path(ckpt) / "bard.json").read_text())["total_steps"]
        assert re.search(rf"^{stage}: step \d+/{steps} \((merge|distill)\), loss \d+\.\d+", logs, re.M), logs
        assert re.search(rf"^{stage}: trained steps \d+–{steps} of {steps} in \d+ (s|min)$", logs, re.M), logs


def test_the_stage_budget_summary_reads_the_chain_report(first_run, capsys):
    # benchmarks/stage_budget.py's figures come from the pipeline's own report: the worst drop over every
    # stage, the final stage's TPF and its speed-ups over the AR base measured beside it
    from benchmarks.chain import annotate
    from benchmarks.stage_budget import chain_summary, print_table

    _, root = first_run
    report = annotate(json.loads((root / "first" / "report.json").read_text()))
    names = report["benchmarks"]
    batch = max(int(k) for k in report["baseline"]["speed"]["batch"])
    summary = chain_summary(report, names, 1.0, batch)
    assert summary["final_block_size"] == 8 and summary["every_within"]
    drops = [c["drop"] for s in report["stages"] for c in s["checks"] if c["benchmark"] in names]
    assert summary["max_drop"] == max(drops)
    assert summary["train_seconds"] == pytest.approx(report["timing"]["B4_train"] + report["timing"]["B8_train"])
    recorded = [json.loads((Path(s["checkpoint"]) / "bard.json").read_text())["history"] for s in report["stages"]]
    assert summary["step_seconds"] == pytest.approx(sum(h["step_s"] + h["data_s"] for r in recorded for h in r))
    assert 0 < summary["step_seconds"] < summary["train_seconds"]  # the steps, without Ray Train's start and saves
    from tasks.report import chosen_entry

    b8 = report["stages"][1]  # the figures are the chosen setting's (spec or a threshold), not the sweep's first
    eval_json = json.loads((Path(chosen_entry(b8)["samples"]).parent / "eval.json").read_text())
    ar, own = eval_json["speed"]["ar"], eval_json["speed"]["batch"]
    assert summary["final_tpf_extract"] == b8["tpf"] > 0
    assert summary["speedup_batch1"] == pytest.approx(own["1"]["tok_s"] / ar["1"]["tok_s"])
    assert summary[f"speedup_batch{batch}"] == pytest.approx(own[str(batch)]["tok_s"] / ar[str(batch)]["tok_s"])
    assert not chain_summary(report, names, min(drops) - 1e-9, batch)["every_within"]
    print_table(report, summary, names, batch, [{"set": {"train.long_share": "0"}, **summary}], None)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:5]] == ["AR", "B4", "B8", "abl"]
    # each row re-judged with a recipe's own gate: the opened gates' pick where it passes, a mark where none does
    import copy

    from bard_core.config import GateConfig
    from bard_core.gate import setting
    from tasks.report import rejudge

    lenient = rejudge(copy.deepcopy(report), GateConfig(default_tolerance=1.0, min_tpf={}))
    assert [s["decode"] for s in lenient["stages"]] == [s["decode"] for s in report["stages"]]
    assert all(s["gate_passed"] for s in lenient["stages"])
    strict = rejudge(copy.deepcopy(report), GateConfig(default_tolerance=1.0, min_tpf={4: 99, 8: 99}))
    assert not any(s["gate_passed"] for s in strict["stages"])
    print_table(strict, chain_summary(strict, names, 1.0, batch), names, batch, [], None)
    rows = capsys.readouterr().out.splitlines()[2:4]
    assert [row.split()[:3] for row in rows] == [[s["stage"], setting(s["decode"]), "*"] for s in report["stages"]]


def test_a_rerun_with_the_same_inputs_trains_nothing(first_run, world_dir):
    from benchmarks.chain import annotate
    from flows.pipeline import pipeline_flow

    state, root = first_run
    stages = root / "cache" / "stages"
    before = {p: p.stat().st_mtime_ns for p in stages.rglob("*.safetensors")}
    again = pipeline_flow(_params(world_dir, root, "second"), return_state=True)
    assert again.is_completed(), again.message
    logs = flow_run_logs(again)
    assert [m for m in logs if "nothing trained here" in m] == [
        f"{b}: nothing trained here (its checkpoint was finished: cached, or another run's)" for b in ("B4", "B8")]
    assert {p: p.stat().st_mtime_ns for p in stages.rglob("*.safetensors")} == before
    report = json.loads((root / "second" / "report.json").read_text())
    first = json.loads((root / "first" / "report.json").read_text())
    assert [s["checkpoint"] for s in report["stages"]] == [s["checkpoint"] for s in first["stages"]]
    # a cached stage's cost is still reported: its recorded steps' seconds
    assert [s["step_seconds"] for s in annotate(report)["stages"]] == [s["step_seconds"] for s in annotate(first)["stages"]]

    # the same data from another place, and a B4 whose recorded AR base has moved away since it was trained:
    # still nothing to train (the curation is keyed by the sources' content, B8 by the chain's base, not a path)
    moved = root / "moved-world"
    for kind in ("llava_ov", "finevision"):
        shutil.copytree(world_dir / "sources" / kind, moved / "sources" / kind)
    b4 = Path(first["stages"][0]["checkpoint"]) / "bard.json"
    original = b4.read_bytes()
    b4.write_text(json.dumps({**json.loads(original), "anchor": str(root / "a-base-that-moved")}))
    try:
        third = pipeline_flow(_params(world_dir, root, "third").model_copy(update={"sources": {
            k: str(moved / "sources" / k) for k in ("llava_ov", "finevision")}}), return_state=True)
    finally:
        b4.write_bytes(original)
    assert third.is_completed(), third.message
    assert {p: p.stat().st_mtime_ns for p in stages.rglob("*.safetensors")} == before
    report = json.loads((root / "third" / "report.json").read_text())
    assert [s["checkpoint"] for s in report["stages"]] == [s["checkpoint"] for s in first["stages"]]


def test_a_failed_gate_stops_the_line_and_leaves_the_registry_alone(first_run, world_dir):
    from flows.pipeline import pipeline_flow

    _, root = first_run
    before = _snapshot(root / "registry")
    state = pipeline_flow(_params(world_dir, root, "strict", stage_overrides={4: {"gate.min_tpf": '{"4": 99}'}}),
                          return_state=True)
    assert state.is_failed() and "stage B4 failed its gate" in state.message and "minimum 99.00" in state.message
    assert _snapshot(root / "registry") == before
    report = json.loads((root / "strict" / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["B4"] and report["promoted"] == []  # B8 never ran


def test_the_ablation_flow_runs_each_variant_as_a_pipeline_run_at_one_budget(first_run, world_dir):
    # issue 24, CI-sized: on the first run's root and data, the reference (its stages are the first run's,
    # from the cache), AR → B8 directly at the same total steps, and a decoding-only variant (no training)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.ablation import AblationParams, ablation_flow
    from tasks.report import chosen_entry

    _, root = first_run
    first = json.loads((root / "first" / "report.json").read_text())
    stages = root / "cache" / "stages"
    before = {p: p.stat().st_mtime_ns for p in stages.rglob("*.safetensors")}
    params = AblationParams(sources={"llava_ov": str(world_dir / "sources/llava_ov"),
                                     "finevision": str(world_dir / "sources/finevision")},
                            include_paths=[str(world_dir / "benchmarks")], block_sizes=[4, 8], overrides=MINIMAL,
                            variants=["direct", "no_correction"], limit=4, root=str(root), speed_taus=[0.5])
    state = ablation_flow(params, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    result = json.loads(Path(summary["json"]).read_text())
    runs = {name: json.loads((root / f"{name}-seed0" / "report.json").read_text())
            for name in ("reference", "direct", "no_correction")}
    checkpoints = {name: [s["checkpoint"] for s in r["stages"]] for name, r in runs.items()}
    assert checkpoints["reference"] == checkpoints["no_correction"] == [s["checkpoint"] for s in first["stages"]]
    assert {p: t for p, t in ((p, p.stat().st_mtime_ns) for p in stages.rglob("*.safetensors")) if p in before} \
        == before  # nothing the first run trained was trained again
    (direct,) = checkpoints["direct"]
    meta = json.loads((Path(direct) / "bard.json").read_text())
    assert meta["block_size"] == 8 and meta["parent"] == first["baseline"]["checkpoint"] and meta["teacher"] is None
    steps = {r["variant"]: r["steps"] for r in result["variants"]}
    assert steps["direct"] == steps["reference"] == steps["no_correction"] == [88]  # B4 40 + B8 40+8
    assert runs["no_correction"]["stages"][-1]["decode"]["max_edits_per_position"] == 0
    assert runs["reference"]["stages"][-1]["decode"]["max_edits_per_position"] == 1
    edits = {r["variant"]: r["edits"] for r in result["variants"]}  # summed from the final stage's samples
    samples = Path(chosen_entry(runs["reference"]["stages"][-1])["samples"])
    assert edits["reference"] == sum(json.loads(line)["decode"]["edits"] for f in samples.glob("*.jsonl")
                                     for line in f.read_text().splitlines())
    assert edits["no_correction"] == 0
    # each final stage at the gate's τ 0.9 and at speed_taus' 0.5, evaluated on its own checkpoint and decoding
    for name, run in runs.items():
        fast = json.loads((root / f"{name}-seed0" / "speed" / "tau-0.5" / "eval.json").read_text())
        assert fast["checkpoint"] == run["stages"][-1]["checkpoint"] and fast["decode"]["threshold"] == 0.5
        assert fast["decode"]["max_edits_per_position"] == (0 if name == "no_correction" else 1)
        curve = next(r["curve"] for r in result["variants"] if r["variant"] == name)
        assert [q["threshold"] for q in curve] == [0.9, 0.5]
        assert curve[0]["tpf"] == pytest.approx(run["stages"][-1]["tpf"]) and curve[1]["tpf"] == fast["speed"]["tpf"]
    from tasks.ablation_report import run_summary

    with pytest.raises(ValueError, match="not evaluated at .*speed/tau-0.3"):  # a point never measured is said
        run_summary(root / "direct-seed0", [0.5, 0.3])
    claims = {c["claim"]: c for c in result["claims"]}
    assert set(claims) == {"progressive", "noise"}
    for c in claims.values():
        for t in c["tests"]:
            assert t["verdict"] in ("held", "did not hold", "inside the noise") and t["verdict"] in t["sentence"]
            assert t["n"] == 5 * 4  # every item of the five benchmarks, paired
            speed = t["at_speed"]  # the faster side at its gate τ, the slower at its τ of the nearest TPF
            faster = max(t["tpf_reference"], t["tpf_variant"])
            assert faster in (speed["tpf_reference"], speed["tpf_variant"])
            assert speed["sentence"] in Path(summary["report"]).read_text()
            (gate, fast) = t["along_the_curve"]  # the variant at τ 0.9 and 0.5, each against the nearest speed
            assert (gate["threshold"], fast["threshold"]) == (0.9, 0.5) and fast["tpf_variant"] == pytest.approx(
                next(r for r in result["variants"] if r["variant"] == t["variant"])["curve"][1]["tpf"])
    report_dir = Path(summary["report"]).parent
    assert {"ablation.md", "ablation.json", "ablation.png"} <= {p.name for p in report_dir.iterdir()}
    text = (report_dir / "ablation.md").read_text()
    assert "## Claims" in text and "One seed: each claim's ± is the paired items' standard error" in text
    assert "## Speed and accuracy per decoding threshold" in text and "| `direct` | 0.5 |" in text
    assert "Reference − variant at equal speed along the curve" in text
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[state.state_details.flow_run_id])))
    assert {"ablation-report", "ablation-variants"} <= {a.key for a in artifacts}

    from flows.ablation import FINISHED, finished, variant_runs, write_report
    from flows.cli import main  # the same report again from the finished runs, through the command line

    assert result["settings"]["older_runs"] == [] and "Trained by other code" not in text
    (report_dir / "ablation.json").unlink()
    argv = ["ablate", "--report-only", "--json", "--speed-taus", "0.5", "--source", f"llava_ov={world_dir / 'sources/llava_ov'}", "--source",
            f"finevision={world_dir / 'sources/finevision'}", "--include-path", str(world_dir / "benchmarks"),
            "--block-sizes", "4,8", "--variants", "direct,no_correction", "--limit", "4", "--root", str(root)]
    assert main(argv + [f"--set={k}={v}" for k, v in MINIMAL.items()]) == 0
    again = json.loads((report_dir / "ablation.json").read_text())
    assert again["claims"] == result["claims"] and again["variants"] == result["variants"]
    # the command's quick settings (its checkpoint interval, its world) are not those the flow ran with: the
    # report is the same, and names every run as trained with other settings
    assert again["settings"]["older_runs"] == [f"{name}-seed0" for name in runs]
    marker = root / "direct-seed0" / FINISHED  # as if trained by the code before an upgrade
    kept = marker.read_text()
    marker.write_text(json.dumps({**json.loads(kept), "fingerprint": "0" * 16}))
    assert write_report(params, variant_runs(params))["result"]["settings"]["older_runs"] == ["direct-seed0"]
    assert "than this report's (`--report-only` reports them as they are; `bard ablate` without it trains them " \
           "again): direct-seed0." in (report_dir / "ablation.md").read_text()
    marker.write_text(kept)

    # given one more variant, the ablation runs only that one: the finished runs (same settings, same code) are
    # reused as they are; a finished run's marker no longer matches once a setting changes
    done = {p: p.stat().st_mtime_ns for name in runs for p in (root / f"{name}-seed0").rglob("*") if p.is_file()}
    more = AblationParams(**{**params.model_dump(), "variants": ["direct", "no_correction", "confident_fallback"]})
    state = ablation_flow(more, return_state=True)
    assert state.is_completed(), state.message
    assert {p: p.stat().st_mtime_ns for p in done} == done
    assert (root / "confident_fallback-seed0" / FINISHED).exists()  # and its final stage at τ 0.5, the others' kept
    assert (root / "confident_fallback-seed0" / "speed" / "tau-0.5" / "eval.json").exists()
    result = json.loads(Path(state.result()["json"]).read_text())
    assert [r["variant"] for r in result["variants"]] == ["reference", "direct", "no_correction", "confident_fallback"]
    changed = AblationParams(**{**params.model_dump(), "limit": 5})
    assert all(finished(run) for _, _, run in variant_runs(params))
    assert not any(finished(run) for _, _, run in variant_runs(changed))
