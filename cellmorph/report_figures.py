"""The run directory read into a :class:`Run`, and the report's figures drawn from it: PNGs
under ``figures/`` that :mod:`cellmorph.report` embeds in ``report.html``. No torch here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cellmorph import atomic  # noqa: E402
from cellmorph.report_cells import is_cells, sample_grid  # noqa: E402
from cellmorph.rundir import RunDir  # noqa: E402
from cellmorph.sampling import stratified_sample  # noqa: E402
from cellmorph.store.layout import STORE_ROW  # noqa: E402

COUNT_TITLES = {
    "counts_before_topk": "all labels, before top-K",
    "counts_after_topk": "after top-K / min_count",
    "train_counts": "training fold",
    "val_counts": "validation fold",
    "train_counts_balanced": "training fold after balancing (what an epoch sees)",
}
CURVE_GROUPS = {
    "loss": ("train_loss", "loss", "val_loss"),
    "score": (
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "top5_accuracy",
        "well_accuracy",
        "well_balanced_accuracy",
    ),
    "learning rate": ("lr",),
}


@dataclass
class Run:
    """What the run directory holds (absent files are None)."""

    dir: RunDir
    config: dict[str, Any]
    classes: list[str]
    label_column: str
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    predictions: pd.DataFrame | None = None  # headline fold (test, else validation): row, label
    embeddings: np.ndarray | None = None  # memory-mapped
    audit: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- reading


def _fold(run: Run) -> str:
    """The headline fold's file prefix: ``test`` when the run has a test fold."""
    return "test" if run.metrics.get("fold") == "test" else "val"


def _fold_name(run: Run) -> str:
    return "test" if _fold(run) == "test" else "validation"


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}_"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_run(run: RunDir) -> Run:
    """Read the run directory's files; the config, classes and final metrics are required."""
    run.require()
    encoding = run.read_classes()
    loaded = Run(
        dir=run,
        config=run.read_config(),
        classes=encoding.classes,
        label_column=encoding.label_column,
        summary=run.read_json(run.data_summary, required=False) or {},
        history=[_flatten(r) for r in run.history()],
        metrics=run.read_result(),
        audit=run.read_json(run.audit, required=False),
    )
    fold = _fold(loaded)
    # Only what the figures use: the labels, and the embeddings memory-mapped (the t-SNE reads
    # its sample's rows), so a fold of 600,000 images costs megabytes, not gigabytes.
    loaded.predictions = run.read_predictions(fold, columns=[STORE_ROW, "label"])
    loaded.embeddings = run.read_embeddings(fold)
    return loaded


# --------------------------------------------------------------------------- figures


def _save(fig: plt.Figure, path: Path) -> Path:
    try:  # written beside and renamed, like every output: a figure that exists is whole
        atomic.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100,
                                                        bbox_inches="tight"))  # fmt: skip
    finally:
        plt.close(fig)
    return path


def _count_tables(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The summary's class-count tables (before/after top-K, after balancing, ...)."""
    tables = {}
    for key, value in summary.items():
        if (
            isinstance(value, dict)
            and value
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value.values())
        ):
            tables[key] = {str(k): float(v) for k, v in value.items()}
    return tables


def _bar_panel(ax: plt.Axes, title: str, counts: dict[str, float], order: list[str]) -> None:
    names = [c for c in order if c in counts] + sorted(c for c in counts if c not in order)
    values = [counts[c] for c in names]
    ax.bar(range(len(names)), values, color="#4477aa")
    ax.set_title(f"{title} ({len(names)} classes, {int(sum(values))} images)")
    ax.set_ylabel("images")
    if len(names) <= 120:  # beyond that, names are unreadable: show the shape of the curve
        ax.set_xticks(
            range(len(names)), names, rotation=90, fontsize=max(4, min(9, 500 / len(names)))
        )
    else:
        ax.set_xlabel("classes, most frequent first")
    ax.set_xlim(-0.6, len(names) - 0.4)


def plot_label_distribution(run: Run, out: Path) -> Path | None:
    tables = _count_tables(run.summary)
    if not tables:
        run.notes.append("label distribution: data_summary.json has no class-count tables")
        return None
    widest = max(len(t) for t in tables.values())
    width = min(40.0, max(8.0, 0.22 * min(widest, 120) + 2))
    fig, axes = plt.subplots(len(tables), 1, figsize=(width, 3.6 * len(tables)), squeeze=False)
    # One class order (most frequent first, before any selection) in every panel, so a
    # class sits at the same place from panel to panel.
    first = next(iter(tables.values()))
    order = sorted(first, key=lambda c: (-first[c], c))
    for ax, (key, counts) in zip(axes[:, 0], tables.items()):
        _bar_panel(ax, COUNT_TITLES.get(key, key.replace("_", " ")), counts, order)
    fig.tight_layout()
    return _save(fig, out)


