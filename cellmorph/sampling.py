"""Per-rank epochs: one global permutation per epoch, cut into equal parts.

Every rank computes the same permutation from (seed, epoch), so ranks agree without talking;
padding the permutation to a multiple of ``world_size * batch_size`` (by wrapping around) gives
every rank the same number of full batches, so DDP never waits on a rank that ran out.
"""

from __future__ import annotations

import numpy as np

from cellmorph.codes import repeat


def epoch_permutation(
    order: np.ndarray, epoch: int, seed: int, repeats: np.ndarray | None = None
) -> np.ndarray:
    """The global shuffled order of ``order`` for one epoch (identical on every rank).

    ``order[rng.permutation(len(order))]``, computed by shuffling a copy of ``order`` with the
    same generator (the same swaps): one array of ``order``'s type, not two int64 ones. With
    ``repeats``, the order is ``np.repeat(order, repeats)``, built here into the array that is
    shuffled, so a caller keeps only the rows and their counts (the pilot's oversampled epoch is
    205 M entries for 45 M training cells: 0.8 GB a copy).
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed ({seed}) and epoch ({epoch}) must be >= 0")
    rng = np.random.default_rng([seed, epoch])
    out = np.array(order) if repeats is None else repeat(order, repeats)
    rng.shuffle(out)
    return out


def epoch_indices(
    order: np.ndarray,
    epoch: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 1,
    drop_last: bool = False,
    repeats: np.ndarray | None = None,
) -> np.ndarray:
    """This rank's part of the epoch: equal length on every rank, a multiple of ``batch_size``.

    With ``drop_last`` the tail that does not fill a batch on every rank is dropped; otherwise
    the permutation is padded by wrapping around, so a few samples repeat (at most
    ``world_size * batch_size - 1``). The part is a copy: the whole permutation is freed.
    ``repeats`` counts each entry of ``order`` (as :func:`epoch_permutation`).
    """
    if world_size < 1 or batch_size < 1:
        raise ValueError(f"world_size ({world_size}) and batch_size ({batch_size}) must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    n = epoch_size(order, repeats)
    if n == 0:
        return np.asarray(order)[:0]
    perm = epoch_permutation(np.asarray(order), epoch, seed, repeats)
    step = world_size * batch_size
    total = (n // step) * step if drop_last and n >= step else -(-n // step) * step
    per_rank = total // world_size
    return _wrapped(perm, rank * per_rank, (rank + 1) * per_rank)


def epoch_size(order: np.ndarray, repeats: np.ndarray | None = None) -> int:
    """Entries of an epoch over ``order``, each ``repeats`` times (once without)."""
    if repeats is None:
        return len(order)
    if len(repeats) != len(order):
        raise ValueError(f"{len(repeats)} repeats for {len(order)} rows")
    return int(np.sum(repeats, dtype=np.int64))


def _wrapped(perm: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Positions ``[start, stop)`` of ``perm`` repeated end to end (``np.resize``'s padding)."""
    parts = []
    while start < stop:
        at = start % len(perm)
        take = min(len(perm) - at, stop - start)
        parts.append(perm[at : at + take])
        start += take
    return np.concatenate(parts)


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


def stratified_sample(labels: np.ndarray, max_points: int, seed: int) -> np.ndarray:
    """At most ``max_points`` positions, each class in proportion to its size but at least
    ``min(its size, max_points // classes)`` (rare classes stay visible); deterministic."""
    n = len(labels)
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    floor = max(1, max_points // (2 * len(classes)))
    share = np.maximum(np.minimum(counts, floor), np.floor(counts * max_points / n)).astype(int)
    while share.sum() > max_points:  # trim the largest shares first
        share[np.argmax(share)] -= 1
    by_class = np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1])
    picks = [rng.choice(members, k, replace=False)
             for members, k in zip(by_class, share) if k]  # fmt: skip
    return np.sort(np.concatenate(picks))


# Wells profiled by copairs (phenotypic activity). It compares every pair of a treatment's wells
# and every treatment well with every control well, so its cost grows with the square of the
# wells per treatment (2,000 wells of 2 treatments: 2 M pairs, a minute and more); above these
# caps a seeded sample is profiled, and the result says so.
PROFILE_PER_TREATMENT = 25
PROFILE_NEGCON_WELLS = 250
PROFILE_MAX_WELLS = 2_000
PROFILE_SAMPLE = (
    f"at most {PROFILE_PER_TREATMENT} wells per treatment, {PROFILE_NEGCON_WELLS} negative "
    f"control wells and {PROFILE_MAX_WELLS} wells in all, drawn at random (seeded)"
)


def sample_wells(treatment: np.ndarray, negcon: np.ndarray, seed: int) -> np.ndarray:
    """Positions of the wells to profile (ascending): every well of a treatment with at most
    :data:`PROFILE_PER_TREATMENT` wells, a random subset of larger ones, at most
    :data:`PROFILE_NEGCON_WELLS` negative controls, then a stratified sample down to
    :data:`PROFILE_MAX_WELLS`; deterministic for ``seed``."""
    strata = np.where(np.asarray(negcon, bool), "\x00negcon", np.asarray(treatment, str))
    codes = np.unique(strata, return_inverse=True)[1]
    rng = np.random.default_rng([seed, 0x9A])
    order = np.argsort(codes, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(codes))[:-1])
    neg = np.asarray(negcon, bool)
    keep = np.sort(np.concatenate([
        g if len(g) <= (cap := PROFILE_NEGCON_WELLS if neg[g[0]] else PROFILE_PER_TREATMENT)
        else rng.choice(g, cap, replace=False)
        for g in groups if len(g)
    ]))  # fmt: skip
    return keep[stratified_sample(codes[keep], PROFILE_MAX_WELLS, seed)]
