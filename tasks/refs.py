"""Small, frozen, JSON-serialisable references passed between tasks (DESIGN.md §2). Standard library only."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

_PACKAGES = [Path(__file__).resolve().parents[1] / p for p in ("bard_core", "tasks")]


def _code_version() -> str:
    """Content hash of the project's Python sources: a change of code changes every fingerprint."""
    h = hashlib.sha256()
    for root in _PACKAGES:
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root.parent)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


CODE_VERSION = _code_version()


@dataclass(frozen=True)
class DatasetRef:
    uri: str  # directory holding data/*.parquet, rejects/*.parquet and manifest.json
    num_rows: int
    fingerprint: str
    counts: dict = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, out: Path, manifest: dict) -> DatasetRef:
        counts = {"rows_in": manifest["rows_in"], "kept": manifest["kept"], "rejected": manifest["rejected"],
                  "rejected_by_reason": manifest["rejected_by_reason"]}
        return cls(str(Path(out).resolve()), manifest["kept"], manifest["fingerprint"], counts)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class CheckpointRef:
    uri: str  # an HF model directory with bard.json
    block_size: int | None  # None for an AR checkpoint
    step: int
    parent: str | None
    fingerprint: str


@dataclass(frozen=True)
class EvalReport:
    checkpoint: str
    scores: dict
    speed: dict
    decode: dict


@dataclass(frozen=True)
class GateResult:
    stage: str
    passed: bool
    reasons: tuple[str, ...]
    promoted_uri: str | None
