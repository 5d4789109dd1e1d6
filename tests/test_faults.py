"""The fault campaign on the real pipeline (docs/reliability.md): `bard pipeline` (the code path of
`make demo`) killed from outside at its boundaries, then run again with the same command.

One line of three runs on one root, each fault applied from outside the process (no hook in the code):
1. SIGKILL of the whole process group while curation writes its output: no curated dataset exists
   afterwards (nothing half-written is ever read as complete) and no process of the run survives.
2. Ctrl-C (SIGINT to the process group, as a terminal sends it) while the B4 stage trains, after its first
   checkpoint: exit 130 with one line saying what is kept, no process left behind, nothing promoted, the
   curated data complete.
3. The same command again, against a real Prefect server that is stopped and started again while the stage
   trains: curation is reused as it is, the stage resumes from its last checkpoint instead of starting over,
   the line finishes with B4 promoted (whole: its digests verify), and the server records the run completed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from bard_core import checkpoint
from tasks import registry
from tasks.refs import DatasetRef
from tests.faults import local_ray_processes, marked, wait_until
from tests.test_pipeline import MINIMAL

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _env(marker: str, home: Path) -> dict:
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    return {**env, "BARD_FAULT_RUN": marker, "PREFECT_HOME": str(home), "PYTHONPATH": str(ROOT),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def _pipeline(root: Path, name: str, log: Path, api: str | None = None) -> tuple[subprocess.Popen, str]:
    marker = uuid.uuid4().hex
    env = _env(marker, root / "prefect_home")
    if api:
        env["PREFECT_API_URL"] = api
    sets = [a for k, v in MINIMAL.items() for a in ("--set", f"{k}={v}")]
    args = [sys.executable, "-m", "flows.cli", "pipeline", "--root", str(root), "--run-name", name, "--block-sizes",
            "4", "--world-seed", "7", "--world-size", "40", "--world-bench-size", "4", "--registry",
            str(root / "registry"), "--json", *sets]
    with open(log, "w") as out:  # its own session: a signal to its group reaches it and all it started
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True), marker


def _server(home: Path, port: int, marker: str) -> subprocess.Popen:
    """A real `prefect server start` (its own session), healthy when this returns."""
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=_env(marker, home), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: _api(f"http://127.0.0.1:{port}/api/health", None) is not None, 120, server,
               "the Prefect server to be healthy", every=0.5)
    return server


def _api(url: str, body: dict | None):
    try:
        request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return None


def _no_survivors(marker: str) -> None:
    wait_until(lambda: not marked(marker), 60, what="every process of the run to be gone")


def test_killed_and_interrupted_runs_leave_no_half_state_and_the_next_run_continues(tmp_path):
    root = tmp_path / "runs"
    curated, stages = root / "cache" / "curated", root / "cache" / "stages"

    # 1. killed while curation writes its output
    run, marker = _pipeline(root, "killed", tmp_path / "killed.log")
    wait_until(lambda: list(curated.glob(".*.tmp")), 600, run, "curation to start writing")
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(30)
    _no_survivors(marker)
    assert [p.name for p in curated.iterdir() if p.is_dir() and not p.name.startswith(".")] == []  # none complete

    # 2. Ctrl-C while the B4 stage trains, after its first checkpoint
    run, marker = _pipeline(root, "interrupted", tmp_path / "interrupted.log")
    wait_until(lambda: list(stages.glob("B4-*.ray/*/checkpoint_manager_snapshot.json")), 900, run,
               "the stage's first checkpoint registered by Ray")
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait(120) == 130, (tmp_path / "interrupted.log").read_text()[-3000:]
    tail = (tmp_path / "interrupted.log").read_text().strip().splitlines()[-20:]
    said = [line for line in tail if line.startswith("bard: interrupted")]
    assert said and "run the same command again" in said[0], tail
    _no_survivors(marker)
    assert not (root / "registry").exists() or not list((root / "registry").rglob("promoted.json"))
    (data,) = [p for p in curated.iterdir() if p.is_dir() and not p.name.startswith(".")]
    manifest = json.loads((data / "manifest.json").read_text())
    DatasetRef.from_manifest(data, manifest)  # complete: every shard matches its digest
    curated_at = (data / "manifest.json").stat().st_mtime_ns

    # 3. the same command again, against a Prefect server that is restarted while the stage trains
    port, server_marker = _free_port(), uuid.uuid4().hex
    server = _server(tmp_path / "server_home", port, server_marker)
    seen = set(stages.glob("B4-*.ray/*/checkpoint_*"))
    run, marker = _pipeline(root, "again", tmp_path / "again.log", f"http://127.0.0.1:{port}/api")
    wait_until(lambda: set(stages.glob("B4-*.ray/*/checkpoint_*/bard.json")) - {p / "bard.json" for p in seen}, 900,
               run, "a checkpoint of the resumed stage")
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(60)
    server = _server(tmp_path / "server_home", port, server_marker)
    try:
        assert run.wait(900) == 0, (tmp_path / "again.log").read_text()[-3000:]
        flow_runs = _api(f"http://127.0.0.1:{port}/api/flow_runs/filter", {})
        assert [r["state_type"] for r in flow_runs] == ["COMPLETED"]  # recorded through the restart
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
    lines = (tmp_path / "again.log").read_text().strip().splitlines()
    payload = json.loads(next(line for line in reversed(lines) if line.startswith('{"seconds"')))
    assert payload["promoted"] == [4]
    (entry,) = registry.read(root / "registry", "tiny")["history"]
    checkpoint.verify(entry["uri"])  # the promoted stage whole
    assert (data / "manifest.json").stat().st_mtime_ns == curated_at  # curation reused, not redone
    (stage,) = [p for p in stages.iterdir() if p.is_dir() and not p.name.startswith(".") and p.suffix != ".ray"]
    meta = json.loads((stage / "bard.json").read_text())
    assert meta["resumed_from"] and meta["resumed_from"][0] >= 8 and meta["step"] == meta["total_steps"]
    assert not list(stages.glob("*.ray"))  # a finished stage's Ray storage is removed
    _no_survivors(marker)
    _no_survivors(server_marker)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(uri: str, part: str) -> list[tuple]:
    import pyarrow.parquet as pq

    table = pq.read_table(str(Path(uri) / part))
    reasons = table.column("reason").to_pylist() if "reason" in table.column_names else [None] * table.num_rows
    return sorted(zip(table.column("sample_id").to_pylist(), reasons))


def test_a_curation_worker_killed_mid_run_loses_no_row(data_ref, world_dir, tiny_model_dir, tmp_path):
    """An OOM kill of a Ray Data worker (SIGKILL from outside) while curation runs: Ray restarts the actor and
    retries its batches; the result is the one an undisturbed run gives, row for row."""
    import threading

    from bard_core.recipes import get_recipe
    from tasks.curate import run_curation

    killed = []

    def kill_one():
        workers = wait_until(lambda: local_ray_processes(b"_UnitProcessor"), 300, what="a curation worker")
        os.kill(workers[0], signal.SIGKILL)
        killed.append(workers[0])

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    sources = {"llava_ov": str(world_dir / "sources/llava_ov"), "finevision": str(world_dir / "sources/finevision")}
    ref = run_curation(sources, tmp_path / "curated", get_recipe("tiny").data, str(tiny_model_dir),
                       str(world_dir / "benchmarks"))
    killer.join(10)
    assert killed, "no curation worker was seen to kill"
    assert ref.counts == data_ref.counts and ref.fingerprint == data_ref.fingerprint
    for part in ("data", "rejects"):
        assert _rows(ref.uri, part) == _rows(data_ref.uri, part)
