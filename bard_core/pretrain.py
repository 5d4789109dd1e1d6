"""Pre-training the tiny AR base on the shapes world (next-token SFT), with a per-family learning curve.

The world generator supplies fresh conversations (a pool refreshed as training goes, so the model
never memorises scenes); every `eval_every` seconds the model answers a fixed held-out set per
question family greedily and is scored with the benchmarks' own metrics. Checkpoints are HF
directories written atomically (temp dir, then rename) with ``bard_model.json`` describing them.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from bard_core.checkpoint import save_checkpoint, token_ids
from bard_core.config import ModelConfig, TrainConfig
from bard_core.engine import ar_generate_cached
from bard_core.inputs import encode_prompt, encode_sample
from bard_core.layout import ar_batch
from bard_core.shapes import metrics, world
from bard_core.shapes.data import FORMATS, conversations
from bard_core.train import build_optimizer, train_step

TARGETS = {"short": 0.95, "extract_f1": 0.90, "extract_em": 0.60}


def eval_set(seed: int, per_family: int) -> list[tuple[str, dict, str]]:
    """(family, sample, answer) triples, `per_family` of each family, from their own seed."""
    items = []
    for family in metrics.FAMILIES:
        for sample in conversations(per_family, seed=seed * 1000 + len(family), families=[family]):
            answer = sample["messages"][-1]["content"][0]["text"]
            items.append((family, sample, answer))
    return items


def score_families(model, processor, items, max_new_tokens: int = 96, batch_size: int = 32) -> dict[str, float]:
    """Greedy AR answers scored per family; extract reports field F1 and exact match."""
    ids = token_ids(processor.tokenizer, {}, require_mask=False)
    prompts = [encode_prompt(s["messages"][:-1], s.get("images") or [], processor) for _, s, _ in items]
    predictions = []
    for start in range(0, len(prompts), batch_size):  # the engine's AR decoder, as every evaluation here
        for g in ar_generate_cached(model, prompts[start:start + batch_size], max_new_tokens, ids):
            predictions.append(processor.tokenizer.decode(g.token_ids, skip_special_tokens=True))
    totals: dict[str, list[float]] = {}
    for (family, _, answer), prediction in zip(items, predictions):
        fn, names = metrics.FAMILIES[family]
        result = fn({"answer": answer, "image_id": "x"}, [prediction])
        totals.setdefault(family, []).append(float(result[names[0]]))
        if family == "extract":
            totals.setdefault("extract_em", []).append(float(result["exact_match"]))
    return {k: sum(v) / len(v) for k, v in totals.items()}


def meets_targets(scores: dict[str, float]) -> bool:
    short = [scores[f] for f in metrics.FAMILIES if f != "extract"]
    return (min(short) >= TARGETS["short"] and scores["extract"] >= TARGETS["extract_f1"]
            and scores["extract_em"] >= TARGETS["extract_em"])


def pretrain_tiny(out: str | Path, minutes: float | None = None, cfg: ModelConfig | None = None, *,
                  steps: int | None = None, seed: int = 0, batch_size: int = 32, lr: float = 2e-3,
                  warmup_steps: int = 100, eval_every: float = 120.0, eval_every_steps: int | None = None,
                  eval_per_family: int = 40, pool_size: int = 4096, resume: bool = False,
                  family_weights: dict[str, float] | None = None, formats: str = "single", log=print) -> dict:
    """Train for `minutes` of wall time or for `steps` optimizer steps (exactly one); returns the final scores.
    `resume` continues from `out`. Evaluations come every `eval_every` seconds, or every `eval_every_steps`
    steps (a step budget with step cadence does not depend on the machine's load).

    `family_weights` re-weights the question families of the training stream (default
    ``world.FAMILY_WEIGHTS``), e.g. to spend a resumed run on the families still below target. Every
    invocation is appended to ``training_runs`` in ``bard_model.json`` (steps, lr, weights, minutes).
    `formats="sources"` trains on the conversation formats of the synthetic sources (multi-turn,
    image after the question, two-image comparisons; see `conversations`) instead of single turns.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from bard_core.tiny import build_model, build_processor, tokenizer_fingerprint

    if (minutes is None) == (steps is None):
        raise ValueError("pretrain_tiny: give exactly one budget, minutes or steps")
    if (minutes is not None and minutes <= 0) or (steps is not None and steps <= 0) or \
            (eval_every_steps is not None and eval_every_steps <= 0):
        raise ValueError(f"pretrain_tiny: budgets must be positive (minutes={minutes}, steps={steps}, "
                         f"eval_every_steps={eval_every_steps})")
    out = Path(out)
    curve_path = out.with_name(out.name + ".curve.json")
    state = {"steps": 0, "seconds": 0.0, "curve": [], "runs": []}
    weights = world.check_family_weights(dict(world.FAMILY_WEIGHTS if family_weights is None else family_weights))
    if formats not in FORMATS:
        raise ValueError(f"formats={formats!r}: expected one of {', '.join(FORMATS)}")
    if resume and (out / "bard_model.json").exists():
        processor = AutoProcessor.from_pretrained(out)
        model = AutoModelForImageTextToText.from_pretrained(out)
        info = json.loads((out / "bard_model.json").read_text())
        state["steps"], state["seconds"] = info["steps"], info["train_seconds"]
        state["runs"] = info.get("training_runs") or [
            {"from_step": 0, "to_step": info["steps"], "lr": None, "family_weights": None,
             "note": "run before training_runs were recorded"}]
        if curve_path.exists():
            state["curve"] = json.loads(curve_path.read_text())
        cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["model_config"].items()})
    else:
        cfg = cfg or ModelConfig()
        processor = build_processor(cfg)
        model = build_model(cfg, processor.tokenizer)
    torch.manual_seed(seed + state["steps"])
    train_cfg = TrainConfig(lr=lr, vision_lr_scale=1.0, warmup_steps=warmup_steps, batch_size=batch_size)
    optimizer = build_optimizer(model, train_cfg)
    peak_lrs = [group["lr"] for group in optimizer.param_groups]
    pad_id = processor.tokenizer.pad_token_id
    items = eval_set(seed=10_000 + seed, per_family=eval_per_family)
    rng = random.Random(seed * 7 + state["steps"])

    def fresh_pool(k: int) -> list:
        return [encode_sample(s, processor, 512) for s in conversations(pool_size, seed=seed * 100_003 + k,
                                                                 weights=weights, formats=formats)]

    this_run = {"from_step": state["steps"], "to_step": state["steps"], "lr": lr, "batch_size": batch_size,
                "family_weights": weights, "formats": formats, "minutes": minutes, "steps": steps,
                "resumed": bool(resume and state["runs"])}
    state["runs"].append(this_run)
    pool = fresh_pool(state["steps"])
    started, last_eval, losses = time.monotonic(), time.monotonic(), []
    scores: dict[str, float] = {}
    while True:
        elapsed, ran = time.monotonic() - started, state["steps"] - this_run["from_step"]
        progress = ran / steps if steps is not None else elapsed / (minutes * 60)
        done = progress >= 1.0
        due = (ran > 0 and ran % eval_every_steps == 0) if eval_every_steps else \
            time.monotonic() - last_eval >= eval_every
        if done or due:
            scores = score_families(model, processor, items)
            point = {"step": state["steps"], "seconds": round(state["seconds"] + elapsed, 1),
                     "loss": sum(losses) / len(losses) if losses else None, **scores}
            state["curve"].append(point)
            log(json.dumps(point))
            losses, last_eval = [], time.monotonic()
            this_run["to_step"] = state["steps"]
            info = {"family": "tiny", "world_version": world.WORLD_VERSION,
                    "tokenizer_fingerprint": tokenizer_fingerprint(processor.tokenizer),
                    "mask_token": processor.tokenizer.mask_token,
                    "mask_token_id": processor.tokenizer.mask_token_id, "objective": "ar",
                    "steps": state["steps"], "train_seconds": round(state["seconds"] + elapsed, 1),
                    "scores": scores, "meets_targets": meets_targets(scores),
                    "training_runs": state["runs"],
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "model_config": json.loads(json.dumps(cfg.__dict__))}
            save_checkpoint(model, processor, out, info, meta_name="bard_model.json")
            curve_path.write_text(json.dumps(state["curve"], indent=1))
            if done:
                return scores
        # warm-up by steps (also on resume: the optimizer state is new), then cosine over the budget
        factor = min(1.0, (ran + 1) / warmup_steps)
        factor *= 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        for group, peak in zip(optimizer.param_groups, peak_lrs):
            group["lr"] = peak * factor
        batch = ar_batch(rng.sample(pool, batch_size), pad_id)
        metrics_ = train_step(model, batch, optimizer, train_cfg)
        losses.append(metrics_["loss"])
        state["steps"] += 1
        if state["steps"] % 500 == 0:  # fresh scenes: the model never sees one pool for long
            pool = fresh_pool(state["steps"])
