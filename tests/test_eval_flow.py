"""The evaluate and gate flows on a real Prefect server: verdicts, promotion, reports and artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bard_core.gate import setting
from bard_core.recipes import get_recipe

pytestmark = pytest.mark.slow

# small and lenient: the tiny random base and a 40-step stage are near chance, so these gates judge plumbing
PASSING = {"gate.limit": "4", "gate.thresholds": "[0.9, 0.4]", "gate.speed_items": "2", "gate.default_tolerance": "1",
           "gate.min_tpf": '{"4": 0.5}', "gate.drafter": "true"}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _artifacts(flow_run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return {a.key: a for a in found}


@pytest.fixture(scope="module")
def registry_root(tmp_path_factory):
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="module")
def passed_gate(prefect_server, stage_b4, tiny_model_dir, world_dir, registry_root, tmp_path_factory):
    from flows.evaluate import GateParams, gate_flow

    out = tmp_path_factory.mktemp("gate_pass")
    params = GateParams(candidate=stage_b4.uri, baseline=str(tiny_model_dir), out=str(out), overrides=PASSING,
                        include_paths=[str(world_dir / "benchmarks")], registry=str(registry_root))
    state = gate_flow(params, return_state=True)
    return state, out


def test_a_passing_stage_is_promoted_with_the_fastest_passing_threshold(passed_gate, registry_root):
    from bard_core import checkpoint
    from tasks import registry

    state, out = passed_gate
    assert state.is_completed(), state.message
    result = state.result()
    report = json.loads((out / "report.json").read_text())
    (stage,) = report["stages"]
    assert report["schema"] == 1 and report["passed"] and report["promoted"] == [4]
    # the recipe's thresholds, the stage's own speculative mode (gate.speculative, on by default), the stage as
    # the AR base's drafter (gate.drafter)
    assert [s["setting"] for s in stage["sweep"]] == ["τ=0.9", "τ=0.4", "spec", "draft"]
    assert [s["threshold"] for s in stage["sweep"]] == [0.9, 0.4, None, None] and all(s["passed"] for s in stage["sweep"])
    fastest = max(stage["sweep"], key=lambda s: (s["tpf"], s["threshold"] or 0.0))
    assert setting(result["decode"]) == fastest["setting"] == setting(stage["decode"])
    entry = registry.read(registry_root, "tiny")["current"]["B4"]
    promoted = checkpoint.read_meta(entry["uri"])
    assert setting(promoted["decode"]) == fastest["setting"] and entry["uri"] == stage["promoted_uri"]
    cfg = checkpoint.decode_config(promoted)  # what bard generate/eval will use
    assert (cfg.mode, cfg.threshold) == (("speculative", cfg.threshold) if fastest["setting"] in ("spec", "draft")
                                         else ("dynamic", fastest["threshold"]))
    assert checkpoint.promoted_verifier(promoted) == (promoted["decode"]["verifier"] if fastest["setting"] == "draft"
                                                      else None)
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    assert f"| B4 | ✅ promoted | {fastest['setting']} |" in markdown
    assert "### B4: decode settings" in markdown and "| spec | yes |" in markdown and "| τ=0.4 | yes |" in markdown
    assert set(report["baseline"]["scores"]) == {c["benchmark"] for c in stage["checks"]}


def test_the_gate_measures_the_lossless_mode_beside_each_setting(passed_gate, tiny_model_dir):
    # issue 25's third curve: the stage drafts, the AR base verifies; its answers on the speed items are the
    # AR base's own (compared answer for answer), at its own tokens/s and speed-up over the AR base
    state, out = passed_gate
    report = json.loads((out / "report.json").read_text())
    sweep = report["stages"][0]["sweep"]
    assert [e["lossless"] for e in sweep if e["setting"] in ("spec", "draft")] == [None, None]  # lossless themselves
    for entry in [e for e in sweep if e["setting"] not in ("spec", "draft")]:
        lossless = entry["lossless"]
        eval_json = json.loads((Path(entry["samples"]).parent / "eval.json").read_text())
        ar = eval_json["speed"]["ar"]
        assert lossless["verifier"] == str(tiny_model_dir) and lossless["items"] == len(ar["1"]["answers"]) == 2
        assert lossless["identical"] == 1.0
        assert set(lossless["batch"]) == set(ar) and "answers" not in lossless["batch"]["1"]
        for k, v in lossless["batch"].items():
            assert lossless["speedup"][k] == pytest.approx(v["tok_s"] / ar[k]["tok_s"])
            assert v["tpf"] == pytest.approx(v["tokens"] / v["nfe"])
    markdown = (out / "report.md").read_text()
    assert "lossless b1" in markdown and "100% identical" in markdown


def test_the_drafter_setting_scores_what_the_ar_base_scores_item_for_item(passed_gate, tiny_model_dir):
    # gate.drafter: the stage drafts, the AR base verifies, on every benchmark of the gate: the AR base's greedy
    # answers, so every paired drop is exactly zero, however near chance the stage is
    _, out = passed_gate
    report = json.loads((out / "report.json").read_text())
    (draft,) = [e for e in report["stages"][0]["sweep"] if e["setting"] == "draft"]
    evaluated = json.loads((Path(draft["samples"]).parent / "eval.json").read_text())
    baseline = json.loads((Path(report["baseline"]["samples"]).parent / "eval.json").read_text())
    assert evaluated["decode"]["verifier"] == str(tiny_model_dir) and evaluated["mode"] == "speculative"
    assert evaluated["items"] == baseline["items"] and set(evaluated["items"]) == set(get_recipe("tiny").gate.benchmarks)
    assert draft["tpf"] == pytest.approx(evaluated["speed"]["tokens"] / evaluated["speed"]["nfe"])
    assert "draft: the stage as the AR base's drafter" in (out / "report.md").read_text()


def test_the_gate_publishes_its_verdict_checks_and_the_report_as_artifacts(passed_gate):
    state, _ = passed_gate
    found = _artifacts(state.state_details.flow_run_id)
    assert {"gate-b4", "gate-b4-checks", "stage-gate-report"} <= set(found)
    assert found["gate-b4"].data.startswith("# Gate B4: PASSED")
    assert "data:image/png;base64," in found["stage-gate-report"].data
    rows = json.loads(found["gate-b4-checks"].data)
    assert {r["benchmark"] for r in rows} >= {"shapes_mcq", "shapes_extract"} and all(r["passed"] for r in rows)


def test_generate_uses_the_promoted_decode_setting_by_default(passed_gate, registry_root, capsys):
    from flows.cli import main
    from tasks import registry

    entry = registry.read(registry_root, "tiny")["current"]["B4"]
    assert main(["generate", "--model", entry["uri"], "--prompt", "Hi", "--max-new-tokens", "4", "--json"]) == 0
    decoder = json.loads(capsys.readouterr().out)["decoder"]
    assert decoder.startswith("speculative B=4 " if setting(entry["decode"]) == "spec"
                              else f"block-diffusion B=4 tau={entry['decode']['threshold']:g} ")
    assert main(["generate", "--model", entry["uri"], "--prompt", "Hi", "--max-new-tokens", "4", "--threshold", "0.6",
                 "--json"]) == 0
    assert "tau=0.6 " in json.loads(capsys.readouterr().out)["decoder"]  # a flag still wins


PROMPT = ["--prompt", "List the contents of every cell.", "--max-new-tokens", "24", "--json"]


def _promoted_speculative(stage, verifier: str, root: Path) -> dict:
    """The registry entry of `stage` promoted in a speculative setting verified by `verifier` ("self" or a dir)."""
    from bard_core.gate import EvalReport, GateResult
    from tasks import registry

    decode = {"engine": "speculative", "verifier": verifier, "mode": "speculative", "block_size": 4,
              "threshold": 0.9, "temperature": 0.0}
    report = EvalReport(stage.uri, "speculative", decode, {"shapes_mcq": 0.5}, speed={"tpf": 1.5})
    return registry.promote(root, "tiny", GateResult("B4", True, (), decode=decode), stage.uri, report,
                            block_size=4)


def test_a_stage_promoted_in_its_speculative_mode_decodes_its_own_causal_greedy_answer(stage_b4, tmp_path, capsys):
    # what a user gets from a stage the gate promoted as "spec": blocks drafted and verified by its own causal
    # view, so token for token what the same weights decode one token per forward
    from flows.cli import main

    entry = _promoted_speculative(stage_b4, "self", tmp_path / "reg")
    assert main(["generate", "--model", entry["uri"], *PROMPT]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["decoder"].startswith("speculative B=4 (lossless: the greedy answer of these weights)")
    assert main(["generate", "--model", entry["uri"], "--ar", *PROMPT]) == 0
    ar = json.loads(capsys.readouterr().out)
    assert spec["text"] == ar["text"] and spec["tokens"] == ar["tokens"] and spec["nfe"] <= 2 * ar["nfe"]


def test_a_stage_promoted_as_the_ar_bases_drafter_decodes_the_bases_answer(stage_b4, tiny_model_dir, tmp_path,
                                                                              capsys):
    # what a user gets from a stage the gate promoted as "draft": the AR base loaded beside it as its verifier
    # (from the promoted bard.json), so the answer is the base's own, token for token; a base that has gone
    # is a clear error, not a silent switch to the stage's own answers
    import shutil

    from flows.cli import main
    from tasks.lm_model import BardLM

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    entry = _promoted_speculative(stage_b4, str(base), tmp_path / "reg")
    assert main(["generate", "--model", entry["uri"], *PROMPT]) == 0
    drafted = json.loads(capsys.readouterr().out)
    assert drafted["decoder"] == f"speculative B=4 (lossless: the greedy answer of {base})"
    assert main(["generate", "--model", str(base), "--ar", *PROMPT]) == 0
    ar = json.loads(capsys.readouterr().out)
    assert drafted["text"] == ar["text"] and drafted["tokens"] == ar["tokens"]
    assert BardLM(entry["uri"]).verifier == str(base)  # lm-eval and bard eval load it too
    assert BardLM(entry["uri"], mode="speculative", verifier="self").verifier is None  # unless told otherwise
    shutil.rmtree(base)
    assert main(["generate", "--model", entry["uri"], *PROMPT]) == 2
    assert "was promoted as the drafter of" in capsys.readouterr().err


def test_a_failed_gate_fails_the_run_with_its_reasons_and_leaves_the_registry_alone(
        passed_gate, stage_b4, tiny_model_dir, world_dir, registry_root, tmp_path):
    from flows.evaluate import GateParams, gate_flow

    before = _snapshot(registry_root)
    params = GateParams(candidate=stage_b4.uri, baseline=str(tiny_model_dir), out=str(tmp_path), stage="B4-strict",
                        overrides={**PASSING, "gate.min_tpf": '{"4": 99}'}, include_paths=[str(world_dir / "benchmarks")],
                        registry=str(registry_root))
    state = gate_flow(params, return_state=True)
    assert state.is_failed()
    assert "shapes_extract TPF" in state.message and "< minimum 99.00 for B=4" in state.message
    assert _snapshot(registry_root) == before
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] is False and report["stages"][0]["promoted_uri"] is None
    assert "❌ failed" in (tmp_path / "report.md").read_text()
    assert _artifacts(state.state_details.flow_run_id)["gate-b4-strict"].data.startswith("# Gate B4-strict: FAILED")


def test_bard_eval_takes_any_task_and_prints_scores_and_speed(prefect_server, stage_b4, tiny_model_dir, world_dir,
                                                             tmp_path, capsys):
    from flows.cli import main

    code = main(["eval", "--model", stage_b4.uri, "--ar-model", str(tiny_model_dir), "--tasks",
                 "shapes_count,shapes_extract", "--include-path", str(world_dir / "benchmarks"), "--limit", "3",
                 "--threshold", "0.9,0.5", "--out", str(tmp_path), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["scores"]) == {"shapes_count", "shapes_extract"} and result["mode"] == "diffusion"
    assert result["speed"]["benchmark"] == "shapes_extract" and set(result["speed"]["batch"]) == {"1", "32"}
    assert [r["label"] for r in result["reports"]] == ["tau-0.9", "tau-0.5"]
    assert (tmp_path / "tau-0.5" / "samples" / "shapes_count.jsonl").exists()
    assert main(["eval", "--model", stage_b4.uri, "--tasks", "no_such_task", "--out", str(tmp_path)]) == 2
    assert "unknown lm-eval task(s) ['no_such_task']" in capsys.readouterr().err
