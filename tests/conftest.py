"""Shared fixtures: one tiny model and one small shapes world per test session."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("LMEVAL_HASHMM", "0")  # as tasks/lm_model.py sets it, whichever module imports lm-eval first

import pytest  # noqa: E402
from prefect.logging.configuration import ensure_logging_setup  # noqa: E402

# Prefect binds its console log handler to the sys.stderr of the moment it first sets up logging: do it now,
# under pytest's session-long capture, not first inside a capsys test whose buffer closes after it (every
# later flow run's log line would then fail, and the error report recurses through Prefect's print patch)
ensure_logging_setup()

# a test that starts a Prefect server, Ray or trains (these fixtures), or indexes lm-eval's tasks, is `slow`:
# `make test-fast` leaves it out
SLOW_FIXTURES = {"prefect_server", "local_ray", "data_ref", "stage_b4", "task_manager"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# a short Ray Train stage: enough steps to learn something, few enough for CI (one rate for every stage,
# replacing the tiny recipe's per-stage schedule)
SHORT = {"train.merge_steps": "40", "train.distill_steps": "8", "train.base_steps": "24", "train.lr": "1e-3",
         "train.checkpoint_every": "8", "train.batch_size": "16", "train.warmup_steps": "4"}


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

    from tasks.ray_session import init_ray

    init_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def data_ref(world_dir, tiny_model_dir, tmp_path_factory, local_ray):
    """The small shapes world curated by the real Ray Data flow."""
    from bard_core.recipes import get_recipe
    from tasks.curate import run_curation

    out = tmp_path_factory.mktemp("train_data") / "curated"
    return run_curation({"llava_ov": str(world_dir / "sources/llava_ov"),
                         "finevision": str(world_dir / "sources/finevision")}, out, get_recipe("tiny").data,
                        str(tiny_model_dir), str(world_dir / "benchmarks"))


@pytest.fixture(scope="session")
def stage_b4(data_ref, tiny_model_dir, tmp_path_factory):
    """A B=4 block-diffusion checkpoint made by the Ray Train stage task (`bard train`'s code path)."""
    from tasks.train import checkpoint_ref, run_stage

    out = tmp_path_factory.mktemp("stages") / "B4"
    return run_stage(data_ref, checkpoint_ref(tiny_model_dir), out, "tiny", SHORT, block_size=4, workers=2)


@pytest.fixture(scope="module")
def kit():
    """A tiny Qwen3-VL (random weights), its processor and the mixed-noise spec, per test module."""
    from bard_core.config import ModelConfig
    from bard_core.layout import noise_spec_for
    from bard_core.tiny import build_model, build_processor

    cfg = ModelConfig()
    processor = build_processor(cfg)
    model = build_model(cfg, processor.tokenizer)
    spec = noise_spec_for(processor.tokenizer, "mixed", 0.05)
    return processor, model, spec


def flow_run_logs(state) -> list[str]:
    """The messages of a finished flow run's logs, once they have all reached the server."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    def read() -> list[str]:
        with get_client(sync_client=True) as client:
            return [entry.message for entry in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
                any_=[state.state_details.flow_run_id])))]

    deadline = time.monotonic() + 60  # logs reach the server in batches, after the run has ended
    while not any(m.startswith("Finished in state") for m in read()) and time.monotonic() < deadline:
        time.sleep(0.5)  # the run's last line: every line before it was sent in an earlier or the same batch
    return read()
