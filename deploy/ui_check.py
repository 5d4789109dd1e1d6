"""What a person sees: `bard ui`, a pipeline run triggered through the API, its artifacts in headless Chromium.

    .venv/bin/python deploy/ui_check.py --out /tmp/ui-check      (needs Debian's chromium: apt-get install chromium)

Starts `bard ui` on a small shapes world with a short B4-only chain, triggers `pipeline/<name>` through the
API with the deployment's parameters, waits for it, reads its artifacts back from the API (the stage-gate
report with the trade-off plot inlined, the gate verdict, the stage's progress bar), then opens the flow
run's page (its graph shows the artifacts) and the report artifact's page in Chromium: screenshots (PNG, into --out) and the
rendered DOM, which must show the report's heading and the plot as an image. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"train.merge_steps": "40", "train.distill_steps": "8", "train.lr": "1e-3", "train.batch_size": "16",
         "train.checkpoint_every": "8", "train.warmup_steps": "4", "gate.limit": "8", "gate.speed_items": "2",
         "gate.thresholds": "[0.9]", "gate.default_tolerance": "1", "gate.min_tpf": '{"4": 0.5}'}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1400,1100", "--virtual-time-budget=20000"]


def chromium(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise SystemExit("ui_check: no chromium on PATH (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(work: Path, port: int, name: str, world: Path, overrides: dict) -> tuple[subprocess.Popen, dict]:
    cmd = [sys.executable, "-m", "flows.cli", "ui", "--port", str(port), "--home", str(work / "home"),
           "--root", str(work / "runs"), "--registry", str(work / "registry"), "--name", name, "--cron", "none",
           "--source", f"llava_ov={world / 'sources/llava_ov'}", "--source",
           f"finevision={world / 'sources/finevision'}", "--include-path", str(world / "benchmarks"),
           "--block-sizes", "4", *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")], "--json"]
    log = open(work / "ui.log", "w")  # noqa: SIM115 - the child writes it for its whole life
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        lines = [line for line in (work / "ui.log").read_text().splitlines() if line.startswith("{")]
        if lines:
            return proc, json.loads(lines[0])
        if proc.poll() is not None:
            raise SystemExit(f"ui_check: bard ui exited ({proc.returncode}); see {work / 'ui.log'}")
        time.sleep(1)
    raise SystemExit("ui_check: bard ui did not come up in 240 s")


def run_and_read(api: str, deployment: str, timeout: float) -> tuple[object, dict]:
    os.environ["PREFECT_API_URL"] = api
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, timeout=timeout)  # through the API, with the deployment's parameters
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[run.id])))
    return run, {a.key: a for a in artifacts if a.key}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where the screenshots and the rendered DOM go")
    parser.add_argument("--timeout", type=float, default=1500, help="seconds to wait for the pipeline run")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bard-ui-check-"))
    from bard_core.shapes.synth import synth

    synth(work / "world", seed=5, size=80, bench_size=8)
    port, name = free_port(), "check"
    proc, info = start_ui(work, port, name, work / "world", QUICK)
    checks: dict[str, bool] = {}
    try:
        run, artifacts = run_and_read(info["api"], f"pipeline/{name}", args.timeout)
        checks["run completed"] = run.state.is_completed()
        report = artifacts.get("stage-gate-report")
        checks["report artifact has the plot inline"] = bool(report) and "data:image/png;base64," in report.data
        checks["progress artifact at 100"] = getattr(artifacts.get("train-b4"), "data", None) == 100.0
        pages = {"flow-run": f"{info['url']}/runs/flow-run/{run.id}"}  # its graph shows the artifacts too
        if report:
            pages["report-artifact"] = f"{info['url']}/artifacts/artifact/{report.id}"
        for page, url in pages.items():
            shot = chromium([f"--screenshot={out / (page + '.png')}", url])
            checks[f"{page} screenshot"] = shot.returncode == 0 and (out / f"{page}.png").stat().st_size > 10_000
        if report:
            dom = chromium(["--dump-dom", pages["report-artifact"]]).stdout
            (out / "report-artifact.html").write_text(dom)
            checks["the UI renders the report heading"] = "Stage gates" in dom
            checks["the UI renders the plot as an image"] = "<img" in dom and "data:image/png;base64," in dom
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    print("\n".join(f"{'ok ' if ok else 'BAD'} {what}" for what, ok in checks.items()))
    print(json.dumps({"passed": all(checks.values()), "checks": checks, "out": str(out), "work": str(work)}))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
