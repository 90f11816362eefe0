"""``runs/<name>/report.html``: one self-contained page a biologist reads.

Everything comes from the files in the run directory (see docs/architecture.md, "Run
directory"); figures are PNGs under ``figures/`` and are also embedded as base64 data URIs so
the page opens anywhere, without a network or the run directory next to it.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cellmorph import atomic  # noqa: E402
from cellmorph.metrics import topk_name  # noqa: E402
from cellmorph.report_cells import headline_keys, is_cells, levels_table, sample_grid  # noqa: E402
from cellmorph.rundir import RunDir  # noqa: E402
from cellmorph.sampling import stratified_sample  # noqa: E402
from cellmorph.store.files import read_file  # noqa: E402
from cellmorph.store.layout import QUARANTINE, STORE_ROW, read_quarantine  # noqa: E402

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


def _epoch_note(run: Run) -> str:
    """Say which epoch the figures describe: choosing it on validation flatters it a little."""
    epoch = run.metrics.get("epoch")
    if epoch is None or not run.history:
        return ""
    metric = run.config.get("train", {}).get("best_metric", "balanced_accuracy")
    last = run.history[-1]
    if _fold(run) == "test":
        text = (
            f"The model of epoch {int(epoch) + 1} of {len(run.history)} (the best by validation "
            f"{metric}), scored once on the test fold, which nothing was tuned on. Its validation "
            "scores, which chose it, stand beside: they flatter it slightly."
        )
    else:
        text = (
            f"Epoch {int(epoch) + 1} of {len(run.history)}, the best by validation {metric}. "
            "This run has no test fold (data.test_fraction=0, no data.test_plates): the scores "
            "are those of the fold that chose the epoch, which flatters them; the last epoch had "
            f"{metric} {last.get(metric, float('nan')):.3f}."
        )
    return f"<p class='sub'>{_esc(text)}</p>"


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


# --------------------------------------------------------------------------- html


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def _table(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    head = f"<thead><tr>{head}</tr></thead>" if any(header) else ""
    body = "".join(
        "<tr>" + "".join(f"<td>{_esc(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f'<table class="{cls}">{head}<tbody>{body}</tbody></table>'


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(alt)}" '
        f'data-file="{_esc(path.name)}"><figcaption>{_esc(alt)}</figcaption></figure>'
    )


SCORE_ROWS = [
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("macro_f1", "macro F1"),
    ("well_accuracy", "well-level accuracy"),
    ("well_balanced_accuracy", "well-level balanced accuracy"),
    ("loss", "loss"),
    ("chance", "chance (1/K)"),
    ("chance_majority", "chance (majority class)"),
    ("n_images", "images"),
    ("n_wells", "wells"),
]


def _headline(run: Run) -> str:
    m = run.metrics
    top_k = m.get("top_k", 5)
    keys = [*SCORE_ROWS[:3], (topk_name(top_k), f"top-{top_k} accuracy"), *SCORE_ROWS[3:]]
    if is_cells(m, run.summary):
        keys = headline_keys(keys)
    fold = _fold_name(run)
    cards = "".join(
        f'<div class="card"><div class="v">{_esc(_fmt(m[k]))}</div>'
        f'<div class="k">{_esc(label)} ({fold})</div></div>'
        for k, label in keys
        if k in m
    )
    return f'<div class="cards" id="headline" data-fold="{fold}">{cards}</div>'


def _folds_table(run: Run) -> str:
    """Validation (which chose the model) and test (which did not) side by side."""
    val, test = run.metrics.get("validation"), run.metrics.get("test")
    if not val or not test:
        return ""
    top_k = run.metrics.get("top_k", 5)
    keys = [*SCORE_ROWS[:3], (topk_name(top_k), f"top-{top_k} accuracy"), *SCORE_ROWS[3:6],
            SCORE_ROWS[8], SCORE_ROWS[9]]  # fmt: skip
    rows = [[label, val.get(k, ""), test.get(k, "")] for k, label in keys if k in val or k in test]
    table = _table(["", "validation (chose the epoch)", "test (untouched)"], rows, "folds")
    return f'<div id="folds">{table}</div>'


def _levels_section(run: Run) -> str:
    """A cell store's scores at the cell, site and well levels, for both folds."""
    if not is_cells(run.metrics, run.summary):
        return ""
    header, rows = levels_table(run.metrics)
    return f'<h3>Cells, sites and wells</h3><div id="levels">{_table(header, rows, "levels")}</div>'


