"""A static KV cache for the decoders, whose text-only forwards replay CUDA graphs on a GPU (issue 22).

On a GPU at batch 1 a decode forward is launch-bound: the kernels of a 36-layer forward take longer to launch
from Python than to run (FACTS.md: ~31 tok/s eager for 2B–8B alike, ~1.9 ms a forward under a CUDA graph). A
graph needs fixed buffers, so the K/V live in transformers' ``StaticCache`` (preallocated to ``max_len`` slots)
and every forward's mask spans all of them. `StaticKV` offers the engine's cache operations (`get_seq_length`,
`crop`, `batch_select_indices`) over it and `forward`: the prompt (with images) runs eagerly; a text-only forward
of a shape (rows, new tokens) seen before replays a graph captured for it. The engine uses it on CUDA
(`new_cache`); the CPU path keeps transformers' ``DynamicCache`` (a mask over every preallocated slot only costs
there). docs/decoding.md, "A static cache and CUDA graphs".
"""

from __future__ import annotations

import warnings

import torch

CAPTURE_AFTER = 2  # a shape is captured the second time it is seen: a prompt-sized forward happens once


def use_static(device, static: bool | None) -> bool:
    """`static`: None → on CUDA devices only."""
    return torch.device(device).type == "cuda" if static is None else bool(static)


def new_cache(model, batch: int, max_len: int, static: bool | None = None):
    """The decoders' KV cache: `StaticKV` of `max_len` slots (on CUDA, or when `static`), else ``DynamicCache``."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    if use_static(device, static):
        return StaticKV(model, max_len, graphs=device.type == "cuda")
    return DynamicCache(config=model.config.get_text_config())


class _Graph:
    """One captured text-only forward of a fixed shape; its inputs are copied into fixed buffers before replay."""

    def __init__(self, lm, cache, n: int, q: int, max_len: int, device, pool):
        self.ids = torch.zeros(n, q, dtype=torch.long, device=device)
        self.positions = torch.zeros(3, n, q, dtype=torch.long, device=device)
        self.mask = torch.zeros(n, 1, q, max_len, dtype=torch.bool, device=device)
        self.mask[..., 0] = True  # no row without a key while warming up

        def run():
            return lm(input_ids=self.ids, position_ids=self.positions, attention_mask=self.mask, cache=cache,
                      use_cache=True).last_hidden_state

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up (kernel choice, workspaces); the K/V it wrote are cropped
            run()
            cache.crop(-q)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):  # recorded, not run: the cache does not move
            self.out = run()

    def __call__(self, ids, positions, mask) -> torch.Tensor:
        self.ids.copy_(ids, non_blocking=True)
        self.positions.copy_(positions, non_blocking=True)
        self.mask.copy_(mask, non_blocking=True)
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites the graph's output


class StaticKV:
    """K/V in ``max_len`` fixed slots per row; `length` slots written (holes included: the engine's masks hide
    them). Forwards go through `forward`, which pads the mask to every slot."""

    def __init__(self, model, max_len: int, graphs: bool):
        from transformers import StaticCache

        self.cache = StaticCache(config=model.config.get_text_config(), max_cache_len=max_len)
        self.max_len, self.length, self.graphs = max_len, 0, graphs
        self._captured: dict[tuple[int, int], _Graph] = {}
        self._seen: dict[tuple[int, int], int] = {}
        self._pool = None

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        """As ``DynamicCache.crop(-k)``: the last k slots are free again (overwritten by the next forward)."""
        if tokens_to_remove >= 0:
            raise ValueError("StaticKV.crop takes minus the number of slots to free")
        self.cache.crop(tokens_to_remove)
        self.length += tokens_to_remove

    def batch_select_indices(self, keep: torch.Tensor) -> None:
        """Keep rows `keep` (finished rows leave the batch): new buffers, so the captured graphs go too."""
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.keys, layer.values = layer.keys[keep], layer.values[keep]
                layer.batch_size = layer.keys.shape[0]
        self._captured.clear()
        self._seen.clear()

    def forward(self, model, ids, positions, mask, device, **multimodal) -> torch.Tensor:
        """`mask` [N, 1, q, length + q] as the engine builds it; `multimodal`: the prompt's images and types
        (an eager forward of the whole model)."""
        n, q = ids.shape
        if self.length + q > self.max_len:
            raise ValueError(f"static KV cache of {self.max_len} slots: {self.length} written, {q} more asked")
        full = torch.zeros(n, 1, q, self.max_len, dtype=torch.bool)
        full[..., : self.length + q] = mask
        text_only = all(v is None for k, v in multimodal.items() if k != "mm_token_type_ids") and not bool(
            multimodal.get("mm_token_type_ids", torch.zeros(1)).any())
        if text_only and self.graphs:
            out = self._replay(model, ids, positions, full, device)
        elif text_only:
            out = self.forward_eager(model, ids, positions, full, device)
        else:
            out = model.model(input_ids=ids.to(device), attention_mask=full.to(device),
                              position_ids=positions.to(device), cache=self.cache, use_cache=True,
                              **{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in multimodal.items()}
                              ).last_hidden_state
        self.length += q
        return out

    def _replay(self, model, ids, positions, mask, device) -> torch.Tensor:
        key = (ids.shape[0], ids.shape[1])
        graph = self._captured.get(key)
        if graph is None:
            self._seen[key] = self._seen.get(key, 0) + 1
            if self._seen[key] < CAPTURE_AFTER:
                return self.forward_eager(model, ids, positions, mask, device)
            try:
                self._pool = self._pool or torch.cuda.graph_pool_handle()
                graph = self._captured[key] = _Graph(model.model.language_model, self.cache, key[0], key[1],
                                                     self.max_len, device, self._pool)
            except RuntimeError as exc:  # a forward a graph cannot record: decode on, eagerly, and say so once
                warnings.warn(f"CUDA graph capture failed, decoding without graphs: {exc}", stacklevel=2)
                self.graphs = False
                for layer in self.cache.layers:  # the warm-up may have moved the write position
                    if layer.is_initialized:
                        layer.cumulative_length.fill_(self.length)
                return self.forward_eager(model, ids, positions, mask, device)
        return graph(ids.to(device), positions.to(device), mask.to(device))

    def forward_eager(self, model, ids, positions, mask, device) -> torch.Tensor:
        return model.model.language_model(input_ids=ids.to(device), position_ids=positions.to(device),
                                          attention_mask=mask.to(device), cache=self.cache,
                                          use_cache=True).last_hidden_state
