"""The torch loader: BatchSource batches in a DataLoader, augmented with the torch ops.

The reference implementation (parity tests) and the fallback where DALI is missing. Workers
produce whole batches (the reader decodes a batch in one call); on a CPU device they also
augment, so training's process only trains; on a CUDA device the uint16 batch is copied to
the GPU (pinned memory, the next batch's copy overlapping the current step) and augmented there.

The DataLoader and its worker processes are built once and kept across epochs: the sampler
hands out ``(epoch, batch)`` pairs, so a new epoch needs no new workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cellmorph.augment import BatchParams
from cellmorph.config import LoaderConfig
from cellmorph.loaders.normalize import RowNorm
from cellmorph.loaders.plan import BatchSource
from cellmorph.loaders.transform import Geometry, transform

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class _Batches(Dataset):
    """Item ``(epoch, i)``: batch ``i`` of ``epoch``, augmented here when training on the CPU."""

    def __init__(self, source: BatchSource, augment_here: bool, prep: dict, norm: RowNorm):
        self.source, self.augment_here, self.prep, self.norm = source, augment_here, prep, norm

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, BatchParams]:
        epoch, i = key
        images, rows, params = self.source.get(epoch, i)
        if self.augment_here:
            x = transform(torch.from_numpy(images), params, norm=self.norm(rows), **self.prep)
        else:  # shipped as int16 bits: device copies of torch.uint16 are not guaranteed
            x = torch.from_numpy(images.view(np.int16))
        return x, torch.from_numpy(rows), params


class _EpochSampler(Sampler):
    """Yields ``(epoch, i)`` for every batch of the current epoch (read in the main process)."""

    def __init__(self, n: int):
        self.n, self.epoch = n, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(epoch, i) for i in range(self.n)])


class TorchLoader:
    """Loader protocol: ``set_epoch``, ``len`` (batches on this rank), iterate (x, y, rows)."""

    def __init__(
        self,
        source: BatchSource,
        labels: np.ndarray,
        cfg: LoaderConfig,
        device: torch.device,
        geom: Geometry,
        norm: RowNorm,
    ):
        self.source, self.cfg, self.device, self.norm = source, cfg, device, norm
        self.labels = torch.from_numpy(labels)  # the index's own (int8 up to 127 classes)
        ops = list(cfg.augment) if source.train else []
        self.prep = {"geom": geom, "ops": ops, "log": norm.log}
        self.on_cpu = device.type == "cpu"
        self.sampler = _EpochSampler(len(source))
        workers = cfg.num_workers
        self.dataloader = DataLoader(
            _Batches(source, self.on_cpu, self.prep, norm),
            batch_size=None,
            sampler=self.sampler,
            num_workers=workers,
            pin_memory=not self.on_cpu,
            prefetch_factor=cfg.prefetch if workers else None,
            persistent_workers=workers > 0,
        )

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch if self.source.train else 0

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[Batch]:
        batches = (self._to_device(b) for b in self.dataloader)
        if not self.on_cpu:
            batches = _overlapped(batches, self.device)
        for x, y, rows, params in batches:
            if not self.on_cpu:  # uint16 bits -> augmented float32, on the GPU
                x = transform(x, params, norm=self.norm(rows.numpy()), **self.prep)
            yield x, y, rows

    def _to_device(self, batch: tuple[torch.Tensor, torch.Tensor, BatchParams]) -> tuple:
        x, rows, params = batch
        y = self.labels[rows].long()
        if self.on_cpu:
            return x, y, rows, params
        return (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                rows, params)  # fmt: skip


def _overlapped(batches: Iterator[tuple], device: torch.device) -> Iterator[tuple]:
    """Queue batch i+1's host-to-device copy on a side stream while batch i is in use."""
    stream = torch.cuda.Stream(device)
    main = torch.cuda.current_stream(device)

    def pull() -> tuple | None:
        with torch.cuda.stream(stream):  # the non_blocking copies are queued on the side stream
            return next(batches, None)

    nxt = pull()
    while nxt is not None:
        main.wait_stream(stream)
        for t in nxt[:2]:
            t.record_stream(main)  # the caching allocator must not hand them out early
        cur, nxt = nxt, pull()
        yield cur
