"""Training batches: the packed block-diffusion layout, the vanilla layout it replaces, and AR batches.

Packed (METHOD.md §2), one row per sample, right-padded to the longest::

    [prompt (P) ‖ clean response x0 (R) ‖ noisy response xt (R)] + padding

``R`` is the response rounded up to a multiple of B with ``<|im_end|>``. M-RoPE positions come
from the model's own ``get_rope_index`` over ``prompt ‖ clean``; the noisy copy reuses the clean
positions. Images live in the prompt, so the vision tower runs once per image.

Loss positions are the corrupted noisy tokens (input ≠ label). Without label shift, noisy position
k predicts x0[k]; with ``label_shift`` the prediction of x0[k] is read one position earlier (the
previous noisy token, or for a block's first token the previous clean token), as an AR head does.

The *vanilla* layout ``[P ‖ clean ‖ P ‖ noisy]`` duplicates the prompt (and its images) for the
noisy branch; it exists to be measured against (``benchmarks/layout_memory.py``) and gives the
same logits at the loss positions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from bard_core.inputs import EncodedSample
from bard_core.masks import CLEAN, NOISY, PROMPT, batch_attention_mask, segments
from bard_core.noise import corrupt

IGNORE = -100


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # long [N, L]
    position_ids: torch.Tensor  # long [3, N, L]
    mm_token_type_ids: torch.Tensor  # long [N, L]
    attention_mask: torch.Tensor  # bool [N, 1, L, L]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    prompt_lens: list[int]
    response_lens: list[int]  # padded to a multiple of block_size
    real_lens: list[int]  # answer + first <|im_end|>
    block_size: int
    prompt_mask: str
    loss_sample: torch.Tensor  # long [K]: which sample each loss position belongs to
    loss_pos: torch.Tensor  # long [K]: where its logits are read
    labels: torch.Tensor  # long [K]: x0 token
    weights: torch.Tensor  # float [K]: 1/t (times pad weight beyond the real response)
    t: torch.Tensor  # float [K]: noise level of the token's block
    duplicated_prompt: bool = False  # True for the vanilla layout
    # precomputed AR anchor targets for the loss positions `ar_exact()` marks, in their order (or None)
    anchor_ids: torch.Tensor | None = None  # [E, k]
    anchor_probs: torch.Tensor | None = None  # [E, k]

    def mask_for(self, block_size: int) -> torch.Tensor:
        """The same sequence under another block size's mask (a distillation teacher's view)."""
        if self.duplicated_prompt:
            raise ValueError("the vanilla layout has one mask only")
        if any(r % block_size for r in self.response_lens):
            raise ValueError(f"responses padded to a multiple of {self.block_size} are not blocks of {block_size}")
        return batch_attention_mask(self.prompt_lens, self.response_lens, self.input_ids.shape[1], block_size,
                                    self.prompt_mask).to(self.input_ids.device)  # built on the CPU

    def ar_exact(self) -> torch.Tensor:
        """Bool [K]: loss positions read from the prompt or the clean copy (with label shift, a block's first
        token). Their context, the prompt and the clean blocks before, is exactly an AR model's."""
        ends = (torch.tensor(self.prompt_lens) + torch.tensor(self.response_lens)).to(self.loss_pos.device)
        return self.loss_pos < ends[self.loss_sample]

    def ar_view(self, keep: torch.Tensor) -> PackedBatch:
        """The ``prompt ‖ clean`` prefix of every row under a causal mask (an AR model's own view, at the
        same positions), with the loss positions `keep` — which must read from that prefix."""
        if self.duplicated_prompt:
            raise ValueError("the vanilla layout has no AR view")
        ends = [p + r for p, r in zip(self.prompt_lens, self.response_lens)]
        if bool((self.loss_pos[keep] >= torch.tensor(ends, device=self.loss_pos.device)[self.loss_sample[keep]]).any()):
            raise ValueError("an AR view's loss positions must lie in the prompt or the clean copy")
        L = max(ends)
        mask = batch_attention_mask(self.prompt_lens, self.response_lens, L, 1, "causal", with_noisy=False)
        return dataclasses.replace(
            self, input_ids=self.input_ids[:, :L], position_ids=self.position_ids[:, :, :L],
            mm_token_type_ids=self.mm_token_type_ids[:, :L], attention_mask=mask.to(self.input_ids.device),
            loss_sample=self.loss_sample[keep], loss_pos=self.loss_pos[keep], labels=self.labels[keep],
            weights=self.weights[keep], t=self.t[keep], block_size=1, prompt_mask="causal", anchor_ids=None,
            anchor_probs=None)

    def label_index(self, label_shift: bool) -> torch.Tensor:
        """Long [K]: the response index r of each loss position's label x0[r] (see `pack` for where it is read)."""
        P = torch.tensor(self.prompt_lens, device=self.loss_pos.device)[self.loss_sample]
        R = torch.tensor(self.response_lens, device=self.loss_pos.device)[self.loss_sample]
        return torch.where(self.loss_pos < P + R, self.loss_pos - P + 1, self.loss_pos - P - R + int(label_shift))

    def ar_teacher_view(self, label_shift: bool) -> PackedBatch:
        """An AR teacher's view of every loss position: the ``prompt ‖ clean`` prefix under a causal mask, each
        label x0[r] read where an AR model predicts it (P + r − 1), in the batch's loss order."""
        P = torch.tensor(self.prompt_lens, device=self.loss_pos.device)[self.loss_sample]
        view = dataclasses.replace(self, loss_pos=P + self.label_index(label_shift) - 1)
        return view.ar_view(torch.ones_like(self.loss_pos, dtype=torch.bool))

    @property
    def num_tokens(self) -> int:
        return sum(p + 2 * r for p, r in zip(self.prompt_lens, self.response_lens))


