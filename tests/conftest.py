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
