"""``runs/<name>/report.html``: one self-contained page a biologist reads.

Everything comes from the files in the run directory (see docs/architecture.md, "Run
directory"); figures are PNGs under ``figures/`` and are also embedded as base64 data URIs so
the page opens anywhere, without a network or the run directory next to it.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import yaml

from cellmorph import atomic
from cellmorph.metrics import topk_name
from cellmorph.report_cells import headline_keys, is_cells, levels_table
from cellmorph.report_figures import Run, _fold, _fold_name, load_run, make_figures
from cellmorph.rundir import RunDir
from cellmorph.store.files import read_file
from cellmorph.store.layout import QUARANTINE, read_quarantine

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


def build_report(run_dir: RunDir) -> Path:
    """Draw the figures and write ``report.html`` in the run directory; returns the page's path.

    Renders only: logging it to MLflow is the caller's (``cellmorph evaluate``, the demo)."""
    run = load_run(run_dir)
    figures = make_figures(run)
    return atomic.write_text(run_dir.report, render_html(run, figures))
