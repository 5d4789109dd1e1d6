"""Bytes on disk that a later reader trusts: directories written under a temporary name and swapped into
place whole, their files' sha256 recorded in the directory's manifest and verified before use.

Every output a run hands on (a curated dataset, a checkpoint, a promoted stage) is written with `staged_dir`:
a crash or a full disk while writing leaves the previous directory untouched, never a half-written one
under the final name. What the promises are and the tests that check them: docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) → digest: each file hashed once per process


class CorruptFile(RuntimeError):
    """A file that is missing or whose bytes differ from the digest its manifest recorded."""


class WriteFailed(RuntimeError):
    """A staged write that did not complete (disk full, file too large, …); the destination is as it was."""


def sha256(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def digests(root: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`, except the top-level names in `exclude`."""
    root = Path(root)
    found = {}
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.relative_to(root).parts[0] not in exclude:
            found[f.relative_to(root).as_posix()] = digest = sha256(f)
            stat = f.stat()
            _VERIFIED[(str(f.resolve()), stat.st_size, stat.st_mtime_ns)] = digest
    return found


def verify(root: str | Path, recorded: dict[str, str]) -> None:
    """Check every file `recorded` names under `root` against its digest; raise CorruptFile naming the first
    that is missing or differs. Files the manifest does not name are not read by anything that trusts it."""
    root = Path(root)
    for name, digest in sorted(recorded.items()):
        path = root / name
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise CorruptFile(f"{path}: missing (its manifest records it): the directory is incomplete") from None
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        found = _VERIFIED.get(key) or sha256(path)
        if found != digest:
            raise CorruptFile(f"{path}: sha256 {found[:16]}… but its manifest records {digest[:16]}…: the file changed "
                              "or was cut short after it was written; rebuild it (or restore it) before use")
        _VERIFIED[key] = found


def write_text(path: str | Path, text: str) -> None:
    """Write a small file whole or not at all: a temporary name, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteFailed(f"could not write {path}: {e.strerror or e}; it is as it was") from e


def write_json(path: str | Path, payload: dict) -> None:
    write_text(path, json.dumps(payload, indent=1, sort_keys=True, default=str))


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the complete directory `tmp` to `out`, replacing what is there. The old one is renamed aside
    first: `out` is at every moment either the old directory, absent, or the new one — never half-deleted."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(out: str | Path, what: str):
    """Yield an empty temporary directory beside `out`; when the body returns, it becomes `out`
    (`replace_dir`). If the body fails, the temporary directory is removed and `out` is left as it was;
    a failed write (OSError, or a library's own I/O error) is raised as WriteFailed naming `what` and `out`.
    Callers that may race hold a lock on `out` (tasks/locks.py): the temporary name is fixed, so a run
    killed mid-write leaves at most one stale copy, which the next write removes."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, WriteFailed) and (isinstance(e, OSError) or _is_io_error(e)):
            raise WriteFailed(f"could not write {what} {out}: {_reason(e)}; nothing was replaced") from e
        raise
    replace_dir(tmp, out)


def _is_io_error(e: BaseException) -> bool:
    """Libraries that write through their own code report a failed write as their own type (safetensors'
    SafetensorError, torch's RuntimeError from its stream writer); their message carries the OS reason."""
    text = str(e)
    return any(s in text for s in ("No space left", "File too large", "Disk quota", "I/O error", "os error", "failed writing file"))


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError):
        return f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
    return str(e).strip().splitlines()[0][:300]
