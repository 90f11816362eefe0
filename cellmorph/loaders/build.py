"""``build_loader``: a torch or DALI loader over rows of a store, for one rank."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from cellmorph.config import LoaderConfig
from cellmorph.errors import CellmorphError
from cellmorph.loaders.normalize import Normalization, RowNorm, from_store
from cellmorph.loaders.plan import BatchSource
from cellmorph.loaders.reader import ShardReader
from cellmorph.loaders.transform import geometry
from cellmorph.store.read import Store


class Loader(Protocol):
    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]: ...


def _check_inputs(store: Store, rows: np.ndarray, labels: np.ndarray) -> None:
    n = len(store)
    if len(labels) != n:
        raise CellmorphError(
            f"{store.path}: {len(labels)} labels for {n} store rows (labels are per store row)"
        )
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise CellmorphError(f"{store.path}: loader rows outside 0..{n - 1}")
    if len(rows) and labels[rows].min() < 0:
        raise CellmorphError(f"{store.path}: loader rows include images without a label")
    h, w = store.shape[2:]
    if h != w:
        raise CellmorphError(f"{store.path}: images are {h}x{w}; the loaders need square images")


def build_loader(
    store: Store,
    rows: np.ndarray,
    labels: np.ndarray,
    cfg: LoaderConfig,
    *,
    train: bool,
    device: torch.device,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    norm: Normalization | None = None,
    repeats: np.ndarray | None = None,
) -> Loader:
    """A torch or DALI loader (``cfg.kind``) over ``rows`` of the store for this rank.

    ``labels`` holds one class per store row (any signed integer type; shared, not copied:
    at 75 M cells an int64 copy per loader was 600 MB). Training epochs are reshuffled per
    ``set_epoch`` with equal length on every rank; evaluation covers this rank's contiguous
    part of ``rows`` once, in order, without augmentation. ``norm`` replaces the one ``cfg``
    asks for with the store's statistics (a trained model brings its own: predict).
    ``repeats`` (training only) counts each row's copies in an epoch: the index's oversampling,
    kept as counts (:attr:`Index.train_repeats`) instead of an order twice as long.
    """
    rows = np.asarray(rows)
    if rows.dtype.kind not in "iu":
        rows = rows.astype(np.int64)
    labels = np.require(labels, requirements="W")  # torch shares it (a copy if read-only)
    _check_inputs(store, rows, labels)
    norm = norm or from_store(store, cfg)
    rownorm = RowNorm(norm, norm.row_groups(store))
    geom = geometry(int(store.shape[-1]), cfg)
    reader = ShardReader(store, threads=cfg.reader_threads, cache_dir=cfg.cache_dir,
                         cache_bytes=int(cfg.cache_gb * 2**30))  # fmt: skip
    source = BatchSource(reader, rows, cfg, train=train, seed=seed, rank=rank,
                         world_size=world_size, repeats=repeats)  # fmt: skip
    if cfg.kind == "dali":
        from cellmorph.loaders.dali_loader import DaliLoader, import_dali

        import_dali()
        return DaliLoader(source, labels, cfg, device, geom, rownorm)
    from cellmorph.loaders.torch_loader import TorchLoader

    return TorchLoader(source, labels, cfg, device, geom, rownorm)
