"""What a chain's frozen AR base adds to the training rows, once per chain (`tasks.train.training_dataset`):
- its own greedy answers in place of the curated ones (``train.targets=base``: sequence-level self-distillation,
  so a stage learns to produce in parallel what the base says; docs/stage_budget.md, "Self-distilled targets"),
  with a ``target`` column saying where each row's answer came from;
- the AR anchor's targets (``train.anchor_weight``): per answer token, the base's top-K next-token ids and
  renormalised probabilities (``anchor_ids`` / ``anchor_probs``; the worker attaches them,
  `train_worker.with_anchor_targets`), computed on the answer the stage trains on.

`BaseTargets` is one Ray Data `map_batches` actor doing both with one copy of the base: two actor pools would
hold every CPU of a small cluster and starve the read that feeds them. A row whose base answer does not end
within its budget, or is empty, keeps the curated answer and says so; a row that does not encode gets nulls
(the training worker rejects and counts it). Imports no Prefect or Ray.
"""

from __future__ import annotations

# the ``target`` column's values: where a row's answer came from (the stage's bard.json counts them)
KEPT = ("base: differs from the data", "base: same as the data", "data: the base did not finish",
        "data: the base's answer is empty", "data: does not encode")


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


class BaseTargets:
    """The base's answers (`answers`) and/or the anchor's targets (`top_k` > 0) for every row of a table."""

    def __init__(self, base: str, max_tokens: int, *, answers: bool = False, top_k: int = 0,
                 temperature: float = 1.0, dtype: str = "float32", batch_size: int = 16):
        import torch

        from bard_core import checkpoint
        from bard_core.config import EOS_TOKEN

        if not answers and top_k <= 0:
            raise ValueError("BaseTargets: nothing to add (answers=False and top_k=0)")
        self.model, self.processor, meta = checkpoint.load(base)
        if meta.get("block_size"):
            raise ValueError(f"the chain's AR base is an AR checkpoint; {base} has block size {meta['block_size']}")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(device, getattr(torch, dtype)).eval()
        tok = self.processor.tokenizer
        self.ids = checkpoint.token_ids(tok, meta, require_mask=False)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids(EOS_TOKEN)
        self.max_tokens, self.answers, self.top_k = max_tokens, answers, top_k
        self.temperature, self.batch_size = temperature, batch_size

    def __call__(self, table):
        if self.answers:
            table = self.base_answers(table)
        if self.top_k > 0:
            table = self.anchor_targets(table)
        return table

    @staticmethod
    def counts(dataset) -> dict[str, int] | None:
        """Rows per ``target`` value of a materialized dataset; None for a streamed one (counting would decode it
        all once more)."""
        from collections import Counter

        from ray.data.dataset import MaterializedDataset

        if not isinstance(dataset, MaterializedDataset) or "target" not in dataset.schema().names:
            return None
        return dict(Counter(r["target"] for r in dataset.select_columns(["target"]).iter_rows()))

    def _encoded(self, table) -> list:
        from bard_core.inputs import RejectedSample, encode_sample

        encoded = []
        for row in table.select(["images", "messages"]).to_pylist():
            try:
                encoded.append(encode_sample(row, self.processor, self.max_tokens))
            except RejectedSample:
                encoded.append(None)
        return encoded

    def base_answers(self, table):
        """`table` with each row's last answer replaced by the base's greedy one, and a ``target`` column."""
        import pyarrow as pa
        import torch

        from bard_core.engine import ar_generate_cached

        messages = table.column("messages").to_pylist()
        target = [KEPT[4]] * len(messages)
        work = []  # (row, prompt, budget)
        for i, sample in enumerate(self._encoded(table)):
            if sample is not None:
                budget = answer_budget(sample.response_ids.numel(), self.max_tokens, sample.prompt_ids.numel())
                sample.response_ids = torch.zeros(0, dtype=torch.long)
                work.append((i, sample, budget))
        work.sort(key=lambda w: w[1].num_tokens)  # less padding per batch
        for start in range(0, len(work), self.batch_size):
            chunk = work[start:start + self.batch_size]
            outs = ar_generate_cached(self.model, [w[1] for w in chunk], max(w[2] for w in chunk), self.ids)
            for (i, _, budget), g in zip(chunk, outs):
                tokens = g.token_ids
                if not tokens or tokens[-1] != self.ids.eos or len(tokens) > budget:
                    target[i] = KEPT[2]
                    continue
                text = self.processor.tokenizer.decode(tokens[:-1], skip_special_tokens=False)
                if not text.strip():
                    target[i] = KEPT[3]
                    continue
                answer = with_answer(messages[i], text)
                messages[i], target[i] = answer, KEPT[0] if answer != messages[i] else KEPT[1]
        column = table.schema.get_field_index("messages")
        return (table.set_column(column, "messages", pa.array(messages, table.schema.field("messages").type))
                .append_column("target", pa.array(target, pa.string())))

    def anchor_targets(self, table):
        """`table` with ``anchor_ids`` / ``anchor_probs`` (nulls for a row that does not encode)."""
        import pyarrow as pa

        from bard_core.train import anchor_targets

        encoded = self._encoded(table)
        usable = sorted((s for s in encoded if s is not None), key=lambda s: s.num_tokens)  # less padding per batch
        for start in range(0, len(usable), self.batch_size):
            anchor_targets(self.model, usable[start:start + self.batch_size], self.pad_id, self.top_k,
                           self.temperature)
        ids = [None if s is None else s.anchor_ids.tolist() for s in encoded]
        probs = [None if s is None else s.anchor_probs.tolist() for s in encoded]
        return (table.append_column("anchor_ids", pa.array(ids, pa.list_(pa.list_(pa.int32()))))
                .append_column("anchor_probs", pa.array(probs, pa.list_(pa.list_(pa.float32())))))
