"""Packed layout [P ‖ clean ‖ noisy] vs vanilla [P ‖ clean ‖ P ‖ noisy]: memory, step time, loss.

Image-heavy samples (one image of `--image-tokens` visual tokens plus text, prompt length P,
response R) run one forward+backward of the block-diffusion CE in both layouts, with the same
noise, side by side (interleaved repetitions). Reported per (P, R):
- activation memory: bytes of the non-parameter tensors autograd saves for backward (exact on any
  device); on CUDA also the peak allocated during the step above the weights;
- median step time; loss of both layouts (they must agree: the mask adds no error);
- token ratio (P+2R)/(2P+2R) of the language model, and the measured activation ratio.
Also the analytic token counts for a Qwen3-VL-4B-sized sample (P≈1,300 with one 1024² image, R=256).

    python -m benchmarks.layout_memory                       # tiny model, CPU
    python -m benchmarks.layout_memory --shape 4b --device cuda   # 4B-shaped, bf16, random weights

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bard_core.config import ModelConfig, NoiseConfig
from bard_core.inputs import EncodedSample
from bard_core.layout import NoiseSpec, pack
from bard_core.losses import diffusion_ce
from bard_core.train import packed_logits, to_device

SPECIALS = {"pad": 0, "im_start": 1, "eos": 2, "vision_start": 3, "vision_end": 4, "image": 5, "video": 6, "mask": 7}


def build_model(shape: str, device: str):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    if shape == "tiny":
        cfg = ModelConfig()
        text = dict(vocab_size=512, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                    num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                    num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                     "mrope_section": list(cfg.mrope_section), "mrope_interleaved": True})
        vision = dict(depth=cfg.vision_depth, hidden_size=cfg.vision_hidden_size, num_heads=cfg.vision_num_heads,
                      intermediate_size=cfg.vision_intermediate_size, out_hidden_size=cfg.hidden_size,
                      num_position_embeddings=256, deepstack_visual_indexes=[])
        dtype = torch.float32
    else:  # Qwen3-VL-4B shapes (random weights)
        text = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                     "mrope_section": [24, 20, 20], "mrope_interleaved": True})
        vision = dict(depth=24, hidden_size=1024, num_heads=16, intermediate_size=4096, out_hidden_size=2560,
                      num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17])
        dtype = torch.bfloat16
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=SPECIALS["image"],
                           video_token_id=SPECIALS["video"], vision_start_token_id=SPECIALS["vision_start"],
                           vision_end_token_id=SPECIALS["vision_end"])
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration(config).to(dtype)
    return model.train(), config


def synthetic_sample(P: int, R: int, image_tokens: int, vocab: int, generator: torch.Generator) -> EncodedSample:
    """A prompt of P tokens holding one square image of `image_tokens` merged tokens, R response tokens."""
    side = int(round(image_tokens ** 0.5))
    assert side * side == image_tokens and P > image_tokens + 8
    text_before, text_after = 3, P - image_tokens - 2 - 3
    ordinary = lambda n: torch.randint(16, vocab, (n,), generator=generator)  # noqa: E731
    prompt = torch.cat([ordinary(text_before), torch.tensor([SPECIALS["vision_start"]]),
                        torch.full((image_tokens,), SPECIALS["image"]), torch.tensor([SPECIALS["vision_end"]]),
                        ordinary(text_after)])
    types = (prompt == SPECIALS["image"]).long()
    grid = torch.tensor([[1, 2 * side, 2 * side]])
    pixels = torch.randn(4 * image_tokens, 3 * 2 * 16 * 16, generator=generator)
    response = torch.cat([ordinary(R - 1), torch.tensor([SPECIALS["eos"]])])
    return EncodedSample(prompt, types, response, pixels, grid)


class SavedActivations:
    """Counts the bytes of distinct non-parameter storages autograd saves during a forward."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, int] = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())


def step(model, batch, device: str, measure: bool):
    """One forward+backward; returns (loss, seconds, saved activation bytes, peak bytes above start)."""
    model.zero_grad(set_to_none=True)
    counter = SavedActivations(model)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start_alloc = torch.cuda.memory_allocated() if device == "cuda" else 0
    t0 = time.perf_counter()
    if measure:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            logits = packed_logits(model, batch)
    else:
        logits = packed_logits(model, batch)
    loss = diffusion_ce(logits, batch.labels, batch.weights, batch.loss_sample, batch.real_lens).loss
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - start_alloc) if device == "cuda" else 0
    return loss.item(), seconds, counter.bytes, peak


