"""Augmentation ops, each defined once: its parameter sampler, its torch op and its DALI op.

``loader.augment`` is a short list of names from :data:`OPS`; ops apply in the registry's order,
whatever the order of the list. Both loaders draw a batch's random parameters with
:func:`sample_params` from a generator seeded by ``(seed, epoch, rank, batch)``, so a batch's
flips, angles and jitter do not depend on which worker or loader produced it: that is what makes
the torch/DALI parity tests possible.

Two stages (the same for both loaders; see ``cellmorph/loaders/transform.py`` for the sizes)::

    store image -> resize to R -> [geometry ops: vflip, hflip, rot90, rotate] -> centre crop
                -> normalize per channel -> [intensity ops: brightness_contrast]

The torch side composes geometry ops as affine sampling matrices (one ``grid_sample`` per batch
that computes only the cropped pixels); DALI runs them as operators on the same image. This module
imports only numpy: torch and DALI are imported by the functions that use them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

    from cellmorph.config import LoaderConfig

Params = dict[str, np.ndarray]  # field name -> per-sample values


@dataclass(frozen=True)
class BatchParams:
    """One batch's random parameters (a plain object: the DataLoader passes it through as is)."""

    n: int
    values: Params = field(default_factory=dict)


@dataclass(frozen=True)
class Op:
    """One augmentation.

    ``sample(n, channels, rng, cfg)`` returns this op's per-sample fields. Geometry ops give
    ``torch(values)`` -> ``(N, 3, 3)`` sampling matrices (output -> input in ``grid_sample``'s
    normalized coordinates); intensity ops give ``torch(x, values)`` -> ``x``. ``dali(images,
    args, crop, gpu)`` adds the op to a DALI graph, ``args`` holding its fields as pipeline
    inputs; a geometry op may already cut the image to the ``crop`` size around its centre.
    """

    name: str
    stage: Literal["geometry", "intensity"]
    fields: tuple[str, ...]
    sample: Callable[[int, int, np.random.Generator, LoaderConfig], Params]
    torch: Callable[..., Any]
    dali: Callable[[Any, dict[str, Any], int, bool], Any]


def _eye(n: int) -> np.ndarray:
    return np.tile(np.eye(3, dtype=np.float64), (n, 1, 1))


# ------------------------------------------------------------------------------------- flips
def _flip_sampler(key: str) -> Callable[[int, int, np.random.Generator, Any], Params]:
    def sample(n: int, channels: int, rng: np.random.Generator, cfg: Any) -> Params:
        return {key: rng.random(n) < 0.5}  # microscopy has no "up" and no "left"

    return sample


def _flip_matrix(key: str, axis: int) -> Callable[[Params], np.ndarray]:
    def matrices(v: Params) -> np.ndarray:
        m = _eye(len(v[key]))
        m[v[key], axis, axis] = -1  # a flip is exactly n -> -n with align_corners=False
        return m

    return matrices


def _flip_dali(key: str, horizontal: bool) -> Callable[[Any, dict[str, Any], int, bool], Any]:
    def add(images: Any, args: dict[str, Any], crop: int, gpu: bool) -> Any:
        from nvidia.dali import fn

        flag = args[key]
        if horizontal:
            return fn.flip(images, horizontal=flag, vertical=0)
        return fn.flip(images, horizontal=0, vertical=flag)

    return add


# ------------------------------------------------------------------------------------- rot90
def _rot90_sample(n: int, channels: int, rng: np.random.Generator, cfg: LoaderConfig) -> Params:
    return {"quarter": rng.integers(0, 4, n).astype(np.int32)}  # a field has no orientation


def _rot90_matrix(v: Params) -> np.ndarray:
    """Quarter turns, counter-clockwise as displayed: exact (pixel centres map onto centres)."""
    return _rotate_matrix({"angle": 90.0 * v["quarter"].astype(np.float32)})


def _rot90_dali(images: Any, args: dict[str, Any], crop: int, gpu: bool) -> Any:
    from nvidia.dali import fn, types

    # Nearest neighbour: a quarter turn moves pixel centres onto pixel centres, nothing blends.
    angle = fn.cast(args["quarter"], dtype=types.FLOAT) * 90.0
    return fn.rotate(images, angle=angle, keep_size=True, interp_type=types.INTERP_NN)


# ------------------------------------------------------------------------------------ rotate
def _rotate_sample(n: int, channels: int, rng: np.random.Generator, cfg: LoaderConfig) -> Params:
    d = cfg.rotate_degrees
    return {"angle": rng.uniform(-d, d, n).astype(np.float32)}


