"""Parts of ``report.html`` (:mod:`cellmorph.report`): the sample grid of images or cells per
class, and what a cell store adds — its scores at the cell, site and well levels, led by
``well_balanced_accuracy`` (the headline of a cell store's test fold).

No torch here (the report loads without it); figures are returned to
:mod:`cellmorph.report_figures`, which saves them for the report to embed.
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cellmorph.errors import CellmorphError  # noqa: E402
from cellmorph.loaders.reader import ShardReader  # noqa: E402
from cellmorph.store.read import Store, open_store  # noqa: E402

# Additive colours for a composite, by channel name (Cell Painting's usual display colours).
CHANNEL_COLORS: dict[str, tuple[float, float, float]] = {
    "dna": (0.0, 0.3, 1.0),
    "hoechst": (0.0, 0.3, 1.0),
    "dapi": (0.0, 0.3, 1.0),
    "er": (0.0, 1.0, 0.0),
    "cona": (0.0, 1.0, 0.0),
    "agp": (1.0, 0.0, 0.0),
    "actin": (1.0, 0.0, 0.0),
    "phalloidin": (1.0, 0.0, 0.0),
    "wga": (1.0, 0.0, 0.0),
    "mito": (0.6, 0.0, 0.6),
    "mitotracker": (0.6, 0.0, 0.6),
    "rna": (0.5, 0.5, 0.0),
    "syto": (0.5, 0.5, 0.0),
}
CELLS_PER_IMAGE = 3  # a cell says less than a field: the grid shows 3x eval.sample_grid_per_class
LEVELS = [("well", "wells (mean probability of their cells)"),
          ("site", "sites (mean probability of their cells)"), ("cell", "cells")]  # fmt: skip
LEVEL_SCORES = [("balanced_accuracy", "balanced accuracy"), ("accuracy", "accuracy"),
                ("macro_f1", "macro F1")]  # fmt: skip


def is_cells(metrics: dict[str, Any], summary: dict[str, Any]) -> bool:
    """Whether the run trained on a cell store (its result or its data summary says so)."""
    return "cell" in (metrics.get("unit"), summary.get("unit"))


def _channel_colours(channels: list[str]) -> np.ndarray:
    """(C, 3) display colours by channel name; unknown or brightfield channels stay dark."""
    colours = np.zeros((len(channels), 3))
    for i, name in enumerate(channels):
        key = name.lower().replace("orig", "").replace("_", "")
        for marker, rgb in CHANNEL_COLORS.items():
            if key == marker or key.startswith(marker):
                colours[i] = rgb
                break
    if not colours.any():  # no known fluorescence names: first three channels as R, G, B
        for i in range(min(3, len(channels))):
            colours[i, i] = 1.0
    return colours


def composite(image: np.ndarray, channels: list[str]) -> np.ndarray:
    """A (H, W, 3) float RGB composite of one (C, H, W) image, each channel stretched 1-99.5 %."""
    img = image.astype(np.float32)
    lo = np.percentile(img, 1.0, axis=(1, 2), keepdims=True)
    hi = np.percentile(img, 99.5, axis=(1, 2), keepdims=True)
    stretched = np.clip((img - lo) / np.maximum(hi - lo, 1e-6), 0.0, 1.0)
    rgb = np.einsum("chw,cr->hwr", stretched, _channel_colours(channels))
    return np.clip(rgb, 0.0, 1.0)


def sample_rows(labels: pd.Series, classes: list[str], per_class: int) -> dict[str, np.ndarray]:
    """Evenly spaced rows of each class (deterministic, spread over plates and wells)."""
    codes, names = pd.factorize(labels.astype(str).str.strip())
    order = np.argsort(codes, kind="stable")  # rows grouped by class, ascending within each
    bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
    lookup = {str(n): i for i, n in enumerate(names)}
    out = {}
    for name in classes:
        i = lookup.get(name)
        rows = order[bounds[i] : bounds[i + 1]] if i is not None else []
        if len(rows):
            out[name] = rows[np.linspace(0, len(rows) - 1, min(per_class, len(rows))).astype(int)]
    return out


def grid_mosaic(
    store: Store, rows: list[np.ndarray], per_class: int
) -> tuple[np.ndarray, list[float]]:
    """One (H, W, 3) RGB mosaic: a line of composites per entry of ``rows`` (store rows), white
    gaps and white where a class has fewer than ``per_class``; and the lines' centres (y)."""
    # One mosaic in one axes: an axes per tile cost ~40 ms each to build, draw and fit (5 s of
    # a tiny run's 14 s report at 9 classes x 12 cells; the pilot's 50 x 12 would be 25 s).
    height, width = store.shape[2:]
    gap = max(1, height // 32)
    mosaic = np.ones((len(rows) * (height + gap) - gap, per_class * (width + gap) - gap, 3),
                     dtype=np.float32)  # fmt: skip
    reader = ShardReader(store)
    for r, picked in enumerate(rows):
        for c, image in enumerate(reader.read(np.asarray(picked, dtype=np.int64))):
            y, x = r * (height + gap), c * (width + gap)
            mosaic[y : y + height, x : x + width] = composite(image, store.channels)
    return mosaic, [r * (height + gap) + (height - 1) / 2 for r in range(len(rows))]


def sample_grid(store_path: str, label_column: str, classes: list[str], per_class: int,
                notes: list[str]) -> plt.Figure | None:  # fmt: skip
    """A grid of channel composites per class: ``per_class`` fields, or 3x as many cells of
    a cell store; None (with a note) when the store cannot give one."""
    try:
        store = open_store(store_path, columns=[label_column])
    except CellmorphError as e:
        notes.append(f"sample images: cannot open the store ({e})")
        return None
    if label_column not in store.metadata.columns:
        notes.append(f"sample images: store has no label column {label_column!r}")
        return None
    cells = store.unit == "cell"
    per_class *= CELLS_PER_IMAGE if cells else 1
    picks = sample_rows(store.metadata[label_column], classes, per_class)
    if not picks:
        return None
    tile = (0.8 if cells else 1.6) if len(picks) <= 20 else (0.6 if cells else 1.1)
    mosaic, centres = grid_mosaic(store, list(picks.values()), per_class)
    fig, ax = plt.subplots(figsize=(tile * per_class + 2.2, tile * len(picks)))
    ax.imshow(mosaic, interpolation="antialiased")
    ax.set_xticks([])
    ax.set_yticks(centres, list(picks), fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    legend = ", ".join(
        f"{ch}" for ch, rgb in zip(store.channels, _channel_colours(store.channels)) if rgb.any()
    )
    fig.suptitle(f"sample {'cells' if cells else 'images'} per class (composite of {legend})",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    return fig


def headline_keys(keys: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A cell store's headline cards: the wells' and sites' scores first, then the cells'."""
    lead = [("well_balanced_accuracy", "well-level balanced accuracy"),
            ("site_balanced_accuracy", "site-level balanced accuracy")]  # fmt: skip
    names = {k for k, _ in lead}
    rest = [(k, f"cell-level {label}" if not k.startswith(("well", "n_", "chance", "loss"))
             else label) for k, label in keys if k not in names]  # fmt: skip
    return lead + [(k, "cells" if k == "n_images" else label) for k, label in rest]


def levels_table(metrics: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the cell / site / well table, validation and test side by side."""
    folds = [(name, metrics.get(key)) for key, name in (("validation", "validation"),
                                                        ("test", "test"))]  # fmt: skip
    folds = [(name, m) for name, m in folds if m] or [(metrics.get("fold", ""), metrics)]
    header = ["level", "", *[name for name, _ in folds]]
    rows = []
    for level, what in LEVELS:
        prefix = "" if level == "cell" else f"{level}_"
        count = "n_images" if level == "cell" else f"n_{level}s"
        for key, label in LEVEL_SCORES:
            rows.append([what, label, *[m.get(prefix + key, "") for _, m in folds]])
        rows.append([what, "count", *[m.get(count, "") for _, m in folds]])
    return header, rows