def _profiling_section(run: Run) -> str:
    prof = run.metrics.get("profiling") or {}
    sources = [("embeddings", "network embeddings"), ("intensity_baseline", "intensity statistics")]
    present = [(k, t) for k, t in sources if isinstance(prof.get(k), dict)]
    if not present:
        return ""
    rows = []
    for key, title in present:
        p = prof[key]
        if "skipped" in p:
            rows.append([title, "skipped: " + p["skipped"], "", ""])
        else:
            rows.append([title, p["mean_map"], f"{p['fraction_retrieved']:.0%}", p["treatments"]])
    head = ["profile", "mean mAP", "treatments retrieved (q < 0.05)", "treatments scored"]
    per = (prof.get("embeddings") or {}).get("per_treatment") or {}
    base = (prof.get("intensity_baseline") or {}).get("per_treatment") or {}
    detail = [[t, v["mAP"], v["q"], "yes" if v["retrieved"] else "no",
               base.get(t, {}).get("mAP", "")] for t, v in sorted(per.items())]  # fmt: skip
    where = prof.get("fold") or f"the {_fold_name(run)} fold"
    scorable = (f" {prof['treatments_scorable']} of {prof['treatments_total']} treatments have "
                "the two or more wells (and the two negative-control wells) a score needs."
                if "treatments_total" in prof else "")  # fmt: skip
    text = (
        f"Phenotypic activity as image-based profiling measures it (copairs): each treatment's "
        f"wells against the negative-control wells, well-level profiles of {where} "
        f"({prof.get('wells', '?')} wells), cosine similarity, mean average precision with a "
        f"permutation p-value, Benjamini-Hochberg corrected.{scorable}"
    )
    return (
        f'<h2>Phenotypic activity (mAP)</h2><div id="profiling"><p>{_esc(text)}</p>'
        + _table(head, rows, "profiling")
        + _table(
            ["treatment", "mAP (embeddings)", "corrected p", "retrieved", "mAP (intensity)"],
            detail,
            "profiling-detail",
        )  # fmt: skip
        + "</div>"
    )


def _is_leaky(summary: dict[str, Any]) -> bool:
    flags = ("leaky", "oversample_before_split")
    return any(bool(summary.get(f)) for f in flags) or summary.get("split") == "image"


def _leak_banner(run: Run) -> str:
    if not _is_leaky(run.summary):
        return ""
    return (
        '<div class="banner" id="leak-warning"><b>Warning: leaky split.</b> Validation images '
        "were split from training images image by image, so images of the same well (and, "
        "after oversampling before the split, identical copies) sit on both sides. The scores "
        "below overstate how well the model recognizes a treatment in new wells. Use "
        "<code>data.split=grouped</code>.</div>"
    )


def _summary_section(run: Run) -> str:
    scalars = [
        [k.replace("_", " "), v]
        for k, v in run.summary.items()
        if k != "warnings" and not isinstance(v, dict) and not (isinstance(v, list) and len(v) > 20)
    ]
    out = _table(["", ""], scalars, "kv") if scalars else "<p>data_summary.json is missing.</p>"
    warns = "".join(f"<li>{_esc(w)}</li>" for w in run.summary.get("warnings") or [])
    warns = f"<h3>Warnings</h3><ul class='notes'>{warns}</ul>" if warns else ""
    return f"<h2>Data</h2>{warns}{_unvalidated(run)}{out}{_quarantine_table(run)}"


UNVALIDATED = [
    ("classes_single_well", "in a single well of the whole data: never scored on a new well"),
    ("classes_single_plate", "on a single plate: never scored on a new plate"),
    ("classes_without_val", "without validation images in this run"),
    ("classes_without_test", "without test images in this run"),
]


def _unvalidated(run: Run) -> str:
    """Name the classes whose scores a grouped or plate split cannot give (or did not here)."""
    items = []
    for key, what in UNVALIDATED:
        names = run.summary.get(key) or []
        if names:
            shown = ", ".join(map(str, names[:30])) + (" ..." if len(names) > 30 else "")
            items.append(f"<li><b>{len(names)} class(es) {_esc(what)}</b>: {_esc(shown)}</li>")
    if not items:
        return ""
    return f"<h3>Classes that cannot be validated</h3><ul id='unvalidated'>{''.join(items)}</ul>"


