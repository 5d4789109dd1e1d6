"""What every decoder shares — the left-padded prompt batch, one forward on the KV cache, the context not yet
cached, the stop rule — and the AR baseline (METHOD.md §6).

``ar_generate_cached`` is the AR baseline in the same engine as block diffusion (`bard_core/decode.py`) and the
lossless speculative mode (`bard_core/speculative.py`): same prefill, cache, batching and stop rule, one token per
forward. Tokens are counted up to and including the first EOS; NFE counts every forward a row took part in (the
prefill included, for every decoder). A speed comparison is honest only while they share this module.

Apart from block decoding because training runs it (the base's answers as targets, `tasks/base_targets.py`): a
stage's fingerprint hashes the code training imports, and a change to how stages decode must not retrain them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from bard_core.inputs import EncodedSample
from bard_core.layout import rope_positions
from bard_core.static_kv import StaticKV, new_cache


@dataclass(frozen=True)
class TokenIds:
    mask: int | None  # None only for AR decoding of a model with no mask token (bard_core.checkpoint.token_ids)
    eos: int
    pad: int


@dataclass
class Generation:
    token_ids: list[int]  # up to and including the first EOS (or max_new_tokens)
    tokens: int
    nfe: int
    seconds: float
    edits: int = 0
    steps_per_block: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)  # speculative mode: drafted tokens accepted per step

    @property
    def tpf(self) -> float:
        return self.tokens / max(1, self.nfe)


def decode_device(requested: str | None = None) -> torch.device:
    """Where to decode: ``cuda`` when there is a GPU (``auto``/None), else the CPU; an asked-for device that is
    not here is refused."""
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested}: no CUDA device on this machine")
    return device


def _truncate(cache, length: int) -> None:
    """Drop cached K/V beyond `length` (denoising forwards never keep what they wrote)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


class _Rows:
    """Left-padded prompt batch: ids, M-RoPE positions, which cache slots are real, next text position."""

    def __init__(self, model, prompts: list[EncodedSample], pad_id: int):
        lengths = [p.prompt_ids.numel() for p in prompts]
        L = max(lengths)
        n = len(prompts)
        self.ids = torch.full((n, L), pad_id, dtype=torch.long)
        self.types = torch.zeros(n, L, dtype=torch.long)
        self.positions = torch.zeros(3, n, L, dtype=torch.long)
        self.valid = torch.zeros(n, L, dtype=torch.bool)
        self.next_pos = torch.zeros(n, dtype=torch.long)
        for i, p in enumerate(prompts):
            pos = rope_positions(model, p.prompt_ids, p.prompt_mm_types, p.image_grid_thw)
            s = L - lengths[i]
            self.ids[i, s:], self.types[i, s:], self.positions[:, i, s:] = p.prompt_ids, p.prompt_mm_types, pos
            self.valid[i, s:] = True
            self.next_pos[i] = int(pos.max()) + 1
        pixels = [p.pixel_values for p in prompts if p.pixel_values is not None]
        grids = [p.image_grid_thw for p in prompts if p.image_grid_thw is not None]
        self.pixel_values = torch.cat(pixels) if pixels else None
        self.image_grid_thw = torch.cat(grids) if grids else None


def _prompt_rows_mask(valid: torch.Tensor) -> torch.Tensor:
    """[N, L, L] causal over real prompt tokens; a left-pad row sees only itself."""
    L = valid.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    mask = causal[None] & valid[:, None, :] & valid[:, :, None]
    return mask | (torch.eye(L, dtype=torch.bool)[None] & ~valid[:, :, None])


def _forward(model, cache, ids, positions, cache_valid, new_mask, device, pixel_values=None, image_grid_thw=None,
             mm_types=None, encoded=None):
    """One forward of `ids` [N, q] on top of `cache`; `new_mask` [N, q, q] is the mask among the new tokens.
    `encoded`: the images already encoded (``get_image_features``), in place of `pixel_values`."""
    n, q = ids.shape
    past = cache_valid[:, None, :].expand(n, q, cache_valid.shape[1])
    mask = torch.cat([past, new_mask], dim=2)[:, None]
    if isinstance(cache, StaticKV):  # a GPU's cache: fixed slots, graphed forwards (bard_core/static_kv.py)
        return cache.forward(model, ids, positions, mask, device, pixel_values=pixel_values,
                             image_grid_thw=image_grid_thw, mm_encoder_outputs=None if encoded is None else
                             {"image": encoded}, mm_token_type_ids=mm_types if mm_types is not None else
                             torch.zeros_like(ids))
    if pixel_values is not None:  # the prompts' images are CPU tensors
        pixel_values, image_grid_thw = pixel_values.to(device), image_grid_thw.to(device)
    out = model.model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                      cache=cache, use_cache=cache is not None, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                      mm_encoder_outputs=None if encoded is None else {"image": encoded},
                      mm_token_type_ids=(mm_types if mm_types is not None else torch.zeros_like(ids)).to(device))
    return out.last_hidden_state


