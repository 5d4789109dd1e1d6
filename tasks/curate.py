"""Curation on Ray Data: read both sources, normalise, filter, deduplicate, decontaminate, mix, write.

Work units are parquet row groups (or chunks of a streamed hub dataset), so every row keeps its
index in its source and image bytes are never shuffled: global decisions (dedup, decontamination,
mixing) are made on a small projection of keys, then joined back by ``sample_id``. Every input row
ends either in the curated parquet or in the rejects parquet with a ``reason``; the manifest
checks ``rows_in = kept + Σ rejected``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task

from bard_core import files
from bard_core.config import DataConfig
from bard_core.curation import dedup
from bard_core.curation.filters import TokenCounter, check_row
from bard_core.curation.normalise import (
    REQUIRED,
    UNIFIED_SCHEMA,
    empty_row,
    missing_columns,
    normalise_rows,
    text_of,
    to_table,
)
from bard_core.curation.policy import (
    DUPLICATES,
    MERGED,
    decide,
    duplicate_clusters,
    merge_gains,
    merged_messages,
)
from tasks.locks import locked
from tasks.ray_session import init_ray
from tasks.refs import EVAL_SETTINGS, DatasetRef, code_version
from tasks.sources import check_source, open_stream, retry_on_hub_io, source_units

KINDS = tuple(REQUIRED)  # the source kinds: one per schema


def _raw(value):
    """`datasets` decodes images to PIL when streaming; curation wants the original bytes back."""
    from PIL import Image

    if isinstance(value, Image.Image):
        import io

        buffer = io.BytesIO()
        value.save(buffer, format=value.format or "PNG")
        return {"bytes": buffer.getvalue(), "path": None}
    if isinstance(value, list):
        return [_raw(v) for v in value]
    return value


def process_stream(unit: dict, cfg: DataConfig, counter, chunk: int = 256):
    kind, subset = unit["kind"], unit["subset"]
    stream = open_stream(unit)
    from datasets import Image as ImageFeature

    for column in ("image", "images"):  # keep the original encoded bytes instead of decoded PIL images
        feature = (stream.features or {}).get(column)
        if isinstance(feature, ImageFeature):
            stream = stream.cast_column(column, ImageFeature(decode=False))
        elif feature is not None and isinstance(getattr(feature, "feature", None), ImageFeature):
            stream = stream.cast_column(column, type(feature)(ImageFeature(decode=False)))
    rows, offset = [], 0
    for row in stream:
        rows.append({k: _raw(v) for k, v in row.items()})
        if len(rows) == chunk:
            yield to_table([check_row(r, cfg, counter) for r in normalise_rows(rows, kind, subset, offset)])
            offset, rows = offset + len(rows), []
    if rows:
        yield to_table([check_row(r, cfg, counter) for r in normalise_rows(rows, kind, subset, offset)])


def process_unit(unit: dict, cfg: DataConfig, counter) -> pa.Table:
    """Read one row group (or a whole streamed subset) and return its unified rows (`reason` where rejected)."""
    if unit.get("stream"):
        tables = list(process_stream(unit, cfg, counter))
        return pa.concat_tables(tables) if tables else UNIFIED_SCHEMA.empty_table()
    kind, subset, offset = unit["kind"], unit["subset"], unit["offset"]
    parquet = pq.ParquetFile(unit["file"])
    missing = missing_columns(kind, parquet.schema_arrow.names)
    source = f"{kind}/{subset}"
    if missing:  # every row of the file is rejected; keep its id when the file has one
        names = parquet.schema_arrow.names
        ids = (parquet.read_row_group(unit["row_group"], columns=["id"]).column("id").to_pylist()
               if kind == "llava_ov" and "id" in names else [None] * unit["rows"])
        return to_table([empty_row(source, str(i if i is not None else offset + k), offset + k,
                                   f"missing_column:{missing[0]}") for k, i in enumerate(ids)])
    rows = parquet.read_row_group(unit["row_group"]).to_pylist()
    out = [check_row(r, cfg, counter) for r in normalise_rows(rows, kind, subset, offset)]
    return to_table(out)


class _UnitProcessor:
    """Ray Data actor: loads the processor once, then turns unit rows into unified rows."""

    def __init__(self, cfg: DataConfig, processor_path: str):
        self.cfg, self.counter = cfg, TokenCounter(processor_path)

    def __call__(self, batch: dict) -> pa.Table:
        units = [dict(zip(batch, values)) for values in zip(*batch.values())]
        return pa.concat_tables([process_unit(u, self.cfg, self.counter) for u in units])


def _question(messages: list[dict]) -> str:
    users = [m for m in messages if m["role"] == "user"]
    return text_of(users[-1]) if users else ""


def benchmark_contamination(benchmarks_dir: str | None, cfg: DataConfig, train_questions: list[str],
                            names: tuple[str, ...] | None = None) -> dedup.Contamination:
    """Image keys, questions and item names ("task:id") of every gate benchmark under `benchmarks_dir`
    (<name>/test.parquet)."""
    from io import BytesIO

    from PIL import Image

    hashes, colours, questions, items = [], [], [], []
    if benchmarks_dir:
        for path in sorted(Path(benchmarks_dir).glob("*/test.parquet")):
            if names and path.parent.name not in names:
                continue
            columns = ["image", "question"] + (["id"] if "id" in pq.read_schema(path).names else [])
            for k, row in enumerate(pq.read_table(path, columns=columns).to_pylist()):
                image = Image.open(BytesIO(row["image"]["bytes"]))
                hashes.append(dedup.phash64(image))
                colours.append(dedup.colour_signature(image))
                questions.append(row["question"])
                items.append(f"{path.parent.name}:{row.get('id', k)}")
    common = dedup.common_ngrams(train_questions, cfg.ngram, min_count=3)
    return dedup.Contamination(hashes, colours, questions, items, cfg.phash_threshold, cfg.colour_threshold,
                               cfg.ngram, common)


def _shuffle_keys(sample_ids: list[str], seed: int) -> list[int]:
    """Sort keys that write the kept rows in a pseudo-random order fixed by the rows and the data seed alone: the
    same rows come out in the same order whatever else re-ran the curation (a code change, a moved source), so a
    stage trained again on them sees the same batches (`DataConfig.seed` reorders them).

    Training streams each worker's shard in file order through a small shuffle buffer, so rows written
    source by source made every worker's batches come from one subset for ~50 steps at a time (and a
    stage's last steps from whichever subset came last)."""
    return [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big")
            for i in sample_ids]


