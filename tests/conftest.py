"""Shared fixtures: one tiny model and one small shapes world per test session."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from bard_core.config import ModelConfig
    from bard_core.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", ModelConfig())


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    from bard_core.shapes.synth import synth

    out = tmp_path_factory.mktemp("world") / "shapes"
    synth(out, seed=7, size=80, bench_size=8)
    return out


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real (temporary) Prefect server for the whole session, with a project-local PREFECT_HOME."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def local_ray():
    """A real local Ray (2 CPUs), shut down at the end of the session."""
    import ray

    from tasks.curate import init_ray

    init_ray()
    yield
    ray.shutdown()
