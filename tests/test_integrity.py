"""Checksums where bytes matter, and writes that land whole or not at all (docs/reliability.md): every
checkpoint and curated dataset records its files' sha256 in its manifest, readers verify before use, and a
write that fails (here: a real file-size limit, the kernel's EFBIG, as a full disk fails it) leaves the
previous state as it was."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bard_core import checkpoint, files
from tasks import registry
from tasks.refs import DatasetRef
from tests.test_registry import REPORT, _passed

ROOT = Path(__file__).resolve().parents[1]


def _flip_byte(path: Path, offset: int = -100) -> None:
    time.sleep(0.05)  # file timestamps are coarse: a change within one tick would keep the mtime
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    """A checkpoint written by `save_checkpoint`, with a training state, as a stage's worker writes it."""
    model, processor, _ = checkpoint.load(tiny_model_dir)
    out = tmp_path_factory.mktemp("ckpt") / "B4"
    checkpoint.save_checkpoint(model, processor, out, {"block_size": 4, "fingerprint": "f1", "step": 8},
                               training_state={"phase": "merge", "optimizer": {"lr": 1e-3}})
    return out


def test_a_checkpoint_records_every_files_digest_and_a_changed_byte_is_refused_naming_the_file(saved, tmp_path):
    meta = checkpoint.read_meta(saved)
    on_disk = sorted(p.name for p in saved.iterdir() if p.name != checkpoint.META)
    assert sorted(meta["files"]) == on_disk and "model.safetensors" in on_disk and checkpoint.TRAINING_STATE in on_disk
    assert meta["files"]["model.safetensors"] == files.sha256(saved / "model.safetensors")
    assert checkpoint.read_training_state(saved / checkpoint.TRAINING_STATE)["phase"] == "merge"

    copy = tmp_path / "B4"
    shutil.copytree(saved, copy)
    _flip_byte(copy / "model.safetensors")
    with pytest.raises(files.CorruptFile, match=r"B4/model\.safetensors: sha256 .* manifest records"):
        checkpoint.load(copy)
    with pytest.raises(files.CorruptFile, match="model.safetensors"):  # a resume reads nothing of it either
        checkpoint.read_training_state(copy / checkpoint.TRAINING_STATE)


