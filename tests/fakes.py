"""A scripted stand-in for Qwen3-VL in decoding tests: logits come from a per-prompt script.

The fake speaks the model protocol the engine uses: ``model.model(...)`` with a 4-D mask, explicit
positions and a transformers ``DynamicCache`` (it writes its own key per token, so cache
truncation and row selection are real), ``model.lm_head`` and ``model.model.get_rope_index``.
Each prompt starts with a distinct *row token*; the script maps response index j to
(proposed token, probability) and may change its proposal with the number of times j was asked.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from transformers import Qwen3VLTextConfig

VOCAB = 64
MASK, EOS, PAD = 7, 2, 0


class Script:
    def __init__(self, answer: list[int], confidence: list[float] | float = 0.99, revisions: dict | None = None):
        self.answer, self.revisions, self.asked = answer, revisions or {}, {}
        self.confidence = confidence if isinstance(confidence, list) else [confidence] * len(answer)

    def propose(self, j: int) -> tuple[int, float]:
        k = self.asked.get(j, 0)
        self.asked[j] = k + 1
        if j in self.revisions:  # list of (token, prob) by ask count; the last one repeats
            options = self.revisions[j]
            return options[min(k, len(options) - 1)]
        if j >= len(self.answer):
            return EOS, 0.99
        return self.answer[j], self.confidence[j]


class _Inner:
    def __init__(self, outer):
        self.outer = outer

    def get_rope_index(self, input_ids, mm_token_type_ids=None, image_grid_thw=None, attention_mask=None, **_):
        n, L = input_ids.shape
        return torch.arange(L)[None, None].expand(3, n, L).clone(), torch.zeros(n, 1, dtype=torch.long)

    def __call__(self, input_ids, attention_mask, position_ids, cache=None, use_cache=False, **_):
        outer = self.outer
        n, q = input_ids.shape
        before = cache.get_seq_length() if cache is not None else 0
        outer.calls.append(SimpleNamespace(input_ids=input_ids.clone(), positions=position_ids[0].clone(),
                                           cache_len=before, mask=attention_mask.clone()))
        if cache is not None:
            key = input_ids.float()[:, None, :, None]
            cache.update(key, key.clone(), 0)
            keys = cache.layers[0].keys[:, 0, :, 0]
        else:
            keys = input_ids.float()
        logits = torch.full((n, q, VOCAB), -30.0)
        for i in range(n):
            row_token = int(keys[i][attention_mask[i, 0, -1].bool()][0])  # the last row sees every real key
            script = outer.scripts[row_token]
            start = outer.prompt_len[row_token]
            for t in range(q):
                j = int(position_ids[0, i, t]) - start
                sees_masks = bool((attention_mask[i, 0, t].bool() & (keys[i] == MASK)).any())
                if j < 0 or not sees_masks:  # prompt or committed rows: the engine ignores their logits
                    continue
                token, p = script.propose(j)
                # logit gap so that softmax gives probability p to `token` (others share the rest)
                logits[i, t, token] = math.log(p / (1 - p) * (VOCAB - 1)) - 30.0 if p < 1 else 30.0
        return SimpleNamespace(last_hidden_state=logits)


class FakeVLM:
    def __init__(self, scripts: dict[int, Script], prompt_len: dict[int, int]):
        self.scripts, self.prompt_len = scripts, prompt_len
        self.calls: list = []
        self.model = _Inner(self)
        self.lm_head = lambda h: h
        self.config = Qwen3VLTextConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=1,
                                        num_key_value_heads=1, head_dim=8, vocab_size=VOCAB)
        self._param = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        yield self._param

    def eval(self):
        return self


def prompt(row_token: int, length: int):
    from bard_core.inputs import EncodedSample

    ids = torch.cat([torch.tensor([row_token]), torch.arange(20, 20 + length - 1)])
    return EncodedSample(ids, torch.zeros(length, dtype=torch.long), torch.zeros(0, dtype=torch.long), None, None)
