"""The torch side of a batch: geometry, normalization and the ops of :mod:`cellmorph.augment`.

Geometry (the same for training and evaluation, in both loaders)::

    store image (S px) -> resize to R = round(image_size / view_fraction)   (skipped when R == S)
                       -> [vflip, hflip, rotate about the centre]           (training only)
                       -> centre crop image_size
                       -> normalize per channel -> [brightness/contrast]    (training only)

With the defaults (store 160 px, image_size 128, view_fraction 0.8) R == S: no resize, and the
rotation's empty corners fall in the 16 px margin that the centre crop removes (up to ~17°).
Evaluation is the same chain without the random ops: a centre crop of the same field of view.
Resizing before rotating keeps rotation cheap when the store is much larger than R.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cellmorph.augment import BatchParams, active_ops
from cellmorph.config import LoaderConfig
from cellmorph.errors import CellmorphError
from cellmorph.store import Store

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
UINT16_MAX = 65535.0


@dataclass(frozen=True)
class Geometry:
    """Store size S, resize target R, centre crop (the training image size)."""

    store_size: int
    resize_to: int
    crop: int


def geometry(store_size: int, cfg: LoaderConfig) -> Geometry:
    # R - crop is kept even, so the centre crop is exactly centred (DALI's rotate centres its
    # output canvas on the input's centre).
    margin = round((cfg.image_size / cfg.view_fraction - cfg.image_size) / 2)
    resize_to = cfg.image_size + 2 * max(0, margin)
    return Geometry(store_size=store_size, resize_to=resize_to, crop=cfg.image_size)


def normalization(store: Store, cfg: LoaderConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std in store units (uint16 intensities), float32 length C."""
    if cfg.normalize == "store":
        return store.mean_std()
    c = len(store.channels)
    if c != 3:
        raise CellmorphError(
            f"loader.normalize: 'imagenet' needs a 3-channel RGB store, {store.path} has {c} "
            f"channels ({', '.join(store.channels)}); use loader.normalize=store"
        )
    # ImageNet statistics are for [0, 1] pixels; the store holds the full uint16 range.
    return IMAGENET_MEAN * UINT16_MAX, IMAGENET_STD * UINT16_MAX


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
    mean: np.ndarray,
    std: np.ndarray,
    ops: list[str],
) -> torch.Tensor:
    """uint16 ``(N, C, S, S)`` (see :func:`to_float`) -> float32 ``(N, C, crop, crop)``, augmented and normalized."""
    x = to_float(x)
    if geom.resize_to != geom.store_size:
        x = F.interpolate(
            x, size=(geom.resize_to,) * 2, mode="bilinear", antialias=True, align_corners=False
        )
    x = _geometric(x, params, geom.crop, ops)
    x = x.contiguous()
    m = torch.as_tensor(mean, device=x.device)[None, :, None, None]
    s = torch.as_tensor(std, device=x.device)[None, :, None, None]
    x = x.sub_(m).div_(s)
    for op in active_ops(ops, "intensity"):
        x = op.torch(x, params.values)
    return x