def rope_positions(model, ids: torch.Tensor, mm_types: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor:
    """M-RoPE positions [3, len] of one unpadded sequence, from the model's own rope-index code."""
    positions, _ = model.model.get_rope_index(ids[None], mm_token_type_ids=mm_types[None], image_grid_thw=grid,
                                               attention_mask=torch.ones(1, ids.numel(), dtype=torch.long))
    return positions[:, 0]


def packed_length(sample: EncodedSample) -> int:
    """A sample's row length in `pack`'s layout, before its response is padded to whole blocks."""
    return sample.prompt_ids.numel() + 2 * sample.response_ids.numel()


def length_grouped(samples: list, batch_size: int, rng) -> list:
    """`samples` reordered so that each run of `batch_size` has similar `packed_length`s: sorted, cut into
    batches, the full batches in random order (`rng`: a `random.Random`), a partial one last. `pack`
    pads every row to the batch's longest, so a random batch of short and long samples is about half
    padding (tiny chain: 48–65% of a batch's tokens were real) and costs as much as a full one."""
    ordered = sorted(samples, key=packed_length)
    cut = len(ordered) - len(ordered) % batch_size
    full = [ordered[i:i + batch_size] for i in range(0, cut, batch_size)]
    rng.shuffle(full)
    return [s for batch in full for s in batch] + ordered[cut:]


def padded_response(sample: EncodedSample, block_size: int, eos_id: int) -> torch.Tensor:
    real = sample.response_ids
    n = -(-real.numel() // block_size) * block_size
    return torch.cat([real, torch.full((n - real.numel(),), eos_id, dtype=torch.long)])


def _cat_images(samples: list[EncodedSample]):
    pixels = [s.pixel_values for s in samples if s.pixel_values is not None]
    grids = [s.image_grid_thw for s in samples if s.image_grid_thw is not None]
    return (torch.cat(pixels) if pixels else None), (torch.cat(grids) if grids else None)


@dataclass(frozen=True)
class NoiseSpec:
    """What `pack` needs to corrupt responses (token ids come from the tokenizer, never literals)."""

    kind: str
    t_min: float
    mask_token_id: int
    substitute_ids: torch.Tensor  # ordinary tokens only
    eos_id: int
    pad_id: int
    prefix_prob: float = 0.0  # share of blocks corrupted as [clean prefix ‖ all masks] (NoiseConfig)


def pack(samples: list[EncodedSample], model, block_size: int, spec: NoiseSpec, *, prompt_mask: str = "causal",
         label_shift: bool = False, pad_loss_weight: float = 0.0, keep_loss_weight: float = 0.0,
         generator: torch.Generator | None = None, duplicate_prompt: bool = False) -> PackedBatch:
    """Build a training batch; `duplicate_prompt=True` builds the vanilla layout instead.

    Loss positions are the corrupted response tokens (masked or substituted), at weight 1/t (padding
    beyond the real response at `pad_loss_weight`/t). With `keep_loss_weight` > 0 the noise's *kept* real
    tokens are loss positions too, at `keep_loss_weight`/t: a visible token is then sometimes right
    and sometimes a substitute, as it is when decoding, instead of always wrong (see `TrainConfig`)."""
    rows, positions, types, meta = [], [], [], []
    loss_sample, loss_pos, labels, weights, levels = [], [], [], [], []
    have = [s.anchor_ids is not None for s in samples]
    if any(have) and not all(have):
        raise ValueError(f"{have.count(False)} of {len(samples)} samples lack the anchor targets the others carry")
    anchored = label_shift and all(have)
    anchor_ids, anchor_probs = [], []
    for n, sample in enumerate(samples):
        x0 = padded_response(sample, block_size, spec.eos_id)
        xt, t = corrupt(x0, block_size, sample.response_ids.numel(), spec.kind, spec.t_min, spec.mask_token_id,
                        spec.substitute_ids, spec.prefix_prob, generator)
        P, R = sample.prompt_ids.numel(), x0.numel()
        prefix_ids = torch.cat([sample.prompt_ids, x0])
        prefix_types = torch.cat([sample.prompt_mm_types, torch.zeros(R, dtype=torch.long)])
        pos = rope_positions(model, prefix_ids, prefix_types, sample.image_grid_thw)
        if duplicate_prompt:  # [P ‖ clean ‖ P ‖ noisy]
            ids = torch.cat([prefix_ids, sample.prompt_ids, xt])
            typ = torch.cat([prefix_types, sample.prompt_mm_types, torch.zeros(R, dtype=torch.long)])
            pos = torch.cat([pos, pos[:, :P], pos[:, P:]], dim=1)
            noisy_start = 2 * P + R
        else:  # [P ‖ clean ‖ noisy]
            ids = torch.cat([prefix_ids, xt])
            typ = torch.cat([prefix_types, torch.zeros(R, dtype=torch.long)])
            pos = torch.cat([pos, pos[:, P:]], dim=1)
            noisy_start = P + R
        rows.append(ids), types.append(typ), positions.append(pos), meta.append((P, R))

        real = sample.response_ids.numel()
        corrupted = xt != x0
        kept = ~corrupted & (torch.arange(R) < real) if keep_loss_weight > 0 else torch.zeros_like(corrupted)
        r = torch.nonzero(corrupted | kept).flatten()  # loss positions, in response order
        w = torch.where(kept[r], keep_loss_weight, torch.where(r < real, 1.0, pad_loss_weight)) / t[r]
        r, w = r[w > 0], w[w > 0]
        if label_shift:  # read one earlier; a block's first token from the previous clean token (P-1 for r=0)
            where = torch.where(r % block_size != 0, noisy_start + r - 1, P + r - 1)
            if anchored:  # those block-first reads have an AR context: their precomputed anchor targets
                first = r[r % block_size == 0]
                anchor_ids.append(sample.anchor_ids[first]), anchor_probs.append(sample.anchor_probs[first])
        else:
            where = noisy_start + r
        loss_sample.append(torch.full_like(r, n)), loss_pos.append(where), labels.append(x0[r])
        weights.append(w.float()), levels.append(t[r].float())

    L = max(r.numel() for r in rows)
    input_ids = torch.full((len(rows), L), spec.pad_id, dtype=torch.long)
    position_ids = torch.zeros(3, len(rows), L, dtype=torch.long)
    mm_types = torch.zeros(len(rows), L, dtype=torch.long)
    for n, (ids, pos, typ) in enumerate(zip(rows, positions, types)):
        input_ids[n, : ids.numel()], position_ids[:, n, : ids.numel()], mm_types[n, : ids.numel()] = ids, pos, typ
    prompt_lens, response_lens = [m[0] for m in meta], [m[1] for m in meta]
    if duplicate_prompt:
        mask = torch.stack([_vanilla_mask(p, r, block_size, prompt_mask, L) for p, r in meta])[:, None]
    else:
        mask = batch_attention_mask(prompt_lens, response_lens, L, block_size, prompt_mask)
    pixels, grids = _cat_images(samples)
    if duplicate_prompt and grids is not None:  # every image appears twice, in sample order
        pixels = torch.cat([t for s in samples if s.pixel_values is not None for t in (s.pixel_values,) * 2])
        grids = torch.cat([g for s in samples if s.image_grid_thw is not None for g in (s.image_grid_thw,) * 2])
    return PackedBatch(
        input_ids=input_ids, position_ids=position_ids, mm_token_type_ids=mm_types, attention_mask=mask,
        pixel_values=pixels, image_grid_thw=grids, prompt_lens=prompt_lens, response_lens=response_lens,
        real_lens=[s.response_ids.numel() for s in samples], block_size=block_size, prompt_mask=prompt_mask,
        loss_sample=torch.cat(loss_sample), loss_pos=torch.cat(loss_pos), labels=torch.cat(labels),
        weights=torch.cat(weights), t=torch.cat(levels), duplicated_prompt=duplicate_prompt,
        anchor_ids=torch.cat(anchor_ids) if anchored else None,
        anchor_probs=torch.cat(anchor_probs) if anchored else None,
    )


def _vanilla_mask(prompt_len: int, response_len: int, block_size: int, prompt_mask: str, total: int) -> torch.Tensor:
    """Mask of ``[P ‖ clean ‖ P' ‖ noisy]``: P' repeats P; noisy rows see P', clean blocks < own, own block."""
    from bard_core.masks import attention_mask

    P, R = prompt_len, response_len
    packed = attention_mask(P, R, block_size, prompt_mask)  # over [P ‖ clean ‖ noisy]
    seg, _ = segments(P, R)
    mask = torch.zeros(total, total, dtype=torch.bool)
    first = torch.arange(P + R)
    second_prompt = torch.arange(P + R, 2 * P + R)
    noisy = torch.arange(2 * P + R, 2 * P + 2 * R)
    mask[first[:, None], first[None, :]] = packed[: P + R, : P + R]
    mask[second_prompt[:, None], second_prompt[None, :]] = packed[:P, :P]
    src = torch.arange(P + R, P + 2 * R)  # noisy rows in the packed mask
    mask[noisy[:, None], second_prompt[None, :]] = packed[src[:, None], torch.arange(P)[None, :]]
    mask[noisy[:, None], torch.arange(P, P + R)[None, :]] = packed[src[:, None], torch.arange(P, P + R)[None, :]]
    mask[noisy[:, None], noisy[None, :]] = packed[src[:, None], src[None, :]]
    assert (seg[src] == NOISY).all() and (seg[:P] == PROMPT).all() and (seg[P:P + R] == CLEAN).all()
    pad = torch.arange(2 * P + 2 * R, total)
    mask[pad, pad] = True
    return mask


@dataclass
class ARBatch:
    """Next-token SFT batch: [prompt ‖ response], right-padded; loss on response tokens only."""

    input_ids: torch.Tensor  # long [N, L]
    attention_mask: torch.Tensor  # long [N, L] (1 = real token)
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    loss_sample: torch.Tensor  # [K]
    loss_pos: torch.Tensor  # [K] position whose logits predict the label (one before it)
    labels: torch.Tensor  # [K]
    real_lens: list[int]


def ar_batch(samples: list[EncodedSample], pad_id: int) -> ARBatch:
    L = max(s.prompt_ids.numel() + s.response_ids.numel() for s in samples)
    input_ids = torch.full((len(samples), L), pad_id, dtype=torch.long)
    attention = torch.zeros(len(samples), L, dtype=torch.long)
    types = torch.zeros(len(samples), L, dtype=torch.long)
    loss_sample, loss_pos, labels = [], [], []
    for n, s in enumerate(samples):
        P, R = s.prompt_ids.numel(), s.response_ids.numel()
        input_ids[n, : P + R] = torch.cat([s.prompt_ids, s.response_ids])
        attention[n, : P + R] = 1
        types[n, :P] = s.prompt_mm_types
        loss_sample += [n] * R
        loss_pos += list(range(P - 1, P + R - 1))
        labels += s.response_ids.tolist()
    pixels, grids = _cat_images(samples)
    return ARBatch(input_ids, attention, types, pixels, grids, torch.tensor(loss_sample), torch.tensor(loss_pos),
                   torch.tensor(labels), [s.response_ids.numel() for s in samples])


def noise_spec_for(tokenizer, kind: str, t_min: float, mask_token_id: int | None = None,
                   prefix_prob: float = 0.0) -> NoiseSpec:
    """Token ids as every reader resolves them (`checkpoint.token_ids`); every added/special token (the
    mask included) is excluded from substitution."""
    from bard_core.checkpoint import token_ids
    from bard_core.noise import ordinary_token_ids

    ids = token_ids(tokenizer, mask_id=mask_token_id)
    specials = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder) | {ids.mask}
    return NoiseSpec(kind=kind, t_min=t_min, mask_token_id=ids.mask,
                     substitute_ids=ordinary_token_ids(len(tokenizer), specials),
                     eos_id=ids.eos, pad_id=ids.pad, prefix_prob=prefix_prob)
