"""Per-rank epochs: one global permutation per epoch, cut into equal parts.

Every rank computes the same permutation from (seed, epoch), so ranks agree without talking;
padding the permutation to a multiple of ``world_size * batch_size`` (by wrapping around) gives
every rank the same number of full batches, so DDP never waits on a rank that ran out.
"""

from __future__ import annotations

import numpy as np


def epoch_permutation(order: np.ndarray, epoch: int, seed: int) -> np.ndarray:
    """The global shuffled order of ``order`` for one epoch (identical on every rank)."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed ({seed}) and epoch ({epoch}) must be >= 0")
    rng = np.random.default_rng([seed, epoch])
    return order[rng.permutation(len(order))]


def epoch_indices(
    order: np.ndarray,
    epoch: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 1,
    drop_last: bool = False,
) -> np.ndarray:
    """This rank's part of the epoch: equal length on every rank, a multiple of ``batch_size``.

    With ``drop_last`` the tail that does not fill a batch on every rank is dropped; otherwise
    the permutation is padded by wrapping around, so a few samples repeat (at most
    ``world_size * batch_size - 1``).
    """
    if world_size < 1 or batch_size < 1:
        raise ValueError(f"world_size ({world_size}) and batch_size ({batch_size}) must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    n = len(order)
    if n == 0:
        return order[:0]
    perm = epoch_permutation(np.asarray(order), epoch, seed)
    step = world_size * batch_size
    if drop_last and n >= step:
        total = (n // step) * step
        perm = perm[:total]
    else:
        total = -(-n // step) * step
        if total > n:
            perm = np.concatenate([perm, np.resize(perm, total - n)])
    per_rank = total // world_size
    return perm[rank * per_rank : (rank + 1) * per_rank]


def contiguous_runs(rows: np.ndarray, shard_size: int | None = None) -> np.ndarray:
    """``(R, 2)`` [start, stop) runs covering the distinct ``rows`` of a batch, in store order.

    A loader reads each run with one slice instead of one call per image; with ``shard_size``
    no run crosses a shard boundary, so each run is one shard's bytes. The epoch stays
    uniformly shuffled: only the reads within a batch are reordered.
    """
    r = np.unique(np.asarray(rows, dtype=np.int64))
    if r.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    cut = np.diff(r) != 1
    if shard_size:
        cut |= (r[1:] // shard_size) != (r[:-1] // shard_size)
    starts = r[np.r_[True, cut]]
    stops = r[np.r_[cut, True]] + 1
    return np.stack([starts, stops], axis=1)
