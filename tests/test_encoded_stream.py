"""A Ray Train worker's sample stream: the shard is read every epoch, encoded samples are kept by key, and
every epoch yields one sample per row read (a rejected row's place goes to another sample)."""

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


def epochs(stream, n, rows=ROWS):
    """The sample ids of `n` epochs; an epoch is one sample per row of the shard."""
    it = iter(stream)
    return [sorted(int(s.prompt_ids[0]) for s in itertools.islice(it, len(rows))) for _ in range(n)]


def check(epoch, good=GOOD, rows=ROWS):
    assert len(epoch) == len(rows) and sorted(set(epoch)) == good  # every usable sample, rejects filled in


@pytest.mark.parametrize("cache_bytes", [0, 10 * PER_SAMPLE, len(GOOD) * PER_SAMPLE, 1 << 20])
def test_every_epoch_reads_the_shard_once_and_yields_every_sample_once(cache_bytes):
    # whatever the cache holds, the shard is read once per epoch: Ray Train's split needs every worker
    # to start each epoch's read (a worker replaying from memory left the others waiting: a deadlock)
    shard = Shard(ROWS)
    stream = EncodedStream(shard, Encoder(), seed=0, cache_bytes=cache_bytes, buffer=8)
    for epoch in epochs(stream, 3):
        check(epoch)
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
    orders = [[int(s.prompt_ids[0]) for s in itertools.islice(it, len(ROWS))] for _ in range(3)]
    assert orders[1] != orders[2] and sorted(orders[1]) == sorted(orders[2])
    check(orders[1])


def test_rejected_rows_are_replaced_so_every_worker_yields_one_sample_per_row():
    # Ray's equal split gives workers the same number of rows; with one sample per row they all reach the
    # next epoch's read at the same step, however many rows each one rejects
    rows = [{"sample_id": f"s{i}", "id": i, "bad": i in (0, 1, 5)} for i in range(8)]  # the first rows rejected
    good = [2, 3, 4, 6, 7]
    for cache_bytes in (0, 1 << 20):
        stream = EncodedStream(Shard(rows), Encoder(), seed=2, cache_bytes=cache_bytes, buffer=3)
        for epoch in epochs(stream, 3, rows):
            check(epoch, good, rows)
        assert stream.skipped == 3


def test_a_shard_without_usable_rows_is_an_error_not_a_hang():
    stream = EncodedStream(Shard([{"sample_id": "x", "id": 0, "bad": True}]), Encoder(), seed=0, cache_bytes=1 << 20)
    with pytest.raises(RuntimeError, match="no usable rows"):
        next(iter(stream))


def _sized(i: int, response: int) -> EncodedSample:
    ids = torch.full((3,), i)
    return EncodedSample(ids, torch.zeros(3, dtype=torch.long), torch.full((response,), i), None, None)


def _disjoint(batches) -> bool:
    """Each batch is a run of the length-sorted order: their length ranges do not interleave."""
    spans = sorted((min(b), max(b)) for b in batches)
    return all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))


def test_length_grouped_batches_are_runs_of_the_sorted_order_in_random_order():
    import random

    from bard_core.layout import length_grouped, packed_length

    samples = [_sized(i, 1 + (i * 7) % 23) for i in range(30)]
    orders = [length_grouped(samples, 4, random.Random(seed)) for seed in range(3)]
    for order in orders:
        assert sorted(int(s.prompt_ids[0]) for s in order) == list(range(30))  # a permutation
        lengths = [packed_length(s) for s in order]
        assert _disjoint([lengths[i:i + 4] for i in range(0, 28, 4)])
        assert lengths[28:] == sorted(packed_length(s) for s in samples)[28:]  # the partial batch last
    ids = [[int(s.prompt_ids[0]) for s in order] for order in orders]
    assert ids[0] != ids[1] or ids[0] != ids[2]  # the batches' order is random


class SizedEncoder(Encoder):
    def __call__(self, row):
        self.calls += 1
        return None if row["bad"] else _sized(row["id"], 1 + (row["id"] * 5) % 13)


def test_a_grouped_stream_yields_batches_of_similar_lengths_and_still_every_sample_each_epoch():
    from bard_core.layout import packed_length

    stream = EncodedStream(Shard(ROWS), SizedEncoder(), seed=3, cache_bytes=1 << 20, buffer=16, group=4)
    it = iter(stream)
    for _ in range(3):
        epoch = list(itertools.islice(it, len(ROWS)))
        check([int(s.prompt_ids[0]) for s in epoch])
        lengths = [packed_length(s) for s in epoch[:16]]  # the first buffer: four batches of four
        assert _disjoint([lengths[i:i + 4] for i in range(0, 16, 4)])
        assert len({max(lengths[i:i + 4]) for i in range(0, 16, 4)}) > 1


