"""Per-rank epochs: equal parts, padding only, agreement without communication."""

from __future__ import annotations

import numpy as np
import pytest

from cellmorph.sampling import contiguous_runs, epoch_indices, epoch_permutation


def _all_ranks(order, epoch, seed, world_size, batch_size, drop_last=False):
    return [
        epoch_indices(order, epoch, seed, r, world_size, batch_size, drop_last)
        for r in range(world_size)
    ]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 4, 5])
@pytest.mark.parametrize("n", [1, 7, 23, 60])
def test_ranks_get_equal_batches_covering_every_sample(world_size, batch_size, n):
    order = np.arange(100, 100 + n)
    parts = _all_ranks(order, epoch=3, seed=11, world_size=world_size, batch_size=batch_size)
    lengths = {len(p) for p in parts}
    assert len(lengths) == 1, "every rank must run the same number of steps"
    per_rank = lengths.pop()
    assert per_rank % batch_size == 0 and per_rank > 0
    everything = np.concatenate(parts)
    assert set(everything.tolist()) == set(order.tolist())
    # The only repeats are the padding that fills the last global batch.
    counts = np.unique(everything, return_counts=True)[1]
    padding = len(everything) - n
    assert padding == (counts - 1).sum()
    assert padding < world_size * batch_size


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_parts_are_slices_of_one_global_permutation(world_size):
    order = np.arange(50) * 2
    perm = epoch_permutation(order, epoch=1, seed=5)
    parts = _all_ranks(order, 1, 5, world_size, batch_size=4)
    joined = np.concatenate(parts)
    # Ranks computed independently agree: together they are the permutation, then padding.
    np.testing.assert_array_equal(joined[: len(order)], perm)


def test_deterministic_per_seed_and_epoch_and_different_across_epochs():
    order = np.arange(1000)
    a = epoch_indices(order, 2, 7, rank=1, world_size=3, batch_size=8)
    b = epoch_indices(order, 2, 7, rank=1, world_size=3, batch_size=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, epoch_indices(order, 3, 7, rank=1, world_size=3, batch_size=8))
    assert not np.array_equal(a, epoch_indices(order, 2, 8, rank=1, world_size=3, batch_size=8))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_drop_last_has_no_repeats(world_size):
    order = np.arange(47)
    parts = _all_ranks(order, 0, 0, world_size, batch_size=4, drop_last=True)
    joined = np.concatenate(parts)
    assert len({len(p) for p in parts}) == 1
    assert len(joined) == (47 // (4 * world_size)) * 4 * world_size
    assert len(np.unique(joined)) == len(joined)


def test_oversampled_order_keeps_its_repeats():
    order = np.array([0, 0, 0, 1, 2, 2])
    joined = np.concatenate(_all_ranks(order, 0, 0, world_size=2, batch_size=3))
    np.testing.assert_array_equal(np.sort(joined), np.sort(order))


def test_bad_rank_or_sizes_raise():
    with pytest.raises(ValueError, match="rank 2"):
        epoch_indices(np.arange(4), 0, 0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        epoch_indices(np.arange(4), 0, 0, batch_size=0)
    assert len(epoch_indices(np.arange(0), 0, 0, world_size=2, rank=1)) == 0


def test_contiguous_runs_cover_the_batch_and_respect_shards():
    rows = np.array([9, 3, 4, 5, 5, 10, 11, 12, 20])
    np.testing.assert_array_equal(contiguous_runs(rows), [[3, 6], [9, 13], [20, 21]])
    runs = contiguous_runs(rows, shard_size=10)
    np.testing.assert_array_equal(runs, [[3, 6], [9, 10], [10, 13], [20, 21]])
    covered = np.concatenate([np.arange(a, b) for a, b in runs])
    np.testing.assert_array_equal(covered, np.unique(rows))
    assert contiguous_runs(np.array([], dtype=np.int64)).shape == (0, 2)


@pytest.mark.parametrize("world_size", [1, 3])
def test_counts_give_the_epochs_of_the_repeated_order(world_size):
    rows = np.arange(0, 400, 4, dtype=np.int32)
    repeats = np.random.default_rng(0).integers(0, 4, len(rows)).astype(np.uint8)
    for epoch in range(3):
        for rank in range(world_size):
            want = epoch_indices(np.repeat(rows, repeats), epoch, 9, rank, world_size, 8)
            got = epoch_indices(rows, epoch, 9, rank, world_size, 8, repeats=repeats)
            np.testing.assert_array_equal(got, want)
            assert got.dtype == np.int32
    with pytest.raises(ValueError, match="3 repeats for 100 rows"):
        epoch_indices(rows, 0, 0, repeats=repeats[:3])


def test_a_rank_holds_one_epoch_long_array_at_most(monkeypatch):
    """An oversampled epoch ~2x the fold: building it from counts costs one epoch-long array
    (shuffled in place) plus the rank's part, not the order and its shuffled copy."""
    import tracemalloc

    from cellmorph import codes

    monkeypatch.setattr(codes, "BLOCK", 1 << 16)  # a pilot-sized fold is many blocks
    rows = np.arange(1_000_000, dtype=np.int32)
    repeats = np.full(len(rows), 2, np.uint8)
    epoch_bytes = 2 * len(rows) * 4
    tracemalloc.start()
    try:
        epoch_indices(rows, 0, 0, rank=0, world_size=8, batch_size=64, repeats=repeats)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        epoch_indices(np.repeat(rows, repeats), 0, 0, rank=0, world_size=8, batch_size=64)
        listed = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.2 * epoch_bytes < listed