def _beyond_content(uri: str) -> str:
    """What of a source's URI its content digest does not cover: a hub name (the digest is its revision) or a
    stream's options. Not a local path: moved or copied sources keep their curation and the stages on it."""
    if uri.startswith("hf://"):
        return uri
    return "stream://?" + urlparse(uri).query if uri.startswith("stream://") else "local"


def _fingerprint(sources: dict[str, str], benchmarks_dir: str | None, cfg: DataConfig, processor_path: str) -> str:
    from tasks.sources import path_digest, sources_digest

    inputs = {"cfg": cfg.__dict__, "code": code_version("tasks.curate", skip=EVAL_SETTINGS), "data": sources_digest(sources),
              "sources": {kind: _beyond_content(uri) for kind, uri in sources.items()},
              "benchmarks": path_digest(Path(benchmarks_dir)) if benchmarks_dir else None,
              "tokenizer": path_digest(Path(processor_path) / "tokenizer.json")}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:20]


def run_curation(sources: dict[str, str], out: str | Path, cfg: DataConfig, processor_path: str,
                 benchmarks_dir: str | None = None, ray_address: str | None = None,
                 workers: int | None = None) -> DatasetRef:
    """Curate `sources` ({"llava_ov": URI, "finevision": URI}) into `out`; returns the DatasetRef."""
    unknown = set(sources) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown source kind(s) {sorted(unknown)}; valid: {', '.join(KINDS)}")
    out = Path(out)
    fingerprint = _fingerprint(sources, benchmarks_dir, cfg, processor_path)

    def finished() -> DatasetRef | None:
        manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
        return DatasetRef.from_manifest(out, manifest) if manifest.get("fingerprint") == fingerprint else None

    if done := finished():
        return done
    # another run curating into the same cache entry: wait for it, then reuse its result
    with locked(out.with_name(out.name + ".lock")):
        return finished() or _curate(sources, out, cfg, processor_path, benchmarks_dir, ray_address, workers,
                                     fingerprint)


