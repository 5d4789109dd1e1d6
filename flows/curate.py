"""The curate flow: both sources → curated parquet + rejects + manifest, with a report artifact."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, Field

from tasks.curate import curate_sources
from tasks.refs import DatasetRef


class CurateParams(BaseModel):
    """Shown as a form in the Prefect UI."""

    sources: dict[str, str] = Field(description="source kind → URI: local parquet dir/file, hf://NAME?subsets=a,b"
                                                "&split=train, or stream://DIR", examples=[{"llava_ov": "/data/llava",
                                                                                             "finevision": "/data/fv"}])
    out: str = Field(description="output directory (data/, rejects/, manifest.json)")
    recipe: str = Field("tiny", description="named recipe: tiny, tiny-long, qwen3-vl-2b, qwen3-vl-4b, qwen3-vl-8b")
    overrides: dict[str, str] = Field(default_factory=dict, description="dotted recipe overrides, e.g. data.min_rating")
    benchmarks_dir: str | None = Field(None, description="benchmarks to decontaminate against (<name>/test.parquet)")
    processor: str | None = Field(None, description="processor for token estimates (default: the recipe's model)")


def report_markdown(ref: DatasetRef, params: CurateParams) -> str:
    counts = ref.counts
    lines = [f"# Curation: {ref.num_rows} rows kept", "", f"- output: `{ref.uri}`", f"- fingerprint: `{ref.fingerprint}`",
             f"- rows in: {counts['rows_in']}, kept: {counts['kept']}, rejected: {counts['rejected']}", "",
             "| reason | rows |", "|---|---|"]
    lines += [f"| {reason} | {n} |" for reason, n in sorted(counts["rejected_by_reason"].items())]
    return "\n".join(lines)


@flow(name="curate", log_prints=True)
def curate_flow(params: CurateParams) -> dict:
    ref = curate_sources(params.sources, params.out, params.recipe, params.overrides or None, params.benchmarks_dir,
                         params.processor)
    create_markdown_artifact(report_markdown(ref, params), key="curation-report", description="curation counts")
    create_table_artifact([{"reason": r, "rows": n} for r, n in sorted(ref.counts["rejected_by_reason"].items())],
                          key="curation-rejects", description="rejected rows by reason")
    print(f"curated {ref.num_rows} rows into {ref.uri} (fingerprint {ref.fingerprint})")
    return {"uri": ref.uri, "num_rows": ref.num_rows, "fingerprint": ref.fingerprint, "counts": ref.counts}
