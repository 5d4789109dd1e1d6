"""The shapes benchmarks run directly in the engine (no lm-eval): their items, prompts and per-item scores,
and the AR baseline beside block-diffusion decoding, side by side in one run (`bard bench-decode`,
`benchmarks/decode_speed.py`). The gates evaluate through lm-eval instead (`tasks/evaluate.py`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from bard_core.config import DecodeConfig
from bard_core.decode import TokenIds, ar_generate_cached, generate
from bard_core.inputs import EncodedSample, context_messages, encode_prompt
from bard_core.shapes import metrics

# benchmark -> (per-item scorer, primary metric), from the shapes benchmarks' one table
PRIMARY = {name: (metrics.FAMILIES[family][0], metrics.primary(name)) for name, family in metrics.BENCHMARKS.items()}


def load_items(benchmarks_dir: str | Path, name: str, limit: int | None = None) -> list[dict]:
    """Rows of a shapes benchmark's test parquet (id, image_id, image bytes, question, answer)."""
    if name not in PRIMARY:
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(PRIMARY)}")
    path = Path(benchmarks_dir) / name / "test.parquet"
    if not path.exists():
        raise ValueError(f"{path} not found: run `bard synth` first or pass the right --benchmarks-dir")
    rows = pq.read_table(path).to_pylist()
    return rows[:limit] if limit else rows


def prompts_for(items: list[dict], processor) -> list[EncodedSample]:
    return [encode_prompt(context_messages(item["question"], 1), [item["image"]["bytes"]], processor)
            for item in items]


def _process(name: str, items: list[dict], predictions: list[str]) -> list[dict]:
    fn, _ = PRIMARY[name]
    return [fn(item, [p]) for item, p in zip(items, predictions)]


def _aggregate(name: str, per_item: list[dict]) -> dict[str, float]:
    out = {}
    for key in per_item[0]:
        if key == "acc_plus":
            out[key] = metrics.agg_acc_plus([r[key] for r in per_item])
        else:
            out[key] = sum(r[key] for r in per_item) / len(per_item)
    out["accuracy"] = out[PRIMARY[name][1]]
    return out


def _primary(name: str, per_item: list[dict]) -> list[float]:
    return [float(r[PRIMARY[name][1]]) for r in per_item]


def score_items(name: str, items: list[dict], predictions: list[str]) -> list[float]:
    """The benchmark's primary metric per item (for paired comparisons of two decoders)."""
    return _primary(name, _process(name, items, predictions))


def score(name: str, items: list[dict], predictions: list[str]) -> dict[str, float]:
    return _aggregate(name, _process(name, items, predictions))


@dataclass
class Measured:
    accuracy: dict[str, float]
    tokens: int
    nfe: int
    seconds: float
    edits: int
    per_item: list[float] = field(default_factory=list)  # the primary metric of every item, in order
    outputs: list[list[int]] = field(default_factory=list)  # every item's answer tokens, in order
    accepted: list[int] = field(default_factory=list)  # speculative mode: drafted tokens accepted, every step

    @property
    def tpf(self) -> float:
        return self.tokens / max(1, self.nfe)

    @property
    def tok_s(self) -> float:
        return self.tokens / max(1e-9, self.seconds)


def _decode_text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def run_ar(model, processor, name: str, items: list[dict], prompts, max_new_tokens: int, batch_size: int,
           ids: TokenIds) -> Measured:
    gens, start = [], time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        gens += ar_generate_cached(model, prompts[i:i + batch_size], max_new_tokens, ids)
    seconds = time.perf_counter() - start
    per_item = _process(name, items, [_decode_text(processor.tokenizer, g.token_ids) for g in gens])
    return Measured(_aggregate(name, per_item), sum(g.tokens for g in gens), sum(g.nfe for g in gens), seconds, 0,
                    _primary(name, per_item), [g.token_ids for g in gens])


def run_diffusion(model, processor, name: str, items: list[dict], prompts, cfg: DecodeConfig,
                  ids: TokenIds, verifier=None) -> Measured:
    gens, start = [], time.perf_counter()
    for i in range(0, len(prompts), cfg.batch_size):
        gens += generate(model, prompts[i:i + cfg.batch_size], cfg, ids, verifier=verifier)
    seconds = time.perf_counter() - start
    per_item = _process(name, items, [_decode_text(processor.tokenizer, g.token_ids) for g in gens])
    return Measured(_aggregate(name, per_item), sum(g.tokens for g in gens), sum(g.nfe for g in gens), seconds,
                    sum(g.edits for g in gens), _primary(name, per_item), [g.token_ids for g in gens],
                    [a for g in gens for a in g.accepted])
