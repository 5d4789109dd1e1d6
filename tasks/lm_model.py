"""The lm-eval model ``bard``: any lm-eval task, answered by our decoding engine (`bard_core.decode`).

``lm_eval --model bard --model_args pretrained=DIR,mode=diffusion,threshold=0.7,batch_size=16`` — or
`BardLM(...)` passed to ``lm_eval.simple_evaluate(model=...)``. ``mode=diffusion`` decodes in blocks
(block size, label shift, token ids and the promoted decode setting from the checkpoint's ``bard.json``;
any `DecodeConfig` field may be given by name, its ``mode`` as ``decode_mode``); ``mode=ar`` is the AR
baseline in the same engine; ``mode=speculative`` the lossless mode (drafted in blocks, verified causally:
the greedy answers of ``verifier=DIR``, default the checkpoint's own weights — or, for a stage the gate
promoted as the AR base's drafter, that base; ``verifier=self`` for the checkpoint's own).

- ``generate_until``: the context's ``<image>`` placeholders mark where the request's images go in one
  user turn of the chat template; requests are batched through the engine, ``max_gen_toks`` caps the
  answer and ``until`` strings cut it (the engine stops at <|im_end|>). Every request's decode
  statistics (tokens through EOS, forwards, seconds) are kept in `stats`, by (task, doc id).
- ``loglikelihood`` / ``loglikelihood_rolling``: exact in ``mode=ar`` (one causal forward per request);
  a block-diffusion model has no exact likelihood, and ``mode=diffusion`` refuses them with one error.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import defaultdict

os.environ.setdefault("LMEVAL_HASHMM", "0")  # lm-eval re-encodes every image as PNG to hash it otherwise (docs/)

import torch  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402

from bard_core import checkpoint  # noqa: E402
from bard_core.config import DecodeConfig  # noqa: E402
from bard_core.decode import ar_generate_cached, generate  # noqa: E402
from bard_core.engine import decode_device  # noqa: E402
from bard_core.inputs import context_messages, encode_prompt  # noqa: E402
from bard_core.overrides import coerce  # noqa: E402
from bard_core.recipes import get_recipe  # noqa: E402

MODES = ("ar", "diffusion", "speculative")  # speculative: lossless block drafts (bard_core/speculative.py)
_GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p"}  # what the engine honours


@register_model("bard")
class BardLM(LM):
    MULTIMODAL = True

    def __init__(self, pretrained: str, mode: str = "diffusion", recipe: str | None = None,
                 mask_token_id: int | None = None, device: str | None = None, max_batch_size: int | None = None,
                 recipe_overrides: dict | None = None, verifier: str | None = None, _loaded: tuple | None = None,
                 _verifier=None, **decode):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"bard: mode={mode!r}; valid: {', '.join(MODES)}")
        self.pretrained, self.mode = str(pretrained), mode
        self.recipe, self.recipe_overrides = recipe, dict(recipe_overrides or {})
        settings = get_recipe(recipe, self.recipe_overrides) if recipe else None
        self.model, self.processor, self.meta = _loaded or checkpoint.load(
            pretrained, settings.model.attn_implementation if settings else "sdpa")
        self._device = decode_device(device)  # a GPU when there is one
        self.model.to(self._device).eval()
        self.ids = checkpoint.token_ids(self.processor.tokenizer, self.meta,
                                        mask_token_id or (settings.model.mask_token_id if settings else None),
                                        require_mask=mode != "ar")
        if mode == "speculative":
            decode = {**decode, "decode_mode": "speculative", "temperature": 0.0}
        elif verifier:
            raise ValueError("bard: verifier= is for mode=speculative")
        self.decode = checkpoint.decode_config(self.meta, settings.decode if settings else None, **_typed(decode))
        own, verifier = verifier == "self", None if verifier == "self" else verifier  # "self": these weights
        if verifier is None and not own and _loaded is None and self.decode.mode == "speculative":
            verifier = checkpoint.promoted_verifier(self.meta, pretrained)  # a stage promoted as the AR base's drafter
        self.verifier = str(verifier) if verifier else None  # the model whose greedy answers come out (default: self)
        self.verifier_model = _verifier or (checkpoint.load(verifier)[0].to(self._device).eval() if verifier else None)
        if mode != "ar" and not self.meta.get("block_size") and "block_size" not in decode:
            raise ValueError(f"bard: {pretrained} is an AR checkpoint (no block size in bard.json); use mode=ar, "
                             "or give block_size= to decode it in blocks anyway")
        self.stats: dict[tuple[str, int], list[dict]] = defaultdict(list)
        self.requests: dict[tuple[str, int], tuple] = {}  # the last generate_until's requests, by (task, doc id)
        self.engine_seconds = self.encode_seconds = 0.0

    @property
    def device(self) -> torch.device:
        return self._device

    def variant(self, mode: str | None = None, verifier: BardLM | str | None = None, **decode) -> BardLM:
        """The same loaded model with another mode or decode setting (a τ sweep loads the weights once);
        `verifier`: a loaded model whose greedy answers the speculative mode reproduces, ``"self"`` for these
        weights' own (default: this one's verifier)."""
        own = isinstance(verifier, str) and verifier == "self"
        verifier = None if own else verifier
        fields = {**dataclasses.asdict(self.decode), **decode}
        fields["decode_mode"] = fields.pop("mode")
        speculative = (mode or self.mode) == "speculative"
        if not speculative and fields["decode_mode"] == "speculative":
            fields["decode_mode"] = "dynamic"
        return BardLM(self.pretrained, mode or self.mode, self.recipe, self.ids.mask, str(self.device),
                      recipe_overrides=self.recipe_overrides,
                      verifier=None if own or not speculative else verifier.pretrained if verifier else self.verifier,
                      _loaded=(self.model, self.processor, self.meta),
                      _verifier=None if own else verifier.model if verifier else self.verifier_model, **fields)

    def describe(self) -> dict:
        """What decoded: the engine and, for diffusion, the whole decode setting (`DecodeConfig` fields)."""
        if self.mode == "ar":
            return {"engine": "ar", "max_new_tokens": self.decode.max_new_tokens, "batch_size": self.decode.batch_size}
        if self.mode == "speculative":
            return {"engine": "speculative", "verifier": self.verifier or "self", **dataclasses.asdict(self.decode)}
        return {"engine": "diffusion", **dataclasses.asdict(self.decode)}

    # --- generation --------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        texts, stats = self.decode_contexts([r.args for r in requests], self.decode.batch_size)
        for request, record in zip(requests, stats):
            self.stats[(request.task_name, request.doc_id)].append(record)
            self.requests[(request.task_name, request.doc_id)] = request.args  # replayed by speed runs
        return texts

    def decode_contexts(self, args: list[tuple], batch_size: int) -> tuple[list[str], list[dict]]:
        """Answers and decode statistics for ``(context, gen_kwargs[, {"visual": images}])`` requests,
        `batch_size` at a time (requests with the same settings, longest prompts first)."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (_, gen_kwargs, *_) in enumerate(args):
            groups[self._settings(gen_kwargs)].append(i)
        texts: list[str] = [""] * len(args)
        stats: list[dict] = [{}] * len(args)
        for (max_new, temperature, top_p), indices in groups.items():
            cfg = dataclasses.replace(self.decode, max_new_tokens=max_new, temperature=temperature, top_p=top_p)
            started = time.perf_counter()
            prompts = {i: self._prompt(args[i]) for i in indices}
            self.encode_seconds += time.perf_counter() - started
            order = sorted(indices, key=lambda i: -prompts[i].prompt_ids.numel())
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                started = time.perf_counter()
                if self.mode == "ar":
                    gens = ar_generate_cached(self.model, [prompts[i] for i in chunk], max_new, self.ids)
                else:
                    gens = generate(self.model, [prompts[i] for i in chunk], cfg, self.ids,
                                    verifier=self.verifier_model)
                self.engine_seconds += time.perf_counter() - started
                for i, g in zip(chunk, gens):
                    texts[i] = _cut(self.processor.tokenizer.decode(g.token_ids, skip_special_tokens=True),
                                    _until(args[i][1]))
                    stats[i] = {"tokens": g.tokens, "nfe": g.nfe, "seconds": round(g.seconds, 5),
                                "edits": g.edits, "batch": len(chunk)}
                    if g.accepted:  # speculative: drafted tokens accepted per step
                        stats[i]["accepted"] = g.accepted
        return texts, stats

    def _settings(self, gen_kwargs: dict) -> tuple:
        unknown = set(gen_kwargs) - _GEN_KWARGS
        if unknown:
            raise ValueError(f"bard: generation settings {sorted(unknown)} are not supported; the engine honours "
                             f"{', '.join(sorted(_GEN_KWARGS))}")
        sampling = bool(gen_kwargs.get("do_sample")) and float(gen_kwargs.get("temperature") or 0) > 0
        if sampling and self.mode in ("ar", "speculative"):
            raise ValueError(f"bard: mode={self.mode} decodes greedily; this task asks for sampling (do_sample, "
                             "temperature)")
        temperature = float(gen_kwargs["temperature"]) if sampling else self.decode.temperature
        top_p = float(gen_kwargs.get("top_p", self.decode.top_p)) if sampling else self.decode.top_p
        return int(gen_kwargs.get("max_gen_toks", self.decode.max_new_tokens)), temperature, top_p

    def _prompt(self, request_args: tuple):
        context, _, *rest = request_args
        images = list((rest[0] or {}).get("visual") or []) if rest else []
        return encode_prompt(context_messages(context, len(images)), images, self.processor)

    # --- likelihoods -------------------------------------------------------------------------------

    def _refuse(self, kind: str):
        if self.mode != "ar":
            raise ValueError(f"bard: mode={self.mode} answers generate_until requests only; this task asks for "
                             f"{kind}, which a block-diffusion model has no exact value for. Evaluate it with "
                             "mode=ar (exact), or choose a generative task.")

    @torch.no_grad()
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._refuse("loglikelihood")
        out = []
        for request in requests:
            context, continuation, *rest = request.args
            prompt = self._prompt((context, {}, *rest))
            cont = self.processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            out.append(self._score(prompt, torch.tensor(cont, dtype=torch.long)))
        return out

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        self._refuse("loglikelihood_rolling")
        limit = self.model.config.get_text_config().max_position_embeddings
        out = []
        for request in requests:
            tokens = self.processor.tokenizer(request.args[0], add_special_tokens=False)["input_ids"]
            total = 0.0
            for context, target in map(make_disjoint_window,
                                       get_rolling_token_windows(tokens, self.ids.eos, limit, context_len=1)):
                prompt = torch.tensor(context, dtype=torch.long)
                total += self._score_ids(prompt, torch.zeros_like(prompt), None, None, torch.tensor(target))[0]
            out.append(total)
        return out

    def _score(self, prompt, cont: torch.Tensor) -> tuple[float, bool]:
        return self._score_ids(prompt.prompt_ids, prompt.prompt_mm_types, prompt.pixel_values,
                               prompt.image_grid_thw, cont)

    def _score_ids(self, prompt_ids, mm_types, pixel_values, grid, cont) -> tuple[float, bool]:
        """Σ log p(cont | prompt) and whether cont is the greedy continuation, from one causal forward."""
        ids = torch.cat([prompt_ids, cont])[None].to(self.device)
        types = torch.cat([mm_types, torch.zeros_like(cont)])[None].to(self.device)
        logits = self.model(input_ids=ids, mm_token_type_ids=types,
                            pixel_values=None if pixel_values is None else pixel_values.to(self.device),
                            image_grid_thw=None if grid is None else grid.to(self.device)).logits[0].float()
        at = logits[prompt_ids.numel() - 1: ids.shape[1] - 1].log_softmax(-1)
        target = cont.to(self.device)
        return float(at.gather(-1, target[:, None]).sum()), bool((at.argmax(-1) == target).all())


def _typed(decode: dict) -> dict:
    """model_args values are strings from the command line or typed from Python: coerce to the field types."""
    defaults = DecodeConfig()
    types = {f.name for f in dataclasses.fields(DecodeConfig)}
    out = {}
    for key, value in decode.items():
        key = "mode" if key == "decode_mode" else key  # `mode` is the engine (ar | diffusion) here
        if key == "mode" and value in ("ar", "diffusion"):
            raise ValueError("bard: decode_mode is DecodeConfig.mode (dynamic | static | speculative); the engine "
                             "is mode=")
        if key == "batch_size" and value in ("auto", None):
            continue  # lm-eval's auto batch size: keep the recipe's
        if key not in types:
            raise ValueError(f"bard: unknown model argument {key!r}; decode settings: {', '.join(types)}")
        out[key] = coerce(getattr(defaults, key), value, key)
    return out


def _until(gen_kwargs: dict) -> list[str]:
    until = gen_kwargs.get("until") or []
    return [until] if isinstance(until, str) else list(until)


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text[:text.index(stop)]
    return text
