"""The DALI loader: parallel ``external_source`` fed from the store, augmentation in DALI.

One pipeline definition serves both devices. With a GPU (``device_id`` = the worker's CUDA
device) an LZ4 store is decompressed on the GPU (``fn.decoders.inflate``, the current name of
``fn.experimental.inflate``) from the raw chunk bytes; any other codec is decoded on the CPU by
the shard reader. All augmentation runs on the pipeline's device. With ``device_id=None`` the
same definition runs CPU operators only.

Sampling and random parameters come from the shared :class:`BatchSource`: the callback draws
each batch's parameters exactly as the torch loader does and passes them to DALI as per-sample
inputs; each op's DALI implementation lives with the op in :mod:`cellmorph.augment`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from cellmorph.augment import active_ops, dali_arrays, dali_fields
from cellmorph.config import LoaderConfig
from cellmorph.errors import CellmorphError, worker_errors
from cellmorph.loaders.normalize import RowNorm
from cellmorph.loaders.plan import BatchSource
from cellmorph.loaders.transform import Geometry

OUTPUTS = ["images", "rows"]
_LZ4_PREFIX = 4  # numcodecs' LZ4 frames start with the uncompressed size (uint32 LE)


def import_dali() -> Any:
    """``nvidia.dali`` or a CellmorphError naming ``loader.kind``."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA runtime inside DALI
        raise CellmorphError(
            f"loader.kind: 'dali' needs NVIDIA DALI (import nvidia.dali failed: {e}); "
            "install nvidia-dali-cuda120 or set loader.kind=torch"
        ) from None
    return dali


class _Callback:
    """The parallel external source's batch callback (picklable, stateless per call)."""

    def __init__(
        self, source: BatchSource, epoch_base: int, raw: bool, ops: list[str], norm: RowNorm
    ):
        self.source, self.epoch_base, self.raw, self.ops = source, epoch_base, raw, ops
        self.norm = norm
        self.nbatches = len(source)

    @property
    def fields(self) -> list[str]:
        return ["images", "rows", "mean", "std", *dali_fields(self.ops)]

    def __call__(self, info: Any) -> tuple:
        # DALI prefetches past the end; every call beyond it must stop again.
        if info.iteration >= self.nbatches:
            raise StopIteration
        epoch = self.epoch_base + info.epoch_idx
        images, rows, params = self.source.get(epoch, info.iteration, raw=self.raw)
        if self.raw:  # read_raw checked each chunk's crc32c and removed it
            images = [np.frombuffer(b, np.uint8)[_LZ4_PREFIX:] for b in images]
        mean, std = self.norm(rows)  # per sample: the image's plate
        return (images, rows.astype(np.int64), mean, std, *dali_arrays(params, self.ops))


def _define(callback: _Callback, geom: Geometry, channels: int, gpu: bool, prefetch: int):
    """The pipeline graph; returns (images float32 CHW, rows)."""
    from nvidia.dali import fn, types

    outs = fn.external_source(
        source=callback,
        num_outputs=len(callback.fields),
        batch=True,
        batch_info=True,
        parallel=True,
        prefetch_queue_depth=prefetch,
    )
    f = dict(zip(callback.fields, outs))
    images = f["images"]
    s = geom.store_size
    if callback.raw:
        # GPU inflate of LZ4 chunks into (C, S, S) uint16; it only exists on the GPU.
        images = fn.decoders.inflate(
            images.gpu(), shape=[channels, s, s], dtype=types.UINT16, algorithm="LZ4"
        )
    elif gpu:
        images = images.gpu()
    # The image ops want channels last; the store is channel-first.
    images = fn.transpose(images, perm=[1, 2, 0], output_layout="HWC")
    # rotate rejects uint16 on the CPU backend, so convert to float first: resize emits float
    # directly, and resizing first keeps the geometry ops cheap.
    if geom.resize_to != s:
        images = fn.resize(
            images,
            size=[geom.resize_to, geom.resize_to],
            interp_type=types.INTERP_LINEAR,
            antialias=True,
            dtype=types.FLOAT,
        )
    else:
        images = fn.cast(images, dtype=types.FLOAT)
    for op in active_ops(callback.ops, "geometry"):
        images = op.dali(images, f, geom.crop, gpu)
    if callback.norm.log:
        from nvidia.dali import math as dmath

        images = dmath.log(images + 1.0)  # log1p, as the torch loader
    images = fn.crop_mirror_normalize(
        images, crop=[geom.crop, geom.crop], mean=f["mean"], std=f["std"],
        dtype=types.FLOAT, output_layout="CHW",
    )  # fmt: skip
    for op in active_ops(callback.ops, "intensity"):
        images = op.dali(images, f, geom.crop, gpu)
    return images, f["rows"]


class DaliLoader:
    """Loader protocol on a DALI pipeline; rebuilt only when epochs are not consumed in order."""

    def __init__(
        self,
        source: BatchSource,
        labels: np.ndarray,
        cfg: LoaderConfig,
        device: torch.device,
        geom: Geometry,
        norm: RowNorm,
    ):
        import_dali()
        self.source, self.cfg, self.geom, self.norm = source, cfg, geom, norm
        self.labels = torch.from_numpy(labels)  # the index's own (int8 up to 127 classes)
        self.device = device
        self.device_id = _device_id(device)
        # GPU inflate only for LZ4 chunks read straight from the shards.
        self.raw = self.device_id is not None and source.reader.codec_id == "lz4"
        self.epoch = 0
        self._pipe: Any = None
        self._iter: Any = None
        self._next_epoch: int | None = None  # the epoch the live pipeline will produce next

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def _build(self, epoch: int) -> None:
        from nvidia.dali import pipeline_def
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.close()
        ops = list(self.cfg.augment) if self.source.train else []
        cb = _Callback(self.source, epoch, self.raw, ops, self.norm)
        pipe = pipeline_def(_define)(
            cb,
            self.geom,
            self.source.channels,
            self.device_id is not None,
            self.cfg.prefetch,
            batch_size=self.source.batch_size,
            num_threads=self.cfg.dali_threads,
            device_id=self.device_id,
            py_num_workers=max(1, self.cfg.num_workers),
            # fork is unsafe once CUDA is initialised in this process (Ray Train's GPU workers).
            py_start_method="fork" if self.device_id is None else "spawn",
            prefetch_queue_depth=self.cfg.prefetch,
            seed=self.source.seed,
        )
        pipe.build()
        self._pipe = pipe
        self._iter = DALIGenericIterator(
            [pipe], OUTPUTS, last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False
        )
        self._next_epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        # A damaged chunk found by a worker's reader comes back as a bare Exception.
        with worker_errors():
            yield from self._batches()

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if len(self) == 0:
            return
        epoch = self.epoch if self.source.train else 0
        if self._iter is None or self._next_epoch != epoch:
            self._build(epoch)
        self._next_epoch = None  # unknown until this epoch is fully consumed
        for out in self._iter:
            d = out[0]
            rows = d["rows"].reshape(-1).cpu()
            x = d["images"].to(self.device, non_blocking=True)
            yield x, self.labels[rows].long().to(self.device, non_blocking=True), rows
        self._iter.reset()
        self._next_epoch = epoch + 1 if self.source.train else 0

    def close(self) -> None:
        """Stop the pipeline and its Python workers."""
        self._iter = None
        if self._pipe is not None:
            del self._pipe
            self._pipe = None

    def __del__(self) -> None:
        self.close()


def _device_id(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()