def _rotate_matrix(v: Params) -> np.ndarray:
    """Rotation about the centre by ``angle`` degrees, counter-clockwise as displayed."""
    a = np.deg2rad(v["angle"].astype(np.float64))
    m = _eye(len(a))
    m[:, 0, 0], m[:, 0, 1] = np.cos(a), -np.sin(a)
    m[:, 1, 0], m[:, 1, 1] = np.sin(a), np.cos(a)
    return m


def _rotate_dali(images: Any, args: dict[str, Any], crop: int, gpu: bool) -> Any:
    from nvidia.dali import fn, types

    # Straight into the crop-sized canvas, centred on the input's centre: only the kept pixels
    # are computed, and the corners the rotation empties fall in the margin left outside.
    return fn.rotate(
        images, angle=args["angle"], size=[crop, crop], fill_value=0.0,
        interp_type=types.INTERP_LINEAR,
    )  # fmt: skip


# -------------------------------------------------------------------- brightness / contrast
def _bc_sample(n: int, channels: int, rng: np.random.Generator, cfg: LoaderConfig) -> Params:
    shape = (n, channels)  # per sample and per channel: stains vary independently
    return {
        "contrast": rng.uniform(1 - cfg.contrast, 1 + cfg.contrast, shape).astype(np.float32),
        "brightness": rng.uniform(-cfg.brightness, cfg.brightness, shape).astype(np.float32),
    }


def _bc_torch(x: torch.Tensor, v: Params) -> torch.Tensor:
    """On the normalized image: ``x * contrast + brightness`` (brightness in channel stds)."""
    c = x.new_tensor(v["contrast"])[:, :, None, None]
    b = x.new_tensor(v["brightness"])[:, :, None, None]
    return x.mul_(c).add_(b)


def _bc_dali(images: Any, args: dict[str, Any], crop: int, gpu: bool) -> Any:
    c, b = args["contrast"], args["brightness"]  # (C, 1, 1) per sample: broadcast over CHW
    if gpu:
        c, b = c.gpu(), b.gpu()
    return images * c + b


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("vflip", "geometry", ("vflip",), _flip_sampler("vflip"), _flip_matrix("vflip", 1),
           _flip_dali("vflip", horizontal=False)),
        Op("hflip", "geometry", ("hflip",), _flip_sampler("hflip"), _flip_matrix("hflip", 0),
           _flip_dali("hflip", horizontal=True)),
        Op("rot90", "geometry", ("quarter",), _rot90_sample, _rot90_matrix, _rot90_dali),
        Op("rotate", "geometry", ("angle",), _rotate_sample, _rotate_matrix, _rotate_dali),
        Op("brightness_contrast", "intensity", ("contrast", "brightness"), _bc_sample, _bc_torch,
           _bc_dali),
    )
}  # fmt: skip
OP_NAMES: tuple[str, ...] = tuple(OPS)


def active_ops(names: list[str], stage: str | None = None) -> list[Op]:
    """The ops named in ``names``, in application order (optionally of one stage)."""
    return [op for op in OPS.values() if op.name in names and stage in (None, op.stage)]


def batch_rng(seed: int, epoch: int, rank: int, batch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, rank, batch, 0xA06])


def sample_params(
    cfg: LoaderConfig, n: int, channels: int, rng: np.random.Generator, train: bool
) -> BatchParams:
    """Parameters for the ops in ``cfg.augment`` (none when not training)."""
    values: Params = {}
    if train:
        for op in active_ops(list(cfg.augment)):
            values.update(op.sample(n, channels, rng, cfg))
    return BatchParams(n, values)


def dali_fields(names: list[str]) -> list[str]:
    """The per-sample fields the DALI callback sends for these ops, in a fixed order."""
    return [f for op in active_ops(names) for f in op.fields]


def dali_arrays(params: BatchParams, names: list[str]) -> list[np.ndarray]:
    """Each field as DALI wants it: flags int32, per-channel values (C, 1, 1) per sample."""
    out = []
    for f in dali_fields(names):
        v = params.values[f]
        if v.dtype == bool or v.dtype.kind == "i":
            out.append(v.astype(np.int32))
        elif v.ndim == 2:
            out.append(np.ascontiguousarray(v[:, :, None, None], dtype=np.float32))
        else:
            out.append(v.astype(np.float32))
    return out
