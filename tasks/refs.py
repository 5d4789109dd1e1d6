"""Small, frozen, JSON-serialisable references passed between tasks (DESIGN.md §2). Standard library only;
the evaluation and gate refs are defined beside the gate that reads them (`bard_core.gate`)."""

from __future__ import annotations

import ast
import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import bard_core.files as files  # a module path, as tests/test_layering.py reads imports

_ROOT = Path(__file__).resolve().parents[1]
_PACKAGES = ("bard_core", "tasks", "flows")  # the project's code, as importable package names
# the decode and gate settings: no curated row or trained weight depends on them (their values are left out too)
EVAL_SETTINGS = ("bard_core.config_eval",)


def _without_prose(source: str) -> str:
    """The code of a module as its syntax tree: comments, docstrings and layout do not count."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value,
                                                                                                   str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree)


def module_file(name: str, root: Path = _ROOT) -> Path | None:
    """The file of project module `name` (a package's ``__init__.py``), or None for any other name."""
    parts = name.split(".")
    if parts[0] not in _PACKAGES:
        return None
    for candidate in (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, name: str) -> set[str]:
    """Every module name `path` (module `name`) imports anywhere in its body, functions included, relative
    imports resolved; for ``from a import b`` both ``a`` and ``a.b`` (b may be a module). Also what
    tests/test_layering.py checks the layers with."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def code_modules(*entries: str, root: Path = _ROOT, skip: tuple[str, ...] = ()) -> list[str]:
    """The project modules that importing `entries` runs: their static imports, transitively, with every
    package ``__init__`` on the way (the import statements of function bodies count: they run when called).
    `skip`: modules whose code cannot change the result; neither they nor what only they import are followed."""
    seen: dict[str, Path] = {}
    todo = list(entries)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # a module's packages are imported before it
            head = ".".join(parts[:i])
            if head not in seen and head not in skip and (path := module_file(head, root)) is not None:
                seen[head] = path
                todo.extend(imported_modules(path, head))
    missing = [e for e in entries if e not in seen]
    if missing:
        raise ValueError(f"no project module {', '.join(missing)} under {root}")
    return sorted(seen)


@functools.cache
def code_version(*entries: str, root: Path = _ROOT, skip: tuple[str, ...] = ()) -> str:
    """Hash of the code that `entries` run (`code_modules`, less `skip`): a change of that code changes the
    fingerprints built on it (and so re-runs the cached curation or stages); a change of a comment or docstring
    does not, nor a change of a module the entries never import (the report's code does not retrain a stage)."""
    h = hashlib.sha256()
    for name in code_modules(*entries, root=root, skip=skip):
        h.update(name.encode())
        h.update(_without_prose(module_file(name, root).read_text()).encode())
    return h.hexdigest()[:12]



@dataclass(frozen=True)
class DatasetRef:
    uri: str  # directory holding data/*.parquet, rejects/*.parquet and manifest.json
    num_rows: int
    fingerprint: str
    counts: dict = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, out: Path, manifest: dict) -> DatasetRef:
        """The ref of a curated directory, after checking its files against the manifest's digests."""
        files.verify(out, manifest.get("files") or {})
        counts = {"rows_in": manifest["rows_in"], "kept": manifest["kept"], "rejected": manifest["rejected"],
                  "rejected_by_reason": manifest["rejected_by_reason"]}
        return cls(str(Path(out).resolve()), manifest["kept"], manifest["fingerprint"], counts)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def verify(self) -> None:
        """Check the directory's files against its manifest before use (`files.CorruptFile` names a bad one)."""
        manifest = Path(self.uri) / "manifest.json"
        if not manifest.exists():
            raise files.CorruptFile(f"{manifest}: missing: {self.uri} is not a complete curated dataset")
        files.verify(self.uri, json.loads(manifest.read_text()).get("files") or {})


@dataclass(frozen=True)
class CheckpointRef:
    uri: str  # an HF model directory with bard.json
    block_size: int | None  # None for an AR checkpoint
    step: int
    parent: str | None
    fingerprint: str


def checkpoint_ref(path: str | Path) -> CheckpointRef:
    """A CheckpointRef for an existing HF directory (bard.json when present, else a content hash)."""
    path = Path(path).resolve()
    meta_file = path / "bard.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        return CheckpointRef(str(path), meta.get("block_size"), meta.get("step", 0), meta.get("parent"),
                             meta["fingerprint"])
    digest = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(f.name.encode())
        digest.update(hashlib.sha256(f.read_bytes()).digest())
    return CheckpointRef(str(path), None, 0, None, digest.hexdigest()[:20])


def resolve_anchor(init: CheckpointRef, anchor: CheckpointRef | None, uses_base: bool,
                   objective: str) -> CheckpointRef | None:
    """The chain's AR base a diffusion stage reads (``TrainConfig.uses_base``: the anchor's targets, or the base's
    answers with ``train.targets=base``), or None without one: `anchor` if given, else the stage's init when that
    is AR (the chain's first stage), else the base its init was trained with (its ``bard.json``), so a chain
    keeps the one AR base from B4 to B32."""
    if objective != "diffusion" or not uses_base:
        if anchor is not None:
            raise ValueError("an anchor was given, but this stage reads no AR base (objective="
                             f"{objective!r}, train.anchor_weight=0 and train.targets=data)")
        return None
    if anchor is None:
        if init.block_size is None:
            anchor = init
        else:
            meta_file = Path(init.uri) / "bard.json"
            recorded = json.loads(meta_file.read_text()).get("anchor") if meta_file.exists() else None
            if recorded is None:
                raise ValueError(f"train.anchor_weight / train.targets=base need the chain's AR base: {init.uri} "
                                 "records no anchor; pass one (bard train --anchor)")
            if not Path(recorded).is_dir():
                raise ValueError(f"the anchor {recorded} recorded by {init.uri} is gone; pass one (bard train --anchor)")
            anchor = checkpoint_ref(recorded)
    if anchor.block_size is not None:
        raise ValueError(f"the anchor must be an AR checkpoint; {anchor.uri} has block size {anchor.block_size}")
    return anchor
