"""`bard ui`: a real Prefect server on 127.0.0.1 (SQLite under a project-local PREFECT_HOME) plus the served
deployments (`flows/deployments.py`). Prints the URL; Ctrl-C (or SIGTERM) stops both, server last."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flows.cli import UsageError
from flows.local_server import die_with_parent, poll_until, port_busy, stop_group, wait_healthy


def _wait_served(url: str, name: str, count: int, runner: subprocess.Popen, timeout: float) -> None:
    """Until the runner has registered its `count` deployments called `name` (then a run can be triggered)."""
    request = urllib.request.Request(f"{url}/api/deployments/filter", data=json.dumps(
        {"deployments": {"name": {"any_": [name]}}}).encode(), headers={"Content-Type": "application/json"})

    def served() -> bool:
        with urllib.request.urlopen(request, timeout=5) as response:
            return len(json.loads(response.read())) >= count

    poll_until(served, runner, f"the {count} deployments '{name}' served", timeout)


def cmd_ui(args) -> int:
    from flows.cli_pipeline import pipeline_params
    from flows.deployments import DEFAULT_CRON, DEFAULT_SENSOR_SECONDS, ServeConfig

    cron = DEFAULT_CRON if args.cron is None else None if args.cron == "none" else args.cron
    sensor_every = DEFAULT_SENSOR_SECONDS if args.sensor_every is None else args.sensor_every
    if not 1024 <= args.port <= 65535:
        raise UsageError(f"bard ui: --port must be in 1024..65535, got {args.port}")
    if port_busy(args.port):
        raise UsageError(f"bard ui: port {args.port} is in use (another `bard ui`?); pick one with --port")
    if sensor_every < 10:
        raise UsageError("bard ui: --sensor-every must be at least 10 seconds")
    params = pipeline_params(args, "ui")
    try:
        cfg = ServeConfig(name=args.name, pipeline=params, cron=cron, sensor_seconds=sensor_every)
    except ValueError as exc:
        raise UsageError(f"bard ui: {exc.errors()[0]['msg'] if hasattr(exc, 'errors') else exc}") from None
    home = Path(args.home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"{url}/api", "PREFECT_UI_API_URL": f"{url}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_KEY", None)
    server = runner = None
    # SIGTERM ends `bard ui` the way Ctrl-C does (even when started in the background, where SIGINT was
    # ignored): both children are stopped, not orphaned
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with open(home / "server.log", "ab") as log:
            server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                       "--port", str(args.port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True, preexec_fn=die_with_parent)
        wait_healthy(url, server, args.startup_timeout)
        runner = subprocess.Popen([sys.executable, "-m", "flows.deployments", "--config", cfg.model_dump_json()],
                                  env=env, start_new_session=True, preexec_fn=die_with_parent)
        names = ["pipeline", "curate", "evaluate", "gate", "ablation"] + (["data-sensor"] if params.sources else [])
        _wait_served(url, args.name, len(names), runner, args.startup_timeout)
        print(f"Prefect UI: {url}\n  deployments: {', '.join(f'{n}/{args.name}' for n in names)}"
              f"\n  schedule: {cfg.cron or 'none'}; server log: {home / 'server.log'}\n  Ctrl-C stops both", flush=True)
        if args.json:
            print(json.dumps({"url": url, "api": f"{url}/api", "home": str(home), "deployments":
                              [f"{n}/{args.name}" for n in names]}), flush=True)
        while server.poll() is None and runner.poll() is None:
            time.sleep(0.5)
        which = "server" if server.poll() is not None else "deployment runner"
        print(f"bard ui: the {which} exited (status {(server if which == 'server' else runner).returncode}); "
              "stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bard ui: stopping the deployments and the server", file=sys.stderr, flush=True)
        return 0
    except RuntimeError as exc:
        print(f"bard ui: {exc} (see {home / 'server.log'})", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave the children running
        stop_group(runner)
        stop_group(server)


def add_commands(sub) -> None:
    from flows.cli_pipeline import pipeline_arguments

    p = sub.add_parser("ui", help="start a Prefect server with the UI and serve the bard deployments (Ctrl-C stops)")
    p.add_argument("--port", type=int, default=4200)
    p.add_argument("--home", default=".prefect", help="PREFECT_HOME: the server's SQLite database and logs "
                                                      "(default: ./.prefect)")
    p.add_argument("--name", default="tiny", help="deployment name, and the data sensor's watch")
    p.add_argument("--cron", default=None, help="the pipeline's schedule (default: weekly, Mondays 03:00; "
                                                "'none': no schedule)")
    p.add_argument("--sensor-every", type=int, default=None, help="seconds between data-sensor runs, with --source "
                                                                  "(default: 900)")
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for the server")
    pipeline_arguments(p)
    p.set_defaults(func=cmd_ui)
