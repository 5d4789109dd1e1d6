"""A Ray Train worker's sample stream: the shard is read every epoch, encoded samples are kept by key."""

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


class Encoder:
    def __init__(self):
        self.calls = 0

    def __call__(self, row):
        self.calls += 1
        if row["bad"]:
            return None
        ids = torch.full((4,), row["id"])
        return EncodedSample(ids, torch.zeros(4, dtype=torch.long), ids[:2], torch.zeros(2, 8), None)


ROWS = [{"sample_id": f"s{i}", "id": i, "bad": i % 7 == 3} for i in range(40)]  # 6 rejected rows
GOOD = sorted(r["id"] for r in ROWS if not r["bad"])
PER_SAMPLE = 4 * 8 + 4 * 8 + 2 * 8 + 2 * 8 * 4  # bytes of the tensors above


def epochs(stream, n):
    it = iter(stream)
    return [sorted(int(s.prompt_ids[0]) for s in itertools.islice(it, len(GOOD))) for _ in range(n)]


@pytest.mark.parametrize("cache_bytes", [0, 10 * PER_SAMPLE, len(GOOD) * PER_SAMPLE, 1 << 20])
def test_every_epoch_reads_the_shard_once_and_yields_every_sample_once(cache_bytes):
    # whatever the cache holds, the shard is read once per epoch: Ray Train's split needs every worker
    # to start each epoch's read (a worker replaying from memory left the others waiting: a deadlock)
    shard = Shard(ROWS)
    stream = EncodedStream(shard, Encoder(), seed=0, cache_bytes=cache_bytes, buffer=8)
    assert epochs(stream, 3) == [GOOD] * 3
    assert shard.reads == 3 and stream.skipped == 6  # rejects are counted in the first epoch only


def test_kept_samples_are_not_encoded_again_and_the_budget_bounds_what_is_kept():
    full = Encoder()
    epochs(EncodedStream(Shard(ROWS), full, seed=0, cache_bytes=len(GOOD) * PER_SAMPLE), 3)
    assert full.calls == len(ROWS)  # rejected rows are remembered too
    part = Encoder()
    stream = EncodedStream(Shard(ROWS), part, seed=0, cache_bytes=10 * PER_SAMPLE)
    epochs(stream, 3)
    assert stream.cached_bytes == 10 * PER_SAMPLE
    kept_rows = len(stream.cache)  # 10 samples and the rejected rows read before the budget ran out
    assert part.calls == len(ROWS) + 2 * (len(ROWS) - kept_rows)
    off = Encoder()
    epochs(EncodedStream(Shard(ROWS), off, seed=0, cache_bytes=0), 2)
    assert off.calls == 2 * len(ROWS)


def test_epochs_are_reshuffled():
    stream = EncodedStream(Shard(ROWS), Encoder(), seed=1, cache_bytes=1 << 20, buffer=16)
    it = iter(stream)
    orders = [[int(s.prompt_ids[0]) for s in itertools.islice(it, len(GOOD))] for _ in range(3)]
    assert orders[1] != orders[2] and sorted(orders[1]) == sorted(orders[2]) == GOOD


def test_a_shard_without_usable_rows_is_an_error_not_a_hang():
    stream = EncodedStream(Shard([{"sample_id": "x", "id": 0, "bad": True}]), Encoder(), seed=0, cache_bytes=1 << 20)
    with pytest.raises(RuntimeError, match="no usable rows"):
        next(iter(stream))
