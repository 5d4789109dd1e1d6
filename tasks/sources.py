"""Sources: their URIs, their work units and streams for curation, and what they hold as one digest (the
curation's cache key and the data sensor's signal are the same).

Local sources (a parquet file or directory, ``stream://PATH``) are digested by content (file names and
SHA-256 of their bytes), so the sensor fires exactly when a re-run would curate different data. Hub
sources (``hf://NAME?...``) are digested by the dataset's current revision on the hub.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import pyarrow.parquet as pq


class HubUnavailable(ConnectionError):
    """The hub could not be asked (network, rate limit, server error): worth a retry, unlike a bad URI."""


def parse_stream_uri(uri: str) -> dict:
    """``hf://NAME?subsets=a,b&split=train`` (the hub) or ``stream://PATH?split=train`` (local parquet
    read through the same streaming `datasets` path) → its parts."""
    from urllib.parse import parse_qs, urlparse

    parsed = urlparse(uri)
    query = parse_qs(parsed.query)
    name = (parsed.netloc + parsed.path) if parsed.scheme == "hf" else parsed.netloc + parsed.path
    subsets = [s for s in query.get("subsets", [""])[0].split(",") if s] or [None]
    return {"scheme": parsed.scheme, "name": name, "subsets": subsets, "split": query.get("split", ["train"])[0]}


def source_units(kind: str, uri: str) -> list[dict]:
    """Work units of a source. Local parquet: one per row group, with the row offset in its subset
    (a directory holds subsets as sub-directories or files; a file is one subset). Streams
    (``hf://`` or ``stream://``): one unit per subset, read through `datasets` streaming."""
    if uri.startswith(("hf://", "stream://")):
        spec = parse_stream_uri(uri)
        if spec["scheme"] == "stream":
            root = Path(spec["name"])
            subsets = sorted({f.parent.name for f in root.rglob("*.parquet")}) if root.is_dir() else [root.stem]
            return [{"kind": kind, "subset": s, "stream": spec["scheme"], "name": str(root.resolve()),
                     "split": spec["split"], "file": "", "row_group": -1, "offset": 0, "rows": -1} for s in subsets]
        return [{"kind": kind, "subset": s or "default", "stream": "hf", "name": spec["name"], "split": spec["split"],
                 "file": "", "row_group": -1, "offset": 0, "rows": -1} for s in spec["subsets"]]
    path = Path(uri)
    if not path.exists():
        raise ValueError(f"source {kind}={uri}: no such file or directory (hub ids use hf://NAME)")
    if path.is_file():
        groups = {path.stem: [path]}
    else:
        groups = {}
        for f in sorted(path.rglob("*.parquet")):
            subset = f.parent.name if f.parent != path else f.stem
            groups.setdefault(subset, []).append(f)
    units = []
    for subset, files in sorted(groups.items()):
        offset = 0
        for f in files:
            meta = pq.ParquetFile(f).metadata
            for rg in range(meta.num_row_groups):
                units.append({"kind": kind, "subset": subset, "stream": "", "name": "", "split": "",
                              "file": str(f.resolve()), "row_group": rg, "offset": offset,
                              "rows": meta.row_group(rg).num_rows})
                offset += meta.row_group(rg).num_rows
    return units


def _parquet_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(path.rglob("*.parquet"))


def check_source(kind: str, uri: str, required: dict[str, tuple[str, ...]]) -> None:
    """A source-level error before any work, as one ValueError line: no such path, a file that is not
    parquet, no rows, a schema without `required[kind]`'s columns (naming the kind it looks like), or files
    of different schemas in one source. Row-level problems stay rows with reasons. A hub id is checked
    when the hub can be asked (an unknown one is an error; an unreachable hub is not decided here)."""
    if uri.startswith("hf://"):
        with contextlib.suppress(HubUnavailable):  # an unreachable hub is decided by the read (it retries)
            hub_revision(parse_stream_uri(uri)["name"])
        return
    path = Path(parse_stream_uri(uri)["name"]) if uri.startswith("stream://") else Path(uri)
    where = f"source {kind}={uri}"
    if not path.exists():
        raise ValueError(f"{where}: no such file or directory (hub ids use hf://NAME)")
    files = _parquet_files(path)
    if not files:
        raise ValueError(f"{where}: no parquet files under it")
    schemas, rows = {}, 0
    for f in files:
        try:
            meta = pq.ParquetFile(f).metadata
        except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError for non-parquet bytes
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{where}: {f} is not a readable parquet file ({reason})") from None
        schemas.setdefault(tuple(meta.schema.to_arrow_schema().names), []).append(f)
        rows += meta.num_rows
    if len(schemas) > 1:
        (a, fa), (b, fb) = list(schemas.items())[:2]
        raise ValueError(f"{where}: files of different schemas in one source: {fa[0].name} has {list(a)}, "
                         f"{fb[0].name} has {list(b)}")
    (names,) = schemas
    missing = [c for c in required[kind] if c not in names]
    if missing:
        like = [k for k, cols in required.items() if k != kind and all(c in names for c in cols)]
        hint = f"; it looks like a {like[0]} source ({like[0]}=...)" if like else ""
        raise ValueError(f"{where}: not a {kind} source: expected columns {list(required[kind])}, found "
                         f"{list(names)}{hint}")
    if rows == 0:
        raise ValueError(f"{where}: the source holds no rows")


def open_stream(unit: dict):
    """The rows of a streamed subset, as an iterable of dicts (hub or local parquet via `datasets`)."""
    from datasets import load_dataset

    if unit["stream"] == "hf":
        subset = None if unit["subset"] == "default" else unit["subset"]
        return load_dataset(unit["name"], subset, split=unit["split"], streaming=True)
    root = Path(unit["name"])
    files = sorted(str(f) for f in (root.rglob("*.parquet") if root.is_dir() else [root])
                   if not root.is_dir() or f.parent.name == unit["subset"])
    return load_dataset("parquet", data_files={unit["split"]: files}, split=unit["split"], streaming=True)


def path_digest(root: Path) -> str:
    """SHA-256 over the relative names and bytes of every file under `root` (or of `root` itself)."""
    h = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(root) if f != root else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def hub_revision(name: str) -> str:
    """The commit sha of a hub dataset's default branch."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        return HfApi().dataset_info(name).sha
    except RepositoryNotFoundError:
        raise ValueError(f"hf://{name}: no such dataset on the hub (or it is private)") from None
    except OfflineModeIsEnabled:
        raise HubUnavailable(f"hf://{name}: the hub is off (HF_HUB_OFFLINE is set); cannot read its revision") from None
    except (HfHubHTTPError, OSError) as exc:
        raise HubUnavailable(f"hf://{name}: {exc}") from exc


def source_digest(uri: str) -> str:
    """One source URI → a digest that changes exactly when its data does."""
    if uri.startswith("hf://"):
        return "hf:" + hub_revision(parse_stream_uri(uri)["name"])
    path = Path(parse_stream_uri(uri)["name"]) if uri.startswith("stream://") else Path(uri)
    if not path.exists():
        raise ValueError(f"source {uri}: no such file or directory")
    return "sha256:" + path_digest(path)


def sources_digest(sources: dict[str, str]) -> dict[str, str]:
    return {kind: source_digest(uri) for kind, uri in sorted(sources.items())}


def retry_on_hub_io(task, task_run, state) -> bool:
    """Prefect retry condition: retry a task only when it failed on hub I/O, never on a deterministic error
    (a bad URI, a wrong schema, a bug: retrying repeats it)."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classified below
        return transient(exc)
    return False


def transient(exc: BaseException) -> bool:
    """Network trouble (ours, or from the HTTP clients under `datasets` / `huggingface_hub`)."""
    return isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__module__.split(".")[0] in {
        "httpx", "httpcore", "requests", "urllib3", "aiohttp"}