def _quarantine_table(run: Run) -> str:
    store_path = (run.config.get("data") or {}).get("store")
    data = read_file(store_path, QUARANTINE) if store_path else None
    if data is None:
        return ""
    q = read_quarantine(data, f"{store_path}/{QUARANTINE}")
    if q.empty:
        return "<p>No inputs were quarantined.</p>"
    reasons = q["reason"].astype(str).value_counts().head(20)
    rows = [[reason, n] for reason, n in reasons.items()]
    return f"<h3>Quarantined inputs ({len(q)})</h3>" + _table(["reason", "inputs"], rows)


def _per_class_section(run: Run) -> str:
    per = run.metrics.get("per_class", {})
    rows = [
        [name, per[name]["precision"], per[name]["recall"], per[name]["f1"], per[name]["support"]]
        for name in run.classes
        if name in per
    ]
    if not rows:
        return ""
    table = _table(["class", "precision", "recall", "F1", "support"], rows, "per-class")
    return f'<h2>Per-class metrics</h2><div id="per-class">{table}</div>'


AUDIT_ROWS = [
    ("scored_fold", "fold scored"),
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("macro_f1", "macro F1"),
    ("well_accuracy", "well-level accuracy"),
    ("n_val_images", "validation images"),
    ("val_copies_in_train", "validation images with an identical copy in training"),
]


def _audit_section(run: Run) -> str:
    if not run.audit:
        return ""
    protocols = run.audit.get("protocols", [])
    header = ["", *[p.get("title", p.get("name", "?")) for p in protocols]]
    rows = [[label, *[p.get(key, "") for p in protocols]] for key, label in AUDIT_ROWS]
    note = run.audit.get("note", "")
    return (
        '<h2>Leakage audit</h2><div id="audit">'
        + _table(header, rows, "audit")
        + (f"<p>{_esc(note)}</p>" if note else "")
        + "</div>"
    )


CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{margin-bottom:.2em} .sub{color:#666;margin-top:0}
.cards{display:flex;flex-wrap:wrap;gap:.6em}
.card{border:1px solid #ddd;border-radius:6px;padding:.5em .9em;min-width:8em}
.card .v{font-size:1.4em;font-weight:600} .card .k{color:#666;font-size:.85em}
.banner{background:#fde8e8;border:2px solid #c53030;color:#742a2a;padding:1em;border-radius:6px;margin:1em 0}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}
figure{margin:1em 0;overflow-x:auto} img{max-width:100%} figcaption{color:#666;font-size:.85em}
pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:.85em}
.notes{color:#8a6d00}
"""


def render_html(run: Run, figures: list[tuple[Path, str]]) -> str:
    """The report page (all text escaped, figures embedded)."""
    name = run.config.get("name", run.dir.name)
    figs = "".join(_img_tag(p, alt) for p, alt in figures)
    notes = "".join(f"<li>{_esc(n)}</li>" for n in run.notes)
    config = yaml.safe_dump(run.config, sort_keys=False)
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>cellmorph report: {_esc(name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>cellmorph report: {_esc(name)}</h1>",
        f"<p class='sub'>{_esc(len(run.classes))} classes of {_esc(run.label_column)} · run directory {_esc(run.dir.path)}</p>",
        _leak_banner(run),
        f"<h2>Scores on the {_fold_name(run)} fold</h2>",
        _epoch_note(run),
        _headline(run),
        _folds_table(run),
        _levels_section(run),
        _profiling_section(run),
        _audit_section(run),
        _summary_section(run),
        f"<h2>Figures</h2>{figs}",
        f"<ul class='notes'>{notes}</ul>" if notes else "",
        _per_class_section(run),
        f"<h2>Resolved config</h2><pre>{_esc(config)}</pre>",
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


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


def build_report(run_dir: RunDir) -> Path:
    """Draw the figures and write ``report.html`` in the run directory; returns the page's path.

    Renders only: logging it to MLflow is the caller's (``cellmorph evaluate``, the demo)."""
    run = load_run(run_dir)
    figures = make_figures(run)
    return atomic.write_text(run_dir.report, render_html(run, figures))
