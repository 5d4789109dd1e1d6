"""The promotion registry: atomic, locked, and untouched by anything but a passed gate."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from bard_core import files
from bard_core.gate import EvalReport, GateResult
from tasks import registry

REPORT = EvalReport("ckpt", "diffusion", {"threshold": 0.7}, {"mcq": 0.9}, speed={"benchmark": "extract", "tpf": 2.5})


def _candidate(path: Path, fingerprint: str) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(os.urandom(256))
    (path / "config.json").write_text("{}")
    (path / "bard.json").write_text(json.dumps({"fingerprint": fingerprint, "block_size": 4, "label_shift": True}))
    return path


def _passed(stage: str = "B4", threshold: float = 0.7) -> GateResult:
    return GateResult(stage, True, (), decode={"engine": "diffusion", "threshold": threshold, "block_size": 4})


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_promotion_copies_the_stage_with_its_decode_setting_and_records_it(tmp_path):
    candidate = _candidate(tmp_path / "run" / "B4", "abc")
    entry = registry.promote(tmp_path / "reg", "tiny", _passed(), candidate, REPORT, block_size=4, run="r1")
    promoted = Path(entry["uri"])
    assert promoted.parent == (tmp_path / "reg" / "tiny").resolve() and promoted.name == "B4-abc"
    meta = json.loads((promoted / "bard.json").read_text())
    assert meta["decode"]["threshold"] == 0.7 and meta["label_shift"] is True and meta["promoted"]["run"] == "r1"
    assert os.path.samefile(promoted / "model.safetensors", candidate / "model.safetensors")  # weights linked
    assert json.loads((candidate / "bard.json").read_text()).get("decode") is None  # the candidate is not changed
    state = registry.read(tmp_path / "reg", "tiny")
    assert [e["stage"] for e in state["history"]] == ["B4"] and state["current"]["B4"]["uri"] == entry["uri"]
    assert state["latest"]["speed"]["tpf"] == 2.5 and registry.recipes(tmp_path / "reg") == ["tiny"]


def test_a_failed_gate_is_refused_and_leaves_the_registry_byte_identical(tmp_path):
    root = tmp_path / "reg"
    registry.promote(root, "tiny", _passed(), _candidate(tmp_path / "a", "a1"), REPORT)
    before = _snapshot(root)
    with pytest.raises(ValueError, match="did not pass"):
        registry.promote(root, "tiny", GateResult("B8", False, ("mcq too low",)), _candidate(tmp_path / "b", "b1"),
                         REPORT)
    assert _snapshot(root) == before


def test_a_failure_between_write_and_rename_keeps_the_previous_promotion(tmp_path, monkeypatch):
    root = tmp_path / "reg"
    registry.promote(root, "tiny", _passed("B4"), _candidate(tmp_path / "a", "a1"), REPORT)
    promoted_json = (root / "tiny" / registry.PROMOTED).read_bytes()
    real_replace = os.replace

    def crash_on_promoted_json(src, dst):
        if str(dst).endswith(registry.PROMOTED):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(registry.os, "replace", crash_on_promoted_json)
    with pytest.raises(files.WriteFailed, match="disk full"):
        registry.promote(root, "tiny", _passed("B8"), _candidate(tmp_path / "b", "b1"), REPORT)
    assert (root / "tiny" / registry.PROMOTED).read_bytes() == promoted_json
    assert [e["stage"] for e in registry.read(root, "tiny")["history"]] == ["B4"]


def _promote_in_a_process(root: str, candidate: str, stage: str, start) -> None:
    start.wait()
    registry.promote(root, "tiny", _passed(stage), candidate, REPORT, run=stage)


def test_concurrent_promotions_both_land_in_the_history_in_order(tmp_path):
    root = tmp_path / "reg"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    workers = [ctx.Process(target=_promote_in_a_process,
                           args=(str(root), str(_candidate(tmp_path / s, s)), s, start)) for s in ("B4", "B8", "B16")]
    for w in workers:
        w.start()
    start.set()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    history = registry.read(root, "tiny")["history"]
    assert sorted(e["stage"] for e in history) == ["B16", "B4", "B8"]
    assert [e["time"] for e in history] == sorted(e["time"] for e in history)
    assert all(Path(e["uri"], "bard.json").exists() for e in history)
    assert not list((root / "tiny").glob(".*.tmp"))


def test_the_cache_and_registry_lock_makes_a_second_process_wait(tmp_path):
    import subprocess
    import sys
    import time

    from tasks.locks import locked

    lock, held, released = tmp_path / "entry.lock", tmp_path / "held", tmp_path / "released"
    child = subprocess.Popen([sys.executable, "-c", (
        "import pathlib, time\nfrom tasks.locks import locked\n"
        f"with locked(pathlib.Path({str(lock)!r})):\n"
        f"    pathlib.Path({str(held)!r}).touch(); time.sleep(1.0); pathlib.Path({str(released)!r}).touch()\n")])
    while not held.exists() and child.poll() is None:
        time.sleep(0.05)
    with locked(lock):
        assert released.exists()  # we got the lock only after the holder's body had finished
    assert child.wait(30) == 0


def test_the_code_version_follows_code_not_comments_or_docstrings(tmp_path):
    from tasks.refs import code_version

    module = tmp_path / "tasks" / "m.py"
    module.parent.mkdir()
    (module.parent / "__init__.py").write_text("")

    def version(text: str) -> str:
        module.write_text(text)
        return code_version.__wrapped__("tasks.m", root=tmp_path)

    plain = version("def f(x):\n    return x + 1\n")
    assert version('"""A module."""\n# why\ndef f(x):\n    """Add one."""\n    return x + 1  # one\n') == plain
    assert version("def f(x):\n    return x + 2\n") != plain
    assert version("def f(x):\n    return 'x + 1'\n") != plain  # a string that is code, not a docstring


def test_the_code_version_covers_what_an_entry_imports_and_nothing_else(tmp_path):
    from tasks.refs import code_modules, code_version

    files_ = {"bard_core/__init__.py": "from bard_core import reg\n", "bard_core/reg.py": "X = 1\n",
              "bard_core/sub/__init__.py": "", "bard_core/sub/deep.py": "Y = 1\n",
              "tasks/__init__.py": "", "tasks/report.py": "from tasks.train import run\n",
              "tasks/helper.py": "Z = 1\n", "tasks/other.py": "W = 1\n",
              "tasks/train.py": "import os\n\ndef run():\n    from .helper import Z\n"
                                "    from bard_core.sub import deep\n    return Z\n"}
    for name, text in files_.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)

    def version() -> str:
        return code_version.__wrapped__("tasks.train", root=tmp_path)

    # imports inside functions, relative imports, `from pkg import module` and every package __init__ on the way
    assert code_modules("tasks.train", root=tmp_path) == [
        "bard_core", "bard_core.reg", "bard_core.sub", "bard_core.sub.deep", "tasks", "tasks.helper", "tasks.train"]
    before = version()
    (tmp_path / "tasks/report.py").write_text("from tasks.train import run\nR = 2\n")  # imports train; not imported
    (tmp_path / "tasks/other.py").write_text("W = 2\n")
    assert version() == before
    for changed in ("bard_core/reg.py", "bard_core/sub/deep.py", "tasks/helper.py"):
        (tmp_path / changed).write_text("CHANGED = 3\n")
        assert version() != before, changed
        before = version()
    with pytest.raises(ValueError, match="no project module tasks.gone"):
        code_modules("tasks.gone", root=tmp_path)
    # a skipped module is not followed: what only it imports is left out, what others import too is kept
    (tmp_path / "tasks/helper.py").write_text("from tasks import other\nfrom bard_core import reg\n")
    assert code_modules("tasks.train", root=tmp_path, skip=("tasks.helper",)) == [
        "bard_core", "bard_core.reg", "bard_core.sub", "bard_core.sub.deep", "tasks", "tasks.train"]


def test_a_change_to_reports_decoders_gates_or_ablation_code_keeps_the_cached_curation_and_stages():
    from tasks.refs import EVAL_SETTINGS, code_modules
    from tasks.train import STAGE_CODE_SKIP

    # the modules tasks/train.py and tasks/curate.py fingerprint
    stage, curation = code_modules("tasks.train", skip=STAGE_CODE_SKIP), code_modules("tasks.curate", skip=EVAL_SETTINGS)
    for trains in ("tasks.train_worker", "bard_core.train", "bard_core.layout", "bard_core.noise", "bard_core.losses",
                   "bard_core.masks", "tasks.base_targets", "bard_core.processor", "bard_core.config",
                   "bard_core.engine"):  # the AR decoding of the base's answers as targets
        assert trains in stage
    for builds in ("bard_core.curation.filters", "bard_core.curation.dedup", "tasks.sources"):
        assert builds in curation
    for reads in ("tasks.report", "tasks.ablation_report", "bard_core.ablations", "flows.pipeline", "bard_core.decode",
                  "bard_core.speculative", "bard_core.gate", "bard_core.config_eval", "bard_core.pretrain",
                  "bard_core.static_kv", "tasks.train_progress"):
        assert reads not in stage and reads not in curation