def run(args) -> dict:
    torch.manual_seed(0)
    model, config = build_model(args.shape, args.device)
    vocab = config.text_config.vocab_size
    spec = NoiseSpec(kind="mixed", t_min=NoiseConfig().t_min,
                     mask_token_id=SPECIALS["mask"], substitute_ids=torch.arange(16, vocab),
                     eos_id=SPECIALS["eos"], pad_id=SPECIALS["pad"])
    rows = []
    for P, R in args.configs:
        g = torch.Generator().manual_seed(P * 7919 + R)
        samples = [synthetic_sample(P, R, args.image_tokens, vocab, g) for _ in range(args.batch)]
        batches = {}
        for name, duplicate in (("packed", False), ("vanilla", True)):
            b = pack(samples, model, args.block_size, spec, generator=torch.Generator().manual_seed(1),
                     duplicate_prompt=duplicate)
            batches[name] = to_device(b, args.device)
        result = {name: {"loss": None, "times": [], "act": 0, "peak": 0} for name in batches}
        for rep in range(args.reps + 1):  # rep 0 warms up
            for name in ("packed", "vanilla") if rep % 2 else ("vanilla", "packed"):
                loss, seconds, act, peak = step(model, batches[name], args.device, measure=rep == 1)
                if rep == 0:
                    continue
                r = result[name]
                r["loss"] = loss
                r["times"].append(seconds)
                if rep == 1:
                    r["act"] = act
                else:
                    r["peak"] = max(r["peak"], peak)
        tokens = {n: int(b.input_ids.numel()) for n, b in batches.items()}
        rows.append({
            "P": P, "R": R, "batch": args.batch,
            "packed_tokens": tokens["packed"], "vanilla_tokens": tokens["vanilla"],
            "token_ratio": (P + 2 * R) / (2 * P + 2 * R),
            "packed_act_mb": result["packed"]["act"] / 2**20, "vanilla_act_mb": result["vanilla"]["act"] / 2**20,
            "packed_peak_mb": result["packed"]["peak"] / 2**20, "vanilla_peak_mb": result["vanilla"]["peak"] / 2**20,
            "packed_step_s": statistics.median(result["packed"]["times"]),
            "vanilla_step_s": statistics.median(result["vanilla"]["times"]),
            "packed_loss": result["packed"]["loss"], "vanilla_loss": result["vanilla"]["loss"],
        })
        row = rows[-1]
        row["act_ratio"] = row["packed_act_mb"] / row["vanilla_act_mb"]
        row["time_ratio"] = row["packed_step_s"] / row["vanilla_step_s"]
        row["peak_ratio"] = row["packed_peak_mb"] / row["vanilla_peak_mb"] if row["vanilla_peak_mb"] else None
    return {"rows": rows}


def analytic_4b() -> dict:
    image_tokens = (1024 // 32) ** 2  # one 1024² image, 16-px patches merged 2×2
    P, R = 1300, 256
    return {"P": P, "R": R, "image_tokens": image_tokens, "packed_tokens": P + 2 * R,
            "vanilla_tokens": 2 * P + 2 * R, "token_ratio": (P + 2 * R) / (2 * P + 2 * R)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["tiny", "4b"], default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--configs", default="1300:256,600:128,300:64",
                        help="comma-separated P:R pairs (prompt and response lengths)")
    parser.add_argument("--image-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    args.configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")

    out = run(args)
    header = (f"{'P':>5} {'R':>4} {'tok ratio':>9} {'act MB packed':>13} {'vanilla':>8} {'act ratio':>9} "
              f"{'peak ratio':>10} {'step s packed':>13} {'vanilla':>8} {'time ratio':>10} {'loss packed':>11} {'vanilla':>8}")
    print(f"layout memory — shape={args.shape} device={args.device} batch={args.batch} B={args.block_size} "
          f"image_tokens={args.image_tokens}")
    print(header)
    for r in out["rows"]:
        peak = f"{r['peak_ratio']:.3f}" if r["peak_ratio"] is not None else "n/a"
        print(f"{r['P']:>5} {r['R']:>4} {r['token_ratio']:>9.3f} {r['packed_act_mb']:>13.1f} {r['vanilla_act_mb']:>8.1f} "
              f"{r['act_ratio']:>9.3f} {peak:>10} {r['packed_step_s']:>13.3f} {r['vanilla_step_s']:>8.3f} "
              f"{r['time_ratio']:>10.3f} {r['packed_loss']:>11.4f} {r['vanilla_loss']:>8.4f}")
    a = analytic_4b()
    print(f"Qwen3-VL-4B-sized sample (analytic): P={a['P']} ({a['image_tokens']} image tokens), R={a['R']}: "
          f"packed {a['packed_tokens']} tokens vs vanilla {a['vanilla_tokens']} -> token ratio {a['token_ratio']:.3f}")
    first = out["rows"][0]
    use_peak = args.device == "cuda"
    summary = {
        "shape": args.shape, "device": args.device, "metric": "peak_allocated" if use_peak else "saved_activations",
        "packed_peak_mb": first["packed_peak_mb"] if use_peak else first["packed_act_mb"],
        "vanilla_peak_mb": first["vanilla_peak_mb"] if use_peak else first["vanilla_act_mb"],
        "ratio": first["peak_ratio"] if use_peak else first["act_ratio"],
        "act_ratio": first["act_ratio"], "token_ratio": first["token_ratio"],
        "time_ratio": first["time_ratio"], "loss_delta": abs(first["packed_loss"] - first["vanilla_loss"]),
        "analytic_4b": a, "rows": out["rows"],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
