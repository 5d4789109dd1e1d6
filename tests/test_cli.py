"""The `bard` command line: real subprocesses, exit codes, one-line errors, --json output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BARD = [sys.executable, "-m", "flows.cli"]
ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*BARD, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for command in ("demo", "synth", "tiny-model"):
        assert command in out.stdout


def test_bad_arguments_give_one_line_and_exit_2():
    for args in (("synth",), ("nonsense",), ("synth", "--out", "x", "--size", "3"),
                 ("tiny-model", "--out", "x", "--set", "hidden_size"),
                 ("tiny-model", "--out", "x", "--set", "nope=1"),
                 ("tiny-model", "--out", "x", "--set", "num_key_value_heads=3")):
        out = run(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, (args, out.stderr)
        assert out.stdout == ""


def test_demo_says_what_is_not_built_and_fails():
    out = run("demo", "--json")
    assert out.returncode != 0
    result = json.loads(out.stdout)
    assert result["ok"] is False and "curate" in result["not_built"]
    text = run("demo")
    assert "NOT BUILT" in text.stdout and text.returncode != 0


def test_synth_and_tiny_model_work_offline(tmp_path):
    out = run("synth", "--out", str(tmp_path / "w"), "--size", "20", "--bench-size", "4", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result["benchmarks"]) == {"shapes_mcq", "shapes_yesno", "shapes_count", "shapes_ocr", "shapes_extract"}
    assert (tmp_path / "w" / "planted.json").exists()
    out = run("tiny-model", "--out", str(tmp_path / "m"), "--set", "hidden_size=64", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["parameters"] > 0 and (tmp_path / "m" / "model.safetensors").exists()
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 64
