"""How stored pixels become model inputs: an intensity transform, then per-channel standardization.

Fluorescence intensities are heavy-tailed (a few bright nuclei, a dim cytoplasm), so the default
transform is ``log`` (``log1p`` of the uint16 value); ``linear`` keeps the raw scale. The
standardization statistics come from ``loader.normalize``:

- ``plate``: the mean and std of every image of the image's own plate (plate effects removed,
  as image-based profiling normalizes per plate);
- ``negcon``: those of the plate's negative-control wells (``Metadata_control_type == negcon``,
  DMSO), the profiling field's usual reference;
- ``store``: one set for the whole training store (kept with the checkpoint);
- ``imagenet``: ImageNet's RGB constants (3-channel renderings only; for comparisons).

Statistics are computed at conversion over every stored image (``attrs["plate_stats"]``) in both
spaces, so the torch and DALI loaders apply identical numbers. ``cellmorph predict`` on a new
plate standardizes with that plate's own statistics (``plate``/``negcon``), or with the training
store's (``store``), as saved in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cellmorph.config import LoaderConfig
from cellmorph.errors import CellmorphError
from cellmorph.store.layout import PLATE
from cellmorph.store.read import Store

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
UINT16_MAX = 65535.0
ALL = "*"  # the one "plate" of store-wide statistics
PER_PLATE = ("plate", "negcon")


@dataclass(frozen=True)
class Normalization:
    """``transform``, then ``(x - mean[p]) / std[p]`` with ``p`` the image's plate (row of the
    tables; a single row ``"*"`` for store-wide or ImageNet statistics)."""

    transform: str  # "log" or "linear"
    scope: str  # "plate", "negcon", "store" or "imagenet"
    plates: tuple[str, ...]
    mean: np.ndarray  # (P, C) float32, in the transformed space
    std: np.ndarray  # (P, C) float32

    @property
    def log(self) -> bool:
        return self.transform == "log"

    def row_groups(self, store: Store) -> np.ndarray:
        """For every store row, its row in ``mean``/``std`` (int32)."""
        if self.plates == (ALL,):
            return np.zeros(len(store), np.int32)
        lookup = {p: i for i, p in enumerate(self.plates)}
        names = store.metadata[PLATE].astype(str).to_numpy()
        uniq, inverse = np.unique(names, return_inverse=True)
        missing = [p for p in uniq if p not in lookup]
        if missing:
            raise CellmorphError(
                f"{store.path}: no {self.scope} statistics for plate(s) {missing[:5]} "
                "(re-run convert to compute them, or set loader.normalize=store)"
            )
        return np.array([lookup[p] for p in uniq], np.int32)[inverse]

    def to_dict(self) -> dict[str, Any]:
        return {"transform": self.transform, "scope": self.scope, "plates": list(self.plates),
                "mean": self.mean.tolist(), "std": self.std.tolist()}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalization:
        """From a checkpoint (older checkpoints saved one linear mean/std for the store)."""
        mean, std = np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32)
        if mean.ndim == 1:
            mean, std = mean[None], std[None]
        plates = tuple(d.get("plates", [ALL]))
        return cls(d.get("transform", "linear"), d.get("scope", "store"), plates, mean, std)


@dataclass(frozen=True)
class RowNorm:
    """A normalization bound to one store: per-sample mean and std for any store rows."""

    norm: Normalization
    groups: np.ndarray  # (store rows,) int32: row of norm.mean / norm.std

    @property
    def log(self) -> bool:
        return self.norm.log

    def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = self.groups[rows]
        return self.norm.mean[g], self.norm.std[g]


def _moments(stats: dict[str, dict[str, float]], channels: list[str], log: bool) -> np.ndarray:
    keys = ("log_mean", "log_std") if log else ("mean", "std")
    missing = [c for c in channels if c not in stats or keys[0] not in stats[c]]
    if missing:
        raise KeyError(missing)
    return np.array([[stats[c][k] for c in channels] for k in keys], dtype=np.float32)


def from_store(store: Store, cfg: LoaderConfig) -> Normalization:
    """The normalization ``cfg`` asks for, with ``store``'s statistics."""
    log = cfg.intensity == "log"
    channels = store.channels
    if cfg.normalize == "imagenet":
        return _imagenet(store, cfg)
    try:
        if cfg.normalize == "store":
            mom = _moments(store.stats, channels, log)
            return Normalization(cfg.intensity, "store", (ALL,), mom[0][None], mom[1][None])
        return _per_plate(store, cfg.normalize, channels, log, cfg.intensity)
    except KeyError as e:
        raise CellmorphError(
            f"{store.path}: attrs lack the statistics loader.normalize={cfg.normalize} with "
            f"loader.intensity={cfg.intensity} needs ({e}); re-run convert with this cellmorph"
        ) from None


def _per_plate(
    store: Store, scope: str, channels: list[str], log: bool, transform: str
) -> Normalization:
    table = store.attrs.get("plate_stats") or {}
    if not table:
        raise KeyError("plate_stats")
    plates = tuple(sorted(table))
    rows = []
    for p in plates:
        stats = table[p].get("negcon" if scope == "negcon" else "all")
        if stats is None:
            raise CellmorphError(
                f"{store.path}: plate {p} has no negative-control wells to normalize with "
                "(loader.normalize=negcon); use loader.normalize=plate"
            )
        rows.append(_moments(stats, channels, log))
    mom = np.stack(rows)  # (P, 2, C)
    return Normalization(transform, scope, plates, mom[:, 0], np.maximum(mom[:, 1], 1e-6))


def _imagenet(store: Store, cfg: LoaderConfig) -> Normalization:
    c = len(store.channels)
    if c != 3 or cfg.intensity != "linear":
        raise CellmorphError(
            f"loader.normalize: 'imagenet' needs a 3-channel RGB store and loader.intensity="
            f"linear; {store.path} has {c} channels ({', '.join(store.channels)}); "
            "use loader.normalize=plate"
        )
    # ImageNet statistics are for [0, 1] pixels; the store holds the full uint16 range.
    return Normalization("linear", "imagenet", (ALL,), (IMAGENET_MEAN * UINT16_MAX)[None],
                         (IMAGENET_STD * UINT16_MAX)[None])  # fmt: skip


def for_inference(saved: Normalization, store: Store) -> Normalization:
    """The normalization a trained model applies to ``store``: per-plate scopes use the new
    plate's own statistics; store-wide and ImageNet ones keep the training numbers."""
    if saved.scope not in PER_PLATE:
        return saved
    cfg = LoaderConfig(intensity=saved.transform, normalize=saved.scope)
    return from_store(store, cfg)
