"""The local Prefect server a command's flows report to, and the helpers that start and stop one.

Without ``PREFECT_API_URL`` Prefect starts a temporary server as a child in the caller's process group, so
a terminal's Ctrl-C reaches it at the same moment as the flow: the server is gone before the flow can
record that it crashed, the client retries for a minute and the run stays ``Running`` in the database
forever. `flow_server` starts the same kind of server (SQLite under ``PREFECT_HOME``) in a session of its
own instead, tied to this process's life (it gets SIGTERM when this process dies, even by SIGKILL), so an
interrupted run is recorded as crashed and the server stops after it (docs/reliability.md).
"""

from __future__ import annotations

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


def _die_with_parent() -> None:  # runs in the child before exec
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def flow_server(startup_timeout: float = 120.0):
    """Run the body's flows against the configured API when there is one; else against a temporary local
    server started here (yields its URL, or None for a configured API). Stopped when the body ends."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    settings = get_current_settings()
    if settings.api.url:
        yield None
        return
    home = Path(settings.home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{_free_port()}"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false"}
    with open(home / "server.log", "ab") as log:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", url.rsplit(":", 1)[1]], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True, preexec_fn=_die_with_parent)
    try:
        _wait_healthy(url, server, startup_timeout)
        # the environment too: threads (progress, log and event workers) do not see this thread's settings context
        os.environ["PREFECT_API_URL"] = f"{url}/api"
        with temporary_settings({PREFECT_API_URL: f"{url}/api"}):
            yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        _stop(server)


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _poll(ready, child: subprocess.Popen, what: str, timeout: float) -> None:
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


def _wait_healthy(url: str, server: subprocess.Popen, timeout: float) -> None:
    def healthy() -> bool:
        with urllib.request.urlopen(f"{url}/api/health", timeout=2) as response:
            return response.status == 200

    _poll(healthy, server, f"the Prefect server at {url} healthy", timeout)


def _stop(proc: subprocess.Popen | None, grace: float = 30.0) -> None:
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