def plot_training_curves(run: Run, out: Path) -> Path | None:
    if not run.history:
        run.notes.append("training curves: metrics.jsonl is missing or empty")
        return None
    frame = pd.DataFrame(run.history)
    x = frame["epoch"] + 1 if "epoch" in frame else pd.Series(range(1, len(frame) + 1))
    groups = {
        name: [k for k in keys if k in frame and frame[k].notna().any()]
        for name, keys in CURVE_GROUPS.items()
    }
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        run.notes.append("training curves: metrics.jsonl has no loss, score or lr columns")
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, (name, keys) in zip(axes[0], groups.items()):
        for k in keys:
            label = "validation loss" if k == "loss" else k.replace("_", " ")
            ax.plot(x, frame[k], marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def plot_confusion(run: Run, out: Path) -> Path | None:
    cm = np.asarray(run.metrics.get("confusion_matrix", []), dtype=np.float64)
    k = len(run.classes)
    if cm.shape != (k, k):
        run.notes.append(f"confusion matrix: metrics.json has shape {cm.shape}, expected {k}x{k}")
        return None
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = max(6.0, 0.3 * k + 3)
    font = max(4.0, min(10.0, 320 / max(k, 1)))
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), run.classes, rotation=90, fontsize=font)
    ax.set_yticks(range(k), run.classes, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix (each row sums to 1: recall on the diagonal)")
    if k <= 20:
        for i, j in zip(*np.nonzero(cm)):
            colour = "white" if norm[i, j] > 0.5 else "black"
            ax.text(
                j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=font, color=colour
            )
    fig.colorbar(im, ax=ax, fraction=0.04)
    return _save(fig, out)


def _class_colours(k: int) -> list[Any]:
    cmaps = [plt.get_cmap(n) for n in ("tab20", "tab20b", "tab20c")]
    palette = [c for cmap in cmaps for c in cmap.colors]
    return [palette[i % len(palette)] for i in range(k)]


def _tsne_points(emb: np.ndarray, labels: np.ndarray, max_points: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Stratified subsample, PCA to 50 dims, then t-SNE; returns (2-D points, chosen rows)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    chosen = stratified_sample(labels, max_points, seed)
    x = np.asarray(emb[chosen], dtype=np.float64)  # reads the sample's rows only
    if x.shape[1] > 50 and len(x) > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(x), chosen


def plot_tsne(run: Run, out: Path, max_points: int) -> Path | None:
    pred, emb = run.predictions, run.embeddings
    if pred is None or emb is None:
        run.notes.append(f"t-SNE: the {_fold_name(run)} predictions or embeddings are missing")
        return None
    if len(pred) != len(emb) or len(emb) < 5:
        run.notes.append(f"t-SNE: needs >= 5 aligned {_fold_name(run)} images (have {len(emb)})")
        return None
    points, chosen = _tsne_points(emb, pred["label"].to_numpy(), max_points, seed=0)
    labels = pred["label"].to_numpy()[chosen]
    k = len(run.classes)
    colours, markers = _class_colours(k), "os^Dv<>P*X"
    fig, ax = plt.subplots(figsize=(11, 8))
    for c in range(k):
        sel = labels == c
        if sel.any():
            ax.scatter(*points[sel].T, s=10, color=colours[c], marker=markers[c // 60 % 10],
                       label=run.classes[c], alpha=0.8)  # fmt: skip
    if k <= 60:  # name each class at its median point: 50 colours alone are hard to tell apart
        for c in np.unique(labels):
            x, y = np.median(points[labels == c], axis=0)
            ax.annotate(run.classes[c], (x, y), fontsize=6, alpha=0.8, ha="center", va="bottom")
    sampled = (
        f"a stratified sample of {len(points)} of {len(emb)}"
        if len(points) < len(emb)
        else f"all {len(emb)}"
    )
    ax.set_title(f"t-SNE of {_fold_name(run)} embeddings (penultimate layer, {sampled} images)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=6 if k > 20 else 8,
              ncol=1 + k // 40, markerscale=1.5, frameon=False)  # fmt: skip
    return _save(fig, out)


def plot_sample_grid(run: Run, out: Path, per_class: int) -> Path | None:
    store_path = (run.config.get("data") or {}).get("store")
    if per_class <= 0 or not store_path:
        return None
    fig = sample_grid(store_path, run.label_column, run.classes, per_class, run.notes)
    return _save(fig, out) if fig is not None else None


def make_figures(run: Run) -> list[tuple[Path, str]]:
    """Draw every figure the run's files allow; returns (png path, caption) pairs."""
    eval_cfg = run.config.get("eval") or {}
    fig_dir = run.dir.figures
    rows = "cells" if is_cells(run.metrics, run.summary) else "images"
    makers: list[tuple[str, str, Callable[[Path], Path | None]]] = [
        ("label_distribution.png", "Label distribution: before and after top-K and balancing",
         lambda p: plot_label_distribution(run, p)),
        ("training_curves.png", "Training curves", lambda p: plot_training_curves(run, p)),
        ("confusion_matrix.png", f"Row-normalized confusion matrix ({_fold_name(run)} fold)",
         lambda p: plot_confusion(run, p)),
        ("tsne.png", f"t-SNE of {_fold_name(run)} {rows[:-1]} embeddings, coloured by true class",
         lambda p: plot_tsne(run, p, int(eval_cfg.get("tsne_max_points", 2000)))),
        ("sample_grid.png", f"Sample {rows} per class (channel composite)",
         lambda p: plot_sample_grid(run, p, int(eval_cfg.get("sample_grid_per_class", 4)))),
    ]  # fmt: skip
    out = []
    for filename, caption, make in makers:
        path = make(fig_dir / filename)
        if path is not None:
            out.append((path, caption))
    return out
