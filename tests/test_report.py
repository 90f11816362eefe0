"""report.html from a synthetic run directory; rendered in headless Chromium where available."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import make_checkpoint, make_store

from cellmorph.cli import main
from cellmorph.config import Config, resolve_from_store
from cellmorph.index import build_index
from cellmorph.metrics import compute_metrics
from cellmorph.report import Run, build_report
from cellmorph.report_figures import plot_confusion
from cellmorph.rundir import RunDir
from cellmorph.store import describe, open_store, well_ids, write_metadata

FIGURES = ["label_distribution", "training_curves", "confusion_matrix", "tsne", "sample_grid"]


def write_fold(run: RunDir, fold: str, store, classes, outputs, ranks: int = 2) -> None:
    """Per-image outputs as the ranks of a run write them: one part each, then merged."""
    from cellmorph.outputs import empty_wells, merge

    rows, labels, probs, emb = outputs
    out = run.outputs(fold)
    for rank, part in enumerate(np.array_split(np.arange(len(rows)), ranks)):
        images, wells = out.writers(rank)
        for chunk in np.array_split(part, 3):  # a few batches per rank
            images.write(row=rows[chunk], label=labels[chunk], probs=probs[chunk],
                         embedding=emb[chunk])  # fmt: skip
        images.close({})
        wells.close(empty_wells(len(classes), emb.shape[1], 1))
    merge(out, ranks, classes, store.metadata_rows(), None)


def make_run(tmp_path: Path, split: str = "grouped", class_names=None) -> RunDir:
    """A run directory with every file train.py writes, from a tiny store and fake outputs."""
    store_path = make_store(tmp_path / "store.zarr", wells=8, sites=3)
    store = open_store(store_path)
    if class_names:  # rename classes in the store, e.g. to check escaping
        md = store.metadata.copy()
        md["Metadata_pert_iname"] = md["Metadata_pert_iname"].map(class_names)
        write_metadata(store_path, md)  # through the store: re-binds its digest
        store = open_store(store_path)
    cfg = Config(
        name="toy",
        data={"store": str(store_path), "split": split},
        eval={"tsne_max_points": 20, "sample_grid_per_class": 2},
    )
    cfg = resolve_from_store(cfg)  # as training records it
    index = build_index(store.metadata, cfg.data)
    run = tmp_path / "runs" / "toy"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    (run / "classes.json").write_text(
        json.dumps({"label_column": cfg.data.label_column, "classes": index.classes})
    )
    (run / "data_summary.json").write_text(
        json.dumps({**describe(store), **index.summary}, default=str)
    )
    rng = np.random.default_rng(0)
    scores = {}
    for fold in ("val", "test"):
        rows = getattr(index, fold)
        labels = index.labels[rows]
        k = len(index.classes)
        logits = rng.normal(size=(len(rows), k)) + 2 * np.eye(k)[labels]
        probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
        wells = well_ids(store.metadata)[rows]
        scores[fold] = compute_metrics(labels, probs, index.classes, wells=wells)
        emb = rng.normal(size=(len(rows), 64)).astype(np.float32) + labels[:, None]
        write_fold(RunDir(run), fold, store, index.classes, (rows, labels, probs, emb))
    RunDir(run).write_final(2, scores, {"selected_by": "validation balanced_accuracy"})
    with (run / "metrics.jsonl").open("w") as f:
        for epoch in range(3):
            rec = {
                "epoch": epoch,
                "train_loss": 1.0 / (epoch + 1),
                "lr": 1e-3,
                "loss": 1.2 - 0.1 * epoch,
                "accuracy": 0.4 + 0.1 * epoch,
                "balanced_accuracy": 0.35 + 0.1 * epoch,
            }
            f.write(json.dumps(rec) + "\n")
    return RunDir(run)


def _img_srcs(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_report_has_every_figure_and_the_tables(tmp_path: Path):
    run = make_run(tmp_path)
    page_path = build_report(run)
    assert page_path == run.path / "report.html"
    run = run.path
    page = page_path.read_text()
    for name in FIGURES:
        png = run / "figures" / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f'data-file="{name}.png"' in page, name
    srcs = _img_srcs(page)
    assert len(srcs) == len(FIGURES)
    for src in srcs:  # embedded, decodable PNGs: nothing to fetch
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
    assert not re.search(r'(src|href)="(https?:)?//', page)
    metrics = json.loads((run / "metrics.json").read_text())
    # per-class table: one row per class with its support
    table = page.split('id="per-class"')[1]
    for name, pc in metrics["per_class"].items():
        assert f"<td>{name}</td>" in table
        assert f"<td>{pc['support']}</td>" in table
    assert "Resolved config" in page and "mobilenet_v2" in page
    assert "balanced accuracy" in page and "well-level accuracy" in page
    assert "leak-warning" not in page  # grouped split: no banner
    assert 'id="audit"' not in page


def test_leaky_split_banner_audit_table_and_escaping(tmp_path: Path):
    evil = {"drugA": "<script>alert(1)</script>", "drugB": "a&b", "drugC": "c"}
    rd = make_run(tmp_path, split="image", class_names=evil)
    run = rd.path
    audit = {
        "protocols": [
            {
                "name": "study",
                "title": "study",
                "accuracy": 0.97,
                "balanced_accuracy": 0.96,
                "macro_f1": 0.95,
                "well_accuracy": 0.99,
                "n_val_images": 40,
                "val_copies_in_train": 17,
            },
            {
                "name": "default",
                "title": "default",
                "accuracy": 0.41,
                "balanced_accuracy": 0.40,
                "macro_f1": 0.39,
                "well_accuracy": 0.5,
                "n_val_images": 36,
                "val_copies_in_train": 0,
            },
        ]
    }
    (run / "audit.json").write_text(json.dumps(audit))
    page = build_report(rd).read_text()
    assert 'id="leak-warning"' in page
    section = page.split('id="audit"')[1]
    assert "<td>0.97</td>" in section and "<td>17</td>" in section and "<td>0.41</td>" in section
    # class names reach the page only escaped (per-class table, config, summary)
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "a&amp;b" in page


def test_confusion_matrix_scales_with_50_classes(tmp_path: Path):
    k = 50
    classes = [f"compound-{i:02d}" for i in range(k)]
    cm = np.diag(np.full(k, 5)).tolist()
    run = Run(
        dir=RunDir(tmp_path),
        config={},
        classes=classes,
        label_column="x",
        summary={},
        history=[],
        metrics={"confusion_matrix": cm},
    )
    small = Run(
        dir=RunDir(tmp_path),
        config={},
        classes=classes[:5],
        label_column="x",
        summary={},
        history=[],
        metrics={"confusion_matrix": np.eye(5).tolist()},
    )
    import matplotlib.image as mpimg

    big_px = mpimg.imread(plot_confusion(run, tmp_path / "cm50.png")).shape
    small_px = mpimg.imread(plot_confusion(small, tmp_path / "cm5.png")).shape
    assert big_px[0] > 1400 and big_px[1] > 1400  # ~25 px per class row: names stay legible
    assert big_px[0] > 2 * small_px[0]


def test_evaluate_recomputes_outputs_from_best_checkpoint(tmp_path: Path):
    rd = make_run(tmp_path)
    run = rd.path
    (run / "checkpoints").mkdir()
    make_checkpoint(run / "checkpoints" / "best.pt", str(tmp_path / "store.zarr"))
    before = {f: pd.read_parquet(rd.predictions(f)) for f in ("val", "test")}
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["checkpoint"] == "best.pt" and metrics["fold"] == "test"
    for fold in ("val", "test"):  # the same images, now scored by the checkpoint
        after = pd.read_parquet(rd.predictions(fold))
        assert list(after["store_row"]) == list(before[fold]["store_row"])
        assert list(after["label"]) == list(before[fold]["label"])
        assert np.load(rd.embeddings(fold)).shape[0] == len(after)
    # the headline is the test fold's, computed from the predictions now on disk
    after = pd.read_parquet(rd.predictions("test"))
    probs = after[[c for c in after.columns if c.startswith("prob:")]].to_numpy()
    assert metrics["accuracy"] == pytest.approx((probs.argmax(1) == after["label"]).mean())
    assert metrics["test"]["accuracy"] == metrics["accuracy"]
    assert set(metrics["validation"]) >= {"accuracy", "balanced_accuracy"}
    assert (run / "report.html").is_file()


# ------------------------------------------------------------------------------ browser

CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  var out = document.createElement('pre');
  out.id = 'img-check';
  out.textContent = JSON.stringify(imgs.map(function (i) {
    return {file: i.dataset.file, ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth};
  }));
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
def test_report_renders_in_headless_chromium(tmp_path: Path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed; `make browser` installs it (apt, as root)")
    run = make_run(tmp_path)
    page = build_report(run).read_text()
    # A test-only copy with a script that records, after load, whether each image decoded.
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"))
    cmd = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
        "--dump-dom", probe.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'<pre id="img-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"probe did not run; chromium said: {done.stderr[-2000:]}"
    images = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert sorted(i["file"] for i in images) == sorted(f"{n}.png" for n in FIGURES)
    broken = [i["file"] for i in images if not i["ok"]]
    assert not broken, f"images that did not load: {broken}"


def test_sample_grid_mosaic_puts_each_picked_image_in_its_class_line(tmp_path: Path):
    from cellmorph.loaders.reader import ShardReader
    from cellmorph.report_cells import composite, grid_mosaic

    store = open_store(make_store(tmp_path / "store.zarr", wells=4, sites=3))
    rows = [np.array([5, 0, 7]), np.array([2])]  # the second class has one image of three
    mosaic, centres = grid_mosaic(store, rows, per_class=3)
    h, w = store.shape[2:]
    gap = max(1, h // 32)
    assert mosaic.shape == (2 * h + gap, 3 * w + 2 * gap, 3)
    assert centres == [(h - 1) / 2, h + gap + (h - 1) / 2]
    images = ShardReader(store).read(np.array([5, 0, 7, 2]))
    for (r, c), image in zip([(0, 0), (0, 1), (0, 2), (1, 0)], images):
        y, x = r * (h + gap), c * (w + gap)
        np.testing.assert_array_equal(
            mosaic[y : y + h, x : x + w], composite(image, store.channels).astype(np.float32)
        )
    assert (mosaic[h + gap :, w + gap :] == 1).all()  # the short class's missing tiles: white
    assert (mosaic[h : h + gap] == 1).all() and (mosaic[:, w : w + gap] == 1).all()  # the gaps
