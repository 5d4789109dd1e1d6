"""The promotion registry (DESIGN.md §5): ``<root>/<recipe>/promoted.json`` and one directory per
promoted stage.

``promote`` copies the candidate checkpoint into the registry (weights hard-linked when the file system
allows, ``bard.json`` rewritten with the decode setting the gate chose and the promotion record), then
appends the promotion to ``promoted.json``. Both writes go to a temporary name first and are renamed
into place, under an exclusive lock on ``<root>/<recipe>/.lock``: two runs promoting at once land one
after the other in the history, and a failure before a rename leaves the previous promotion untouched
(a stage directory that never made it into ``promoted.json`` is not a promotion). A failed gate never
calls it, so its registry stays byte-identical.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
from pathlib import Path

from bard_core import files
from bard_core.gate import EvalReport, GateResult
from tasks.locks import locked

PROMOTED = "promoted.json"
TRAINING_STATE = "optimizer.pt"  # bard_core.checkpoint's name; a resume's state is never promoted


def default_root() -> Path:
    return Path(os.environ.get("BARD_REGISTRY", "registry")).resolve()


def _locked(directory: Path):
    return locked(directory / ".lock")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def read(root: str | Path, recipe: str) -> dict:
    """``promoted.json`` of a recipe (an empty history when nothing was promoted yet)."""
    path = Path(root) / recipe / PROMOTED
    return json.loads(path.read_text()) if path.exists() else {"recipe": recipe, "history": [], "current": {}}


def recipes(root: str | Path) -> list[str]:
    root = Path(root)
    return sorted(p.parent.name for p in root.glob(f"*/{PROMOTED}")) if root.is_dir() else []


def promote(root: str | Path, recipe: str, result: GateResult, candidate: str | Path, report: EvalReport,
            baseline: EvalReport | None = None, *, block_size: int | None = None, run: str | None = None) -> dict:
    """Promote a checkpoint that passed its gate; returns the history entry (its ``uri`` is the promoted
    directory). Refuses a failed gate."""
    if not result.passed:
        raise ValueError(f"stage {result.stage} did not pass its gate: {'; '.join(result.reasons)}")
    candidate = Path(candidate).resolve()
    meta = json.loads((candidate / "bard.json").read_text()) if (candidate / "bard.json").exists() else {}
    recorded = {k: v for k, v in (meta.get("files") or {}).items() if k != TRAINING_STATE}
    files.verify(candidate, recorded)  # the bytes the gate measured are the bytes promoted
    directory = Path(root).resolve() / recipe
    with _locked(directory):  # the entry's time is taken under the lock: the history is in time order
        now = datetime.datetime.now(datetime.timezone.utc)
        name = f"{result.stage}-{meta.get('fingerprint') or now.strftime('%Y%m%dT%H%M%S%f')}"
        entry = {"stage": result.stage, "block_size": block_size, "uri": str(directory / name),
                 "source": str(candidate), "fingerprint": meta.get("fingerprint"), "parent": meta.get("parent"),
                 "decode": dict(result.decode), "scores": dict(report.scores),
                 "baseline_scores": dict(baseline.scores) if baseline else None,
                 "speed": {k: report.speed[k] for k in ("benchmark", "tpf", "batch", "speedup") if k in report.speed},
                 "checks": [dataclasses.asdict(c) for c in result.checks],
                 "time": now.isoformat(timespec="milliseconds"), "run": run}
        target = directory / name
        promoted_meta = {**meta, "files": recorded, "decode": dict(result.decode),
                         "promoted": {k: entry[k] for k in ("stage", "source", "time", "run")}}
        if not target.exists():
            with files.staged_dir(target, "promoted stage") as tmp:
                shutil.copytree(candidate, tmp, copy_function=_link_or_copy, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("bard.json", TRAINING_STATE))
                files.write_json(tmp / "bard.json", promoted_meta)
        else:  # the same weights promoted again: its bard.json takes this promotion's decode setting
            files.verify(target, promoted_meta["files"])
            files.write_json(target / "bard.json", promoted_meta)
        state = read(Path(root).resolve(), recipe)
        state["history"].append(entry)
        state["current"][result.stage] = entry
        state["latest"] = entry
        files.write_json(directory / PROMOTED, state)
    return entry