def test_a_torn_checkpoint_missing_or_cut_short_is_never_loaded(saved, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(saved, cut)
    with open(cut / "model.safetensors", "r+b") as fh:  # a copy that stopped half way
        fh.truncate((cut / "model.safetensors").stat().st_size // 2)
    with pytest.raises(files.CorruptFile, match=r"cut/model\.safetensors: sha256"):
        checkpoint.load(cut)
    gone = tmp_path / "gone"
    shutil.copytree(saved, gone)
    (gone / "tokenizer.json").unlink()
    with pytest.raises(files.CorruptFile, match=r"gone/tokenizer\.json: missing"):
        checkpoint.load(gone)


def test_a_finished_stage_drops_its_training_state_and_its_digest(saved, tmp_path):
    copy = tmp_path / "B4"
    shutil.copytree(saved, copy)
    checkpoint.drop_training_state(copy)
    assert not (copy / checkpoint.TRAINING_STATE).exists()
    assert checkpoint.TRAINING_STATE not in checkpoint.read_meta(copy)["files"]
    assert checkpoint.verify(copy)["fingerprint"] == "f1"


def test_promotion_verifies_the_candidate_and_keeps_its_digests(saved, tmp_path):
    entry = registry.promote(tmp_path / "reg", "tiny", _passed(), saved, REPORT)
    promoted = Path(entry["uri"])
    assert checkpoint.verify(promoted)["files"] == {k: v for k, v in checkpoint.read_meta(saved)["files"].items()
                                                    if k != checkpoint.TRAINING_STATE}
    changed = tmp_path / "changed"
    shutil.copytree(saved, changed)
    _flip_byte(changed / "config.json", offset=-3)
    before = _snapshot(tmp_path / "reg")
    with pytest.raises(files.CorruptFile, match=r"changed/config\.json"):  # not the bytes the gate measured
        registry.promote(tmp_path / "reg", "tiny", _passed("B8"), changed, REPORT)
    assert _snapshot(tmp_path / "reg") == before


def test_a_curated_dataset_records_its_shards_and_every_reader_verifies_them(data_ref, world_dir, tiny_model_dir,
                                                                              tmp_path):
    from bard_core.recipes import get_recipe
    from tasks.curate import run_curation
    from tasks.train import training_dataset

    manifest = json.loads((Path(data_ref.uri) / "manifest.json").read_text())
    shards = sorted(p.relative_to(data_ref.uri).as_posix() for p in Path(data_ref.uri).rglob("*.parquet"))
    assert sorted(manifest["files"]) == shards and any(s.startswith("rejects/") for s in shards)
    copy = tmp_path / "curated"
    shutil.copytree(data_ref.uri, copy)
    ref = DatasetRef.from_manifest(copy, manifest)
    shard = next(p for p in sorted((copy / "data").glob("*.parquet")))
    _flip_byte(shard, offset=len(shard.read_bytes()) // 2)
    with pytest.raises(files.CorruptFile, match=rf"{shard.name}: sha256"):
        ref.verify()
    with pytest.raises(files.CorruptFile, match=shard.name):  # a stage never trains on it
        training_dataset(ref, cache_mb=64)
    sources = {"llava_ov": str(world_dir / "sources/llava_ov"), "finevision": str(world_dir / "sources/finevision")}
    with pytest.raises(files.CorruptFile, match=shard.name):  # nor is the cache entry reused as it is
        run_curation(sources, copy, get_recipe("tiny").data, str(tiny_model_dir), str(world_dir / "benchmarks"))


def _limited(code: str, limit: int, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter whose files cannot grow past `limit` bytes (RLIMIT_FSIZE)."""
    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cwd = tmp_path / "home"
    cwd.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, preexec_fn=cap,
                          timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(cwd),
                                                         "PYTHONDONTWRITEBYTECODE": "1"})  # a capped .pyc is cut short


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(saved, tmp_path):
    out = tmp_path / "ckpts" / "B4"
    shutil.copytree(saved, out)
    before = _snapshot(out)
    code = ("from bard_core import checkpoint\n"
            f"model, processor, _ = checkpoint.load({str(out)!r})\n"
            f"checkpoint.save_checkpoint(model, processor, checkpoint.Path({str(out)!r}), {{'step': 16}})\n")
    done = _limited(code, 1 << 20, tmp_path)  # the 4.8 MB weights cannot be written
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "WriteFailed: could not write checkpoint" in last and str(out) in last and "nothing was replaced" in last
    assert _snapshot(out) == before and checkpoint.verify(out)["step"] == 8
    assert sorted(p.name for p in out.parent.iterdir()) == ["B4"]  # no half-written copy left behind


def test_a_full_disk_while_promoting_keeps_the_registry_as_it_was(saved, tmp_path):
    root = tmp_path / "reg"
    registry.promote(root, "tiny", _passed("B4"), saved, REPORT)
    before = _snapshot(root)
    code = ("from tests.test_registry import REPORT, _passed\nfrom tasks import registry\n"
            f"registry.promote({str(root)!r}, 'tiny', _passed('B8'), {str(saved)!r}, REPORT, run='second')\n")
    done = _limited(code, 300, tmp_path)  # the weights are linked; the metadata files cannot be written
    assert done.returncode != 0
    assert "WriteFailed: could not write" in done.stderr and "File too large" in done.stderr
    assert _snapshot(root) == before
    assert [e["stage"] for e in registry.read(root, "tiny")["history"]] == ["B4"]
    assert not [p for p in (root / "tiny").iterdir() if p.name.endswith((".tmp", ".old"))]


def test_a_failed_small_write_names_the_file_and_leaves_it_as_it_was(tmp_path):
    target = tmp_path / "state" / "state.json"
    target.parent.mkdir()
    files.write_json(target, {"v": 1})
    code = (f"from bard_core import files\nfiles.write_json({str(target)!r}, {{'v': 'x' * 5000}})\n")
    done = _limited(code, 1000, tmp_path)
    assert f"could not write {target}: File too large; it is as it was" in done.stderr
    assert json.loads(target.read_text()) == {"v": 1} and sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_a_stage_storage_that_cannot_be_trusted_is_started_over_not_resumed(saved, tmp_path, capsys):
    from tasks.train import _discard_unusable_resume

    def storage(name: str, snapshot: str | None = None) -> Path:
        run_dir = tmp_path / name / "stage-f1"
        shutil.copytree(saved, run_dir / "checkpoint_2026-12-02_02-36-02.633875")
        shutil.copytree(saved, run_dir / "checkpoint_2026-12-02_02-37-10.001200")
        (run_dir / "checkpoint_manager_snapshot.json").write_text(snapshot or json.dumps(
            {"latest": f"{run_dir}/checkpoint_2026-12-02_02-37-10.001200",
             "results": [f"{run_dir}/checkpoint_2026-12-02_02-36-02.633875"]}))
        return run_dir

    good = storage("good")
    _discard_unusable_resume(good)
    assert good.is_dir() and capsys.readouterr().out == ""  # a sound one is resumed
    torn = storage("torn", snapshot='{"latest": "/x/checkpoint_2026-12-02_02-37')
    _discard_unusable_resume(torn)
    assert not torn.exists() and "not resumable" in capsys.readouterr().out
    corrupt = storage("corrupt")
    _flip_byte(corrupt / "checkpoint_2026-12-02_02-36-02.633875" / "model.safetensors")
    _discard_unusable_resume(corrupt)
    assert not corrupt.exists() and "model.safetensors: sha256" in capsys.readouterr().out
    gone = storage("gone")
    shutil.rmtree(gone / "checkpoint_2026-12-02_02-37-10.001200")
    _discard_unusable_resume(gone)
    assert not gone.exists() and "missing" in capsys.readouterr().out