def test_grouped_streams_with_one_seed_put_their_kth_shortest_batches_on_the_same_step():
    # DDP workers read different shards; with one seed, each step's batches are of the same length rank on
    # every worker, so no worker waits at the all-reduce for another's longer batch
    from bard_core.layout import packed_length

    def batch_ranks(rows, seed):
        stream = EncodedStream(Shard(rows), SizedEncoder(), seed=seed, cache_bytes=1 << 20, buffer=16, group=4)
        first = list(itertools.islice(iter(stream), 16))  # one buffer
        lengths = [max(packed_length(s) for s in first[i:i + 4]) for i in range(0, 16, 4)]
        return [sorted(lengths).index(x) for x in lengths]

    good = [i for i in range(200) if i % 7 != 3][:40]
    shard_a = [{"sample_id": f"s{i}", "id": i, "bad": False} for i in good[:16]]
    shard_b = [{"sample_id": f"s{i}", "id": i, "bad": False} for i in good[16:32]]
    assert batch_ranks(shard_a, 5) == batch_ranks(shard_b, 5)
    assert any(batch_ranks(shard_a, 5) != batch_ranks(shard_a, seed) for seed in range(6, 12))


def test_rebalance_gives_long_samples_their_share_and_keeps_the_buffer_size():
    import random

    from tasks.train_worker import rebalance

    buffer = [_sized(i, 40 if i % 5 == 0 else 3) for i in range(40)]  # 8 long, 32 short
    is_long = lambda s: s.response_ids.numel() > 4  # noqa: E731
    out = rebalance(buffer, is_long, 0.5, random.Random(0))
    ids = [int(s.prompt_ids[0]) for s in out]
    long_ids = [i for i in ids if i % 5 == 0]
    short_ids = [i for i in ids if i % 5]
    assert len(out) == 40 and len(long_ids) == 20
    assert set(long_ids) == set(range(0, 40, 5))  # every long sample kept, the extra ones repeats of them
    assert max(long_ids.count(i) for i in set(long_ids)) - min(long_ids.count(i) for i in set(long_ids)) <= 1
    assert len(set(short_ids)) == len(short_ids) == 20  # short ones subsampled, never repeated
    assert rebalance(buffer, is_long, 0.1, random.Random(0)) == buffer  # already at its share: unchanged
    assert rebalance(buffer, lambda s: False, 0.5, random.Random(0)) == buffer  # nothing long to repeat


def test_a_long_share_holds_in_every_buffer_and_epochs_stay_one_sample_per_row():
    rows = [{"sample_id": f"s{i}", "id": i, "bad": False} for i in range(64)]

    class Lengths(Encoder):
        def __call__(self, row):
            return _sized(row["id"], 20 if row["id"] % 8 == 0 else 2)  # 1 in 8 longer than a block of 4

    for group in (0, 4):
        stream = EncodedStream(Shard(rows), Lengths(), seed=4, cache_bytes=1 << 20, buffer=16, group=group,
                               long_share=0.5, block_size=4)
        it = iter(stream)
        for _ in range(2):
            epoch = list(itertools.islice(it, len(rows)))
            assert len(epoch) == len(rows)
            for start in range(0, 64, 16):
                assert sum(s.response_ids.numel() > 4 for s in epoch[start:start + 16]) == 8
    # no block size (the AR objective): the data's own mix
    plain = EncodedStream(Shard(rows), Lengths(), seed=4, cache_bytes=1 << 20, buffer=16, long_share=0.5)
    assert sum(s.response_ids.numel() > 4 for s in itertools.islice(iter(plain), 64)) == 8


def test_rebalancing_leaves_the_ranks_batch_order_aligned():
    # workers whose buffers hold different numbers of long samples still order their batches with the
    # same draws (the rebalancing has its own generator)
    def order(rows):
        stream = EncodedStream(Shard(rows), SizedEncoder(), seed=5, cache_bytes=1 << 20, buffer=16, group=4,
                               long_share=0.6, block_size=6)
        first = list(itertools.islice(iter(stream), 16))
        lengths = [max(s.response_ids.numel() for s in first[i:i + 4]) for i in range(0, 16, 4)]
        return [sorted(lengths).index(x) for x in lengths]

    shard_a = [{"sample_id": f"s{i}", "id": i, "bad": False} for i in range(16)]
    shard_b = [{"sample_id": f"s{i}", "id": i, "bad": False} for i in range(16, 32)]
    assert order(shard_a) == order(shard_b)
