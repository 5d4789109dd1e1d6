"""What a source holds, as one digest: the curation's cache key and the data sensor's signal are the same.

Local sources (a parquet file or directory, ``stream://PATH``) are digested by content (file names and
SHA-256 of their bytes), so the sensor fires exactly when a re-run would curate different data. Hub
sources (``hf://NAME?...``) are digested by the dataset's current revision on the hub.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


class HubUnavailable(ConnectionError):
    """The hub could not be asked (network, rate limit, server error): worth a retry, unlike a bad URI."""


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
    from tasks.curate import parse_stream_uri

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
