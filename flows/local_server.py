"""The local Prefect server a command's flows report to, and the helpers that start and stop one.

Without ``PREFECT_API_URL`` Prefect starts a temporary server as a child in the caller's process group, so
a terminal's Ctrl-C reaches it at the same moment as the flow: the server is gone before the flow can
record that it crashed, the client retries for a minute and the run stays ``Running`` in the database
forever. `ensure_flow_server` starts the same kind of server (SQLite under ``PREFECT_HOME``) in a session of its
own instead, tied to this process's life (it gets SIGTERM when this process dies, even by SIGKILL), so an
interrupted run is recorded as crashed and the server stops after everything was written (docs/reliability.md).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:  # runs in the child before exec
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_flow_server(startup_timeout: float = 120.0) -> str | None:
    """Flows report to the configured API when there is one; else to a local server started here, for the
    rest of this process (returns its URL, or None for a configured API). It is stopped at exit
    after Prefect's log and event workers have flushed (exit handlers run last-registered first, and those
    register when first used), and every thread sees it: Prefect's threads read the global settings, which
    are refreshed from the environment."""
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return None
    home = Path(settings.home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{free_port()}"
    # offline by default: no telemetry calls (each failed one logs an ERROR without network), unless asked for
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **os.environ, "PREFECT_HOME": str(home),
           "PREFECT_UI_ENABLED": "false"}
    with open(home / "server.log", "ab") as log:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", url.rsplit(":", 1)[1]], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True, preexec_fn=die_with_parent)
    atexit.register(stop_group, server)
    try:
        wait_healthy(url, server, startup_timeout)
    except RuntimeError:
        stop_group(server)
        raise
    os.environ["PREFECT_API_URL"] = f"{url}/api"
    refresh_global_settings_context()
    return url


def port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def poll_until(ready, child: subprocess.Popen, what: str, timeout: float) -> None:
    """Until `ready()` is true (an OSError counts as not yet); fail if `child` exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"{what}: its process exited with status {child.returncode}")
        with contextlib.suppress(OSError):  # not listening yet
            if ready():
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what}: not after {timeout:.0f} s")


def wait_healthy(url: str, server: subprocess.Popen, timeout: float) -> None:
    def healthy() -> bool:
        with urllib.request.urlopen(f"{url}/api/health", timeout=2) as response:
            return response.status == 200

    poll_until(healthy, server, f"the Prefect server at {url} healthy", timeout)


def stop_group(proc: subprocess.Popen | None, grace: float = 30.0) -> None:
    """SIGTERM to the process group (a runner then cancels its runs and pauses its deployments, a server
    shuts down), SIGKILL after `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
