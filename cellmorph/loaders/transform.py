"""The torch side of a batch: geometry, normalization and the ops of :mod:`cellmorph.augment`.

Geometry (the same for training and evaluation, in both loaders)::

    store image (S px) -> resize to R ~ image_size / view_fraction         (skipped when R == S)
                       -> [vflip, hflip, rotate about the centre]           (training only)
                       -> centre crop image_size
                       -> [log1p] -> standardize per channel and plate     (cellmorph/loaders/normalize.py)
                       -> [brightness/contrast]                             (training only)

``loader.image_size`` defaults to the store's size x view_fraction (config.default_image_size:
160 px fields -> 128, 96 px cell crops -> 76), so with the defaults R == S: no resize, and the
rotation's empty corners fall in the margin that the centre crop removes (up to ~17°).
Evaluation is the same chain without the random ops: a centre crop of the same field of view.
Resizing before rotating keeps rotation cheap when the store is much larger than R.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cellmorph.augment import BatchParams, active_ops
from cellmorph.config import LoaderConfig, default_image_size, view_size


@dataclass(frozen=True)
class Geometry:
    """Store size S, resize target R, centre crop (the training image size)."""

    store_size: int
    resize_to: int
    crop: int


def geometry(store_size: int, cfg: LoaderConfig) -> Geometry:
    # R - crop is kept even, so the centre crop is exactly centred (DALI's rotate centres its
    # output canvas on the input's centre). An unresolved image_size (a config used without
    # config.resolve_from_store) takes the store's default, as a run would record it.
    crop = cfg.image_size or default_image_size(store_size, cfg.view_fraction)
    return Geometry(store_size, view_size(crop, cfg.view_fraction), crop)


def crop_offset(size: int, crop: int) -> int:
    return (size - crop) // 2


def _crop_matrix(size: int, crop: int) -> np.ndarray:
    """Crop pixel j is resized pixel j + top: normalized n_size = n_crop*crop/size + shift."""
    top = crop_offset(size, crop)
    m = np.eye(3)
    m[0, 0] = m[1, 1] = crop / size
    m[0, 2] = m[1, 2] = (crop + 2 * top - size) / size
    return m


def _geometric(x: torch.Tensor, params: BatchParams, crop: int, ops: list[str]) -> torch.Tensor:
    size = x.shape[-1]
    mats = [op.torch(params.values) for op in active_ops(ops, "geometry")]
    if not mats or all(np.allclose(m, np.eye(3)) for m in mats):
        top = crop_offset(size, crop)
        return x[..., top : top + crop, top : top + crop]
    total = np.eye(3)
    for m in mats:  # image = rotate(hflip(vflip(x))): sampling maps compose the same way
        total = total @ m
    theta = torch.as_tensor((total @ _crop_matrix(size, crop))[:, :2], dtype=x.dtype)
    grid = F.affine_grid(theta.to(x.device), [len(x), x.shape[1], crop, crop], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint16 pixels (or their bits in an int16 tensor) as float32."""
    if x.device.type == "cpu":  # numpy's uint16 -> float32 cast is ~8x faster than torch's
        return torch.from_numpy(x.numpy().view(np.uint16).astype(np.float32))
    # CUDA kernels for torch.uint16 are minimal; widen the int16 bits with guaranteed ones.
    bits = x.view(torch.int16) if x.dtype == torch.uint16 else x
    return bits.to(torch.int32).bitwise_and_(0xFFFF).to(torch.float32)


def transform(
    x: torch.Tensor,
    params: BatchParams,
    geom: Geometry,
    norm: tuple[np.ndarray, np.ndarray],
    ops: list[str],
    log: bool,
) -> torch.Tensor:
    """uint16 ``(N, C, S, S)`` (see :func:`to_float`) -> float32 ``(N, C, crop, crop)``: resized,
    augmented, ``log1p`` when ``log``, standardized with per-sample ``norm`` ((N, C) mean, std)."""
    x = to_float(x)
    if geom.resize_to != geom.store_size:
        x = F.interpolate(
            x, size=(geom.resize_to,) * 2, mode="bilinear", antialias=True, align_corners=False
        )
    x = _geometric(x, params, geom.crop, ops).contiguous()
    if log:
        x = x.log1p_()
    mean, std = (torch.as_tensor(v, device=x.device)[:, :, None, None] for v in norm)
    x = x.sub_(mean).div_(std)
    for op in active_ops(ops, "intensity"):
        x = op.torch(x, params.values)
    return x
