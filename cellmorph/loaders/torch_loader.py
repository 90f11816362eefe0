"""The torch loader: BatchSource batches in a DataLoader, augmented with the torch ops.

The reference implementation (parity tests) and the fallback where DALI is missing. Workers
produce whole batches (the reader decodes a batch in one call); on a CPU device they also
augment, so training's process only trains; on a CUDA device the uint16 batch is copied to
the GPU and augmented there.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cellmorph.config import LoaderConfig
from cellmorph.loaders.augment import AugParams, Geometry, transform
from cellmorph.loaders.plan import BatchSource


class _EpochBatches(Dataset):
    def __init__(self, source: BatchSource, epoch: int, augment_here: bool, prep: dict):
        self.source, self.epoch, self.augment_here, self.prep = source, epoch, augment_here, prep

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, AugParams]:
        images, rows, params = self.source.get(self.epoch, i)
        if self.augment_here:
            x = transform(torch.from_numpy(images), params, **self.prep)
        else:  # shipped as int16 bits: device copies of torch.uint16 are not guaranteed
            x = torch.from_numpy(images.view(np.int16))
        return x, torch.from_numpy(rows), params


class TorchLoader:
    """Loader protocol: ``set_epoch``, ``len`` (batches on this rank), iterate (x, y, rows)."""

    def __init__(
        self,
        source: BatchSource,
        labels: np.ndarray,
        cfg: LoaderConfig,
        device: torch.device,
        geom: Geometry,
        mean: np.ndarray,
        std: np.ndarray,
    ):
        self.source, self.cfg, self.device = source, cfg, device
        self.labels = torch.tensor(np.asarray(labels, dtype=np.int64))
        ops = list(cfg.augment) if source.train else []
        self.prep = {"geom": geom, "mean": mean, "std": std, "ops": ops}
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        on_cpu = self.device.type == "cpu"
        workers = self.cfg.num_workers
        dl = DataLoader(
            _EpochBatches(self.source, self.epoch, on_cpu, self.prep),
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            pin_memory=not on_cpu,
            prefetch_factor=self.cfg.prefetch if workers else None,
        )
        for x, rows, params in dl:
            x = x.to(self.device, non_blocking=True)
            if not on_cpu:
                x = transform(x, params, **self.prep)
            yield x, self.labels[rows].to(self.device, non_blocking=True), rows
