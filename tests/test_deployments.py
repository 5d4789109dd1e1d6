"""`bard ui` for real: a `prefect server` process, the served deployments, a run triggered through the API,
the data sensor's event starting the pipeline deployment, a cancelled pipeline run leaving no Ray process
behind and the registry untouched, and SIGTERM stopping everything."""

from __future__ import annotations

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

import pytest

from tests.conftest import SHORT

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _processes_with(env_item: str) -> list[list[str]]:
    """argv of every live process whose environment holds `env_item` (NAME=VALUE)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
            state = next((line for line in (proc / "status").read_text().splitlines() if line.startswith("State:")), "")
        except OSError:
            continue
        if env_item.encode() in environ and "zombie" not in state:
            found.append([a.decode(errors="replace") for a in argv if a])
    return found


def _ray_processes(ray_tmp: str, kind: str = "") -> list[str]:
    """Ray's processes (GCS, raylet, agents, workers) started with RAY_TMPDIR=`ray_tmp`: the served runs' Ray,
    told apart from any other Ray on the machine by the environment they inherit."""
    heads = [" ".join(argv[:2]) for argv in _processes_with(f"RAY_TMPDIR={ray_tmp}") if argv]
    return [h for h in heads if (h.startswith("ray::") or "/ray/" in h) and kind in h]


@pytest.fixture(scope="module")
def ui(world_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("ui")
    sources = base / "sources"
    shutil.copytree(world_dir / "sources", sources)  # the sensor test changes them
    ray_tmp = tempfile.mkdtemp(prefix="bardui", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    port = _free_port()
    quick = {**SHORT, "gate.limit": "4", "gate.speed_items": "2", "gate.thresholds": "[0.9]"}
    overrides = [a for k, v in quick.items() for a in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "flows.cli", "ui", "--port", str(port), "--home", str(base / "home"),
           "--root", str(base / "runs"), "--registry", str(base / "registry"), "--name", "t1",
           "--source", f"llava_ov={sources / 'llava_ov'}", "--source", f"finevision={sources / 'finevision'}",
           "--include-path", str(world_dir / "benchmarks"), "--block-sizes", "4", "--sensor-every", "3600",
           *overrides, "--json"]
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    with open(base / "ui.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    info = _wait(lambda: next((json.loads(line) for line in (base / "ui.log").read_text().splitlines()
                               if line.startswith("{")), None) or (proc.poll() is not None and {"dead": True}),
                 180, "bard ui to print its JSON line")
    assert "dead" not in info, (base / "ui.log").read_text()[-3000:]

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: info["api"]}):
        yield {"proc": proc, "info": info, "base": base, "sources": sources, "ray_tmp": ray_tmp, "port": port}
    if proc.poll() is None:  # a failed test: stop it the way a user does, so nothing outlives the session
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def test_the_deployments_schedule_and_new_data_trigger_are_on_the_server(ui):
    with _client() as client:
        deployments = _wait(lambda: {f"{client.read_flow(d.flow_id).name}/{d.name}": d
                                     for d in client.read_deployments()} if len(client.read_deployments()) >= 6
                            else None, 60, "six deployments")
        assert set(deployments) == {"pipeline/t1", "curate/t1", "evaluate/t1", "gate/t1", "ablation/t1",
                                    "data-sensor/t1"}
        assert set(ui["info"]["deployments"]) == set(deployments)
        pipeline = deployments["pipeline/t1"]
        assert [s.schedule.cron for s in pipeline.schedules] == ["0 3 * * 1"]
        assert pipeline.global_concurrency_limit is not None and pipeline.global_concurrency_limit.limit == 1
        params = pipeline.parameters["params"]
        assert params["block_sizes"] == [4] and params["overrides"].items() >= SHORT.items()
        assert params["sources"]["llava_ov"] == str(ui["sources"] / "llava_ov")
        sensor = deployments["data-sensor/t1"]
        assert sensor.schedules[0].schedule.interval.total_seconds() == 3600
        automations = [a for a in client.read_automations() if "bard.data.updated" in a.trigger.expect]
        assert len(automations) == 1
        (automation,) = automations
        assert automation.trigger.match.model_dump()["prefect.resource.id"] == "bard.sources.t1"
        assert [a.deployment_id for a in automation.actions] == [pipeline.id]


def test_prefect_deploy_creates_every_work_pool_deployment_of_prefect_yaml(ui):
    import yaml

    env = {**os.environ, "PREFECT_API_URL": ui["info"]["api"], "BARD_HOME": str(ROOT)}
    for pool, kind in (("bard-local", "process"), ("bard-k8s", "kubernetes")):
        made = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", pool, "--type", kind], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    deployed = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file",
                               "deploy/prefect.yaml"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    declared = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())["deployments"]
    flows = {"pipeline_flow": "pipeline", "curate_flow": "curate", "evaluate_flow": "evaluate", "gate_flow": "gate",
             "data_sensor_flow": "data-sensor", "ablation_flow": "ablation"}
    with _client() as client:
        found = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
        for dep in declared:
            name = f"{flows[dep['entrypoint'].split(':')[1]]}/{dep['name']}"
            assert name in found, name
            assert found[name].work_pool_name == dep["work_pool"]["name"]
        resources = {a.trigger.match.model_dump().get("prefect.resource.id") for a in client.read_automations()}
        assert "bard.sources.qwen3-vl-4b" in resources


def test_new_data_starts_the_pipeline_and_cancelling_it_stops_ray_and_promotes_nothing(ui):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    with _client() as client:
        pipeline = client.read_deployment_by_name("pipeline/t1")

        def pipeline_runs():  # apart from the cron schedule's future runs
            return [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(
                id=DeploymentFilterId(any_=[pipeline.id]))) if not r.auto_scheduled]

        assert pipeline_runs() == []
        first = run_deployment("data-sensor/t1", timeout=180)  # a run triggered through the API
        assert first.state.is_completed(), first.state
        assert client.read_variable_by_name("bard-sources-t1") is not None
        time.sleep(3)
        assert pipeline_runs() == []  # the first look only records

        # new data: one more parquet file in a subset of the llava_ov source
        subset = sorted(p for p in (ui["sources"] / "llava_ov").iterdir() if p.is_dir())[0]
        original = sorted(subset.glob("*.parquet"))[0]
        shutil.copy(original, subset / ("more-" + original.name))
        second = run_deployment("data-sensor/t1", timeout=180)
        assert second.state.is_completed(), second.state
        _the_browser_shows_the_sensor_artifact(client, second.id, ui)
        (run,) = _wait(pipeline_runs, 90, "the automation to start the pipeline deployment")

        # cancel it once its Ray Train stage is running
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        def training():
            state = client.read_flow_run(run.id).state
            assert not state.is_final(), f"the pipeline run ended before training: {state}"
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            return any(t.name.startswith("train") and t.state.is_running() for t in tasks)

        # a run that fails says so at once; a live one gets the time a busy 2-core machine needs
        _wait(training, 1200, "the pipeline run to reach its training stage", every=2.0)
        _wait(lambda: _ray_processes(ui["ray_tmp"], "RayTrainWorker"), 120, "the Ray Train workers to start")
        client.set_flow_run_state(run.id, Cancelling())
        # the runner stops the run's process (whose engine first records Crashed), then marks the run Cancelled
        _wait(lambda: client.read_flow_run(run.id).state.is_cancelled(), 120, "the run to be Cancelled")
        try:
            _wait(lambda: not _ray_processes(ui["ray_tmp"]), 120, "the run's Ray processes to exit")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {_ray_processes(ui['ray_tmp'])}") from None
    registry = ui["base"] / "registry"
    assert not registry.exists() or not any(registry.rglob("*.json")), "a cancelled run promoted something"


def _the_browser_shows_the_sensor_artifact(client, flow_run_id, ui) -> None:
    """The sensor's artifact as a person sees it: Debian's Chromium, headless, on the server's UI."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    sys.path.insert(0, str(ROOT / "deploy"))
    from ui_check import chromium

    (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
        any_=[flow_run_id])))
    assert artifact.key == "data-sensor-t1" and "changed: llava_ov" in artifact.data
    url = f"{ui['info']['url']}/artifacts/artifact/{artifact.id}"
    dom = chromium(["--dump-dom", url]).stdout
    assert "Data sensor" in dom and "changed: llava_ov" in dom, dom[-2000:]  # the markdown, rendered by the UI
    assert "<table" in dom and "finevision" in dom
    shot = ui["base"] / "sensor-run.png"
    chromium([f"--screenshot={shot}", f"{ui['info']['url']}/runs/flow-run/{flow_run_id}"])
    assert shot.stat().st_size > 10_000


def test_sigterm_stops_the_server_and_the_runner(ui):
    proc = ui["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(90) == 0
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", ui["port"])) != 0, "the Prefect server still listens"
    home = ui["base"] / "home"
    _wait(lambda: not _processes_with(f"PREFECT_HOME={home}"), 30, "every process of `bard ui` to exit")