def _text_positions(start: torch.Tensor, q: int) -> torch.Tensor:
    pos = start[:, None] + torch.arange(q)[None, :]
    return pos[None].expand(3, -1, -1).clone()


@dataclass
class _Context:
    """Tokens that must precede the current block in the next forward but are not in the cache:
    the prompt before the first forward, a finished block awaiting its (fused) commit, or — without
    a cache — everything committed so far. ``mask`` [N, C, C] is their mask among themselves."""

    ids: torch.Tensor
    positions: torch.Tensor
    types: torch.Tensor
    valid: torch.Tensor
    mask: torch.Tensor

    def select(self, keep: torch.Tensor) -> _Context:
        return _Context(self.ids[keep], self.positions[:, keep], self.types[keep], self.valid[keep], self.mask[keep])

    def then(self, block: torch.Tensor, positions: torch.Tensor) -> _Context:
        """This context followed by a committed block (block rows: all valid context + their own block)."""
        m, c, B = self.ids.shape[0], self.ids.shape[1], block.shape[1]
        top = torch.cat([self.mask, torch.zeros(m, c, B, dtype=torch.bool)], dim=2)
        bottom = torch.cat([self.valid[:, None, :].expand(m, B, c), torch.ones(m, B, B, dtype=torch.bool)], dim=2)
        return _Context(torch.cat([self.ids, block], 1), torch.cat([self.positions, positions], 2),
                        torch.cat([self.types, torch.zeros_like(block)], 1),
                        torch.cat([self.valid, torch.ones_like(block, dtype=torch.bool)], 1), torch.cat([top, bottom], 1))

    @staticmethod
    def block(block: torch.Tensor, positions: torch.Tensor) -> _Context:
        m, B = block.shape
        return _Context(block, positions, torch.zeros_like(block), torch.ones(m, B, dtype=torch.bool),
                        torch.ones(m, B, B, dtype=torch.bool))


def _finished(out: list[Generation], eos: int, limit: int, start: float) -> list[Generation]:
    """Every answer cut after its first EOS (and at `limit`), its token count, and — for rows that never
    finished — the time they ran."""
    for g in out:
        if eos in g.token_ids:
            g.token_ids = g.token_ids[: g.token_ids.index(eos) + 1]
        g.token_ids = g.token_ids[:limit]
        g.tokens = len(g.token_ids)
        if g.seconds == 0.0:
            g.seconds = time.perf_counter() - start
    return out


@torch.no_grad()
def ar_generate_cached(model, prompts: list[EncodedSample], max_new_tokens: int, ids: TokenIds,
                       static: bool | None = None) -> list[Generation]:
    """The AR baseline: greedy next-token decoding with a KV cache, one token per forward (`static`: the
    static cache and CUDA graphs, by default on CUDA: `static_kv.new_cache`)."""
    model.eval()
    device = next(model.parameters()).device
    rows = _Rows(model, prompts, ids.pad)
    n = len(prompts)
    out = [Generation([], 0, 0, 0.0) for _ in range(n)]
    cache = new_cache(model, n, rows.ids.shape[1] + max_new_tokens, static)
    start = time.perf_counter()
    h = _forward(model, cache, rows.ids, rows.positions, torch.zeros(n, 0, dtype=torch.bool),
                 _prompt_rows_mask(rows.valid), device, rows.pixel_values, rows.image_grid_thw, rows.types)
    kept_valid = rows.valid.clone()
    active, next_pos = torch.arange(n), rows.next_pos.clone()
    last = h[:, -1]
    while True:
        logits = model.lm_head(last).float()
        if ids.mask is not None:
            logits[:, ids.mask] = float("-inf")
        token = logits.argmax(dim=-1).cpu()
        for i, t in enumerate(token.tolist()):
            g = out[int(active[i])]
            g.token_ids.append(t)
            g.nfe += 1
        done = torch.tensor([t == ids.eos or len(out[int(active[i])].token_ids) >= max_new_tokens
                             for i, t in enumerate(token.tolist())])
        now = time.perf_counter() - start
        for i in torch.nonzero(done).flatten().tolist():
            out[int(active[i])].seconds = now
        keep = torch.nonzero(~done).flatten()
        if keep.numel() == 0:
            break
        if keep.numel() < active.numel():
            cache.batch_select_indices(keep.to(device))
            kept_valid, token, next_pos, active = kept_valid[keep], token[keep], next_pos[keep], active[keep]
        m = active.numel()
        h = _forward(model, cache, token[:, None], _text_positions(next_pos, 1), kept_valid,
                     torch.ones(m, 1, 1, dtype=torch.bool), device)
        kept_valid = torch.cat([kept_valid, torch.ones(m, 1, dtype=torch.bool)], dim=1)
        next_pos = next_pos + 1
        last = h[:, -1]
    return _finished(out, ids.eos, max_new_tokens, start)
