"""Which store rows form which batch, per epoch and rank; and one batch's pixels and parameters.

Both loaders draw batches from a :class:`BatchSource`, so their sampling is identical by
construction: training epochs come from ``sampling.epoch_indices`` (one global permutation per
epoch, equal length on every rank), evaluation covers contiguous parts of ``rows`` in order.
"""

from __future__ import annotations

import math

import numpy as np

from cellmorph.augment import BatchParams, batch_rng, sample_params
from cellmorph.config import LoaderConfig
from cellmorph.loaders.reader import ShardReader
from cellmorph.sampling import epoch_indices, epoch_size


class BatchSource:
    """Stateless per call: ``get(epoch, i)`` depends only on its arguments (safe in workers)."""

    def __init__(
        self,
        reader: ShardReader,
        rows: np.ndarray,
        cfg: LoaderConfig,
        *,
        train: bool,
        seed: int,
        rank: int,
        world_size: int,
        repeats: np.ndarray | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        if repeats is not None and not train:
            raise ValueError("repeats: an evaluation covers each row once")
        self.reader = reader
        # Kept as given, with the oversampling's counts rather than the oversampled order (the
        # index's own arrays, shared): each epoch builds the order, shuffles it and keeps this
        # rank's part, so a rank never holds more than one epoch-long array (205 M entries,
        # 0.8 GB, at the pilot's 75 M cells). Each batch is int64.
        self.rows = np.asarray(rows)
        self.repeats = None if repeats is None else np.asarray(repeats)
        self.epoch_size = epoch_size(self.rows, self.repeats)
        self.cfg = cfg
        self.train = train
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batch_size = cfg.batch_size if train else cfg.eval_batch_size
        self.channels = reader.shape[1]
        self._cached: tuple[int, list[np.ndarray]] | None = None

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same every epoch)."""
        n = self.epoch_size
        if self.train:
            return math.ceil(n / (self.world_size * self.batch_size)) if n else 0
        part = n // self.world_size + (1 if self.rank < n % self.world_size else 0)
        return math.ceil(part / self.batch_size)

    def batches(self, epoch: int) -> list[np.ndarray]:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = None  # the last epoch's part goes before the next one is built
            self._cached = (epoch, self._split(epoch))
        return self._cached[1]

    def _split(self, epoch: int) -> list[np.ndarray]:
        if self.train:
            part = epoch_indices(self.rows, epoch, self.seed, self.rank, self.world_size,
                                 self.batch_size, repeats=self.repeats)  # fmt: skip
        else:
            part = np.array_split(self.rows, self.world_size)[self.rank]
        return [part[i : i + self.batch_size] for i in range(0, len(part), self.batch_size)]

    def get(
        self, epoch: int, i: int, raw: bool = False
    ) -> tuple[np.ndarray | list[bytes], np.ndarray, BatchParams]:
        """Batch ``i`` of ``epoch``: images (uint16 (N, C, S, S), or compressed chunks when
        ``raw``), store rows, random parameters."""
        rows = self.batches(epoch)[i].astype(np.int64)  # own, writable (torch.from_numpy)
        rng = batch_rng(self.seed, epoch, self.rank, i)
        params = sample_params(self.cfg, len(rows), self.channels, rng, self.train)
        images = self.reader.read_raw(rows) if raw else self.reader.read(rows)
        return images, rows, params
