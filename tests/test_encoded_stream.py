"""A Ray Train worker's sample stream: first epoch streamed and encoded, later epochs replayed from memory."""

from __future__ import annotations

import itertools

import pytest
import torch

from bard_core.inputs import EncodedSample
from tasks.train_worker import EncodedStream


class Shard:
    """The part of a Ray Data shard the stream uses (`iter_rows`), counting how often it is read."""

    def __init__(self, rows):
        self.rows, self.reads = rows, 0

    def iter_rows(self):
        self.reads += 1
        yield from self.rows


def encode(row):
    if row["bad"]:
        return None
    ids = torch.full((4,), row["id"])
    return EncodedSample(ids, torch.zeros(4, dtype=torch.long), ids[:2], torch.zeros(2, 8), None)


ROWS = [{"id": i, "bad": i % 7 == 3} for i in range(40)]  # 6 rejected rows
GOOD = sorted(r["id"] for r in ROWS if not r["bad"])
PER_SAMPLE = 4 * 8 + 4 * 8 + 2 * 8 + 2 * 8 * 4  # bytes of the tensors above


def epochs(stream, n):
    it = iter(stream)
    return [sorted(int(s.prompt_ids[0]) for s in itertools.islice(it, len(GOOD))) for _ in range(n)]


def test_the_shard_is_read_once_when_it_fits_and_every_epoch_has_every_sample_once():
    shard = Shard(ROWS)
    stream = EncodedStream(shard, encode, seed=0, cache_bytes=len(GOOD) * PER_SAMPLE)
    assert epochs(stream, 3) == [GOOD] * 3
    assert shard.reads == 1 and stream.skipped == 6


def test_a_shard_over_the_budget_is_streamed_every_epoch():
    shard = Shard(ROWS)
    stream = EncodedStream(shard, encode, seed=0, cache_bytes=len(GOOD) * PER_SAMPLE - 1)
    assert epochs(stream, 3) == [GOOD] * 3
    assert shard.reads == 3 and stream.skipped == 6  # rejects are counted in the first epoch only
    off = Shard(ROWS)
    assert epochs(EncodedStream(off, encode, seed=0, cache_bytes=0), 2) == [GOOD] * 2 and off.reads == 2


def test_replayed_epochs_are_reshuffled():
    stream = EncodedStream(Shard(ROWS), encode, seed=1, cache_bytes=1 << 20)
    it = iter(stream)
    orders = [[int(s.prompt_ids[0]) for s in itertools.islice(it, len(GOOD))] for _ in range(3)]
    assert orders[1] != orders[2] and sorted(orders[1]) == sorted(orders[2]) == GOOD


def test_a_shard_without_usable_rows_is_an_error_not_a_hang():
    stream = EncodedStream(Shard([{"id": 0, "bad": True}]), encode, seed=0, cache_bytes=1 << 20)
    with pytest.raises(RuntimeError, match="no usable rows"):
        next(iter(stream))
