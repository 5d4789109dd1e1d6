"""Self-distilled targets (``train.targets=base``): every training row's last answer replaced by the chain's AR
base's own greedy answer to the same prompt, so a stage learns to produce, in parallel, what the base says,
and fine-tuning does not move the base's answers (docs/stage_budget.md, "Self-distilled targets").

`BaseAnswers` is a Ray Data `map_batches` callable (an actor, like `train_worker.AnchorTargets`); it adds a
``target`` column saying where each row's answer came from. A row whose base answer does not end within its
budget, or is empty, keeps the curated answer, and says so; a row that does not encode is left for the
training worker to reject (it counts those). Imports no Prefect or Ray.
"""

from __future__ import annotations

KEPT = ("base", "data: the base did not finish", "data: the base's answer is empty", "data: does not encode")


def answer_budget(response_tokens: int, max_tokens: int, prompt_tokens: int) -> int:
    """New tokens the base may spend on a row: twice the curated answer (EOS included) plus 16, within the
    row's token cap."""
    return max(1, min(2 * response_tokens + 16, max_tokens - prompt_tokens))


def with_answer(messages: list[dict], text: str) -> list[dict]:
    """`messages` with the last (assistant) turn's text parts replaced by one text part holding `text`."""
    last = dict(messages[-1])
    parts = last["content"] if isinstance(last["content"], list) else [{"type": "text", "text": last["content"]}]
    template = next((p for p in parts if p.get("type") == "text"), {"type": "text"})
    last["content"] = [{**template, "text": text}] + [p for p in parts if p.get("type") != "text"]
    return [*messages[:-1], last]


class BaseAnswers:
    """Replaces each row's last answer with the AR base's greedy answer (see module docstring)."""

    def __init__(self, base: str, max_tokens: int, dtype: str = "float32", batch_size: int = 16):
        import torch

        from bard_core import checkpoint

        self.model, self.processor, meta = checkpoint.load(base)
        if meta.get("block_size"):
            raise ValueError(f"train.targets=base needs the chain's AR base; {base} has block size {meta['block_size']}")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(device, getattr(torch, dtype)).eval()
        self.ids = checkpoint.token_ids(self.processor.tokenizer, meta, require_mask=False)
        self.max_tokens, self.batch_size = max_tokens, batch_size

    def __call__(self, table):
        import pyarrow as pa
        import torch

        from bard_core.decode import ar_generate_cached
        from bard_core.inputs import RejectedSample, encode_sample

        rows = table.select(["images", "messages"]).to_pylist()
        messages = [r["messages"] for r in rows]
        target = [KEPT[3]] * len(rows)
        work = []  # (row, prompt, budget)
        for i, row in enumerate(rows):
            try:
                sample = encode_sample(row, self.processor, self.max_tokens)
            except RejectedSample:
                continue
            budget = answer_budget(sample.response_ids.numel(), self.max_tokens, sample.prompt_ids.numel())
            sample.response_ids = torch.zeros(0, dtype=torch.long)
            work.append((i, sample, budget))
        work.sort(key=lambda w: w[1].num_tokens)  # less padding per batch
        tokenizer = self.processor.tokenizer
        for start in range(0, len(work), self.batch_size):
            chunk = work[start:start + self.batch_size]
            outs = ar_generate_cached(self.model, [w[1] for w in chunk], max(w[2] for w in chunk), self.ids)
            for (i, _, budget), g in zip(chunk, outs):
                tokens = g.token_ids
                if not tokens or tokens[-1] != self.ids.eos or len(tokens) > budget:
                    target[i] = KEPT[1]
                    continue
                text = tokenizer.decode(tokens[:-1], skip_special_tokens=False)
                if not text.strip():
                    target[i] = KEPT[2]
                    continue
                messages[i], target[i] = with_answer(messages[i], text), KEPT[0]
        column = table.schema.get_field_index("messages")
        return (table.set_column(column, "messages", pa.array(messages, table.schema.field("messages").type))
                .append_column("target", pa.array(target, pa.string())))