def _curate(sources: dict[str, str], out: Path, cfg: DataConfig, processor_path: str, benchmarks_dir: str | None,
            ray_address: str | None, workers: int | None, fingerprint: str) -> DatasetRef:
    import ray
    from ray.data import ActorPoolStrategy

    timings: dict[str, float] = {}
    t0 = time.monotonic()
    init_ray(ray_address)
    units = [u for kind, uri in sources.items() for u in source_units(kind, uri)]
    rows_in = Counter()
    for u in units:  # known up front for parquet files; streams are counted as they are read
        if u["rows"] >= 0:
            rows_in[f"{u['kind']}/{u['subset']}"] += u["rows"]
    size = workers or max(1, min(len(units), os.cpu_count() or 1))
    processed = ray.data.from_items(units).map_batches(
        _UnitProcessor, fn_constructor_args=(cfg, processor_path), batch_size=1, batch_format="numpy",
        compute=ActorPoolStrategy(size=size)).materialize()
    timings["normalise_filter_s"] = time.monotonic() - t0
    streamed = {f"{u['kind']}/{u['subset']}" for u in units if u["rows"] < 0}
    if streamed:
        for r in processed.select_columns(["source"]).iter_rows():
            if r["source"] in streamed:
                rows_in[r["source"]] += 1

    t1 = time.monotonic()
    keys = []
    for batch in processed.select_columns(["sample_id", "source", "order", "images", "messages", "phash", "colour",
                                           "quality", "num_tokens", "reason"]).iter_batches(batch_format="pyarrow"):
        for r in batch.to_pylist():
            text = " ".join(text_of(m) for m in r["messages"])
            quality = r["quality"] or {}
            rated = [v for v in quality.values() if v is not None]
            images = dedup.images_key(r["images"])  # the bytes are hashed once per row
            keys.append({"sample_id": r["sample_id"], "source": r["source"], "order": r["order"],
                         "reason": r["reason"], "exact": dedup.exact_key(text, images),
                         "phash": [int(h) for h in r["phash"]], "colour": list(r["colour"]),
                         "text": dedup.text_key("\n".join(f"{m['role']}: {text_of(m)}" for m in r["messages"])),
                         "rating": min(rated) if rated else 0, "question": _question(r["messages"]),
                         "images": images, "num_tokens": r["num_tokens"] or 0,
                         **({"messages": r["messages"]} if cfg.merge_same_image else {})})
    contamination = benchmark_contamination(benchmarks_dir, cfg, [k["question"] for k in keys if not k["reason"]])
    decisions = decide(keys, cfg, contamination)
    clusters = duplicate_clusters(decisions, keys)
    merges = merge_gains(decisions, keys)
    timings["dedup_decontam_mix_s"] = time.monotonic() - t1

    t2 = time.monotonic()
    decisions_ref = ray.put((decisions, merges))

    def apply(batch: pa.Table) -> pa.Table:
        table, gains = ray.get(decisions_ref) if isinstance(decisions_ref, ray.ObjectRef) else decisions_ref
        ids = batch.column("sample_id").to_pylist()
        if any(i in gains for i in ids):  # merged rows: the leader's turns, then those of the rows merged into it
            messages, tokens = batch.column("messages").to_pylist(), batch.column("num_tokens").to_pylist()
            for n, i in enumerate(ids):
                if i in gains:
                    messages[n] = merged_messages(messages[n], gains[i]["messages"])
                    tokens[n] += gains[i]["tokens"]
            batch = batch.set_column(batch.schema.get_field_index("messages"), "messages",
                                     pa.array(messages, batch.schema.field("messages").type))
            batch = batch.set_column(batch.schema.get_field_index("num_tokens"), "num_tokens",
                                     pa.array(tokens, pa.int64()))
        rejects = [None if r else table.get(i) for i, r in zip(ids, batch.column("reason").to_pylist())]
        reasons = [r if r else (j.reason if j else None) for r, j in zip(batch.column("reason").to_pylist(), rejects)]
        batch = batch.set_column(batch.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))
        duplicate_of = [j.of if j and (j.reason in DUPLICATES or j.reason == MERGED) else None for j in rejects]
        contaminates = [j.of if j and j.reason.startswith("benchmark_") else None for j in rejects]
        return (batch.append_column("duplicate_of", pa.array(duplicate_of, pa.string()))
                .append_column("contaminates", pa.array(contaminates, pa.string()))
                .append_column("shuffle", pa.array(_shuffle_keys(ids, cfg.seed), pa.uint64())))

    final = processed.map_batches(apply, batch_format="pyarrow").materialize()
    with files.staged_dir(out, "curated dataset") as tmp:
        # Arrow-level filters: row-level ones round-trip through Python objects and would pickle phash
        kept = final.map_batches(lambda t: t.filter(pc.is_null(t["reason"])), batch_format="pyarrow")
        rejected = final.map_batches(lambda t: t.filter(pc.is_valid(t["reason"])), batch_format="pyarrow")
        # kept rows in a seeded pseudo-random order (see _shuffle_keys); rejects keep the sources' order
        kept.sort("shuffle").drop_columns(["reason", "duplicate_of", "contaminates", "order", "shuffle"]).repartition(
            max(1, kept.count() // 2000 + 1)).write_parquet(str(tmp / "data"), min_rows_per_file=1000)
        rejected.drop_columns(["shuffle"]).repartition(1).write_parquet(str(tmp / "rejects"))
        timings["write_s"] = time.monotonic() - t2

        kept_by_source = Counter(r["source"] for r in kept.select_columns(["source"]).iter_rows())
        reasons = Counter()
        per_source_reasons: dict[str, Counter] = {}
        for r in rejected.select_columns(["source", "reason"]).iter_rows():
            family = r["reason"].split(":")[0]
            reasons[family] += 1
            per_source_reasons.setdefault(r["source"], Counter())[family] += 1
        n_in, n_kept, n_rej = sum(rows_in.values()), sum(kept_by_source.values()), sum(reasons.values())
        if n_in != n_kept + n_rej:
            raise AssertionError(f"rows lost: {n_in} in, {n_kept} kept + {n_rej} rejected")
        timings["total_s"] = time.monotonic() - t0
        manifest = {
            "fingerprint": fingerprint, "code_version": code_version("tasks.curate", skip=EVAL_SETTINGS), "sources": sources,
            "benchmarks_dir": benchmarks_dir, "data_config": cfg.__dict__, "rows_in": n_in, "kept": n_kept,
            "rejected": n_rej, "rejected_by_reason": dict(sorted(reasons.items())), "duplicate_clusters": clusters,
            "per_source": {s: {"in": rows_in[s], "kept": kept_by_source.get(s, 0),
                               "rejected": dict(per_source_reasons.get(s, {}))} for s in sorted(rows_in)},
            "timings": {k: round(v, 2) for k, v in timings.items()},
        }
        # the manifest is written last, recording every shard's digest: a reader trusts nothing it does not list
        manifest["files"] = files.digests(tmp, exclude=("manifest.json",))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str))
    return DatasetRef.from_manifest(out, manifest)


def default_processor(recipe) -> str:
    """Where the recipe's processor (tokenizer + image processor) comes from, for token estimates."""
    if recipe.model.base == "tiny":
        from bard_core.assets import TINY_BASE

        if (TINY_BASE / "tokenizer.json").exists():
            return str(TINY_BASE)
        raise ValueError("the tiny recipe's shipped base is missing; pass --processor DIR (e.g. `bard tiny-model`)")
    return recipe.model.base


@task(name="curate-sources", task_run_name="curate {out}", retries=2, retry_delay_seconds=30,
      retry_condition_fn=retry_on_hub_io)
def curate_sources(sources: dict[str, str], out: str, recipe_name: str, overrides: dict | None = None,
                   benchmarks_dir: str | None = None, processor: str | None = None) -> DatasetRef:
    """Ray Data curation of the sources into `out` (skipped when the fingerprint is unchanged)."""
    from bard_core.recipes import get_recipe

    recipe = get_recipe(recipe_name, overrides)
    for kind, uri in sorted(sources.items()):  # a whole source of the wrong shape fails here, before any work
        check_source(kind, uri, REQUIRED)
    return run_curation(sources, out, recipe.data, processor or default_processor(recipe), benchmarks_dir,
                        ray_address=recipe.ray_address)
