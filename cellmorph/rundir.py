"""The run directory: the only module that knows its layout (as ``store/`` knows the store's).

::

    runs/<name>/
      config.yaml              the resolved config
      classes.json             label encoding (class id -> name)
      data_summary.json        store + index summary (folds, counts, warnings)
      metrics.jsonl            one line per finished epoch, exactly once across restarts
      metrics.json             the result: the chosen epoch (best on validation) scored on the test
                               fold (the headline), with its validation scores beside
      val_predictions.parquet  per validation image, by the chosen model (store row, metadata,
                               labels, probs), written at the end of the run
      val_embeddings.npy       its embeddings, same row order
      val_wells.parquet        per validation well: metadata, mean probabilities, profile
      test_*                   the same for the test fold (schema: cellmorph.outputs)
      <fold>_sites.parquet     cell stores: per site of the fold, mean probabilities
      profiles.parquet         the held-out wells' profiles (pycytominer: median per well,
                               normalized per plate to its negative controls, feature-selected)
      .<fold>_outputs/         each rank's part of a fold's outputs while they are merged
      events.jsonl             start / resume events (with the worker processes)
      tracking.json            the MLflow run this run logs to (tracking.mlflow_uri)
      progress.json            the current epoch's step, for the launcher's progress bar
      checkpoints/             last.pt, best.pt, best-epochNNN.pt
      logs/                    rank 0's log, Ray's driver log
      audit.json, report.html, figures/
      ray/                     Ray Train's own run state

Rank 0 writes; every write is atomic (:mod:`cellmorph.atomic`). Readers (report, predict,
audit, sweep, demo) go through the same class, so a renamed file changes in one place.

The folder is a local path or an object-store URL (``run_root: s3://bucket/runs``): paths are
``pathlib.Path`` or :class:`cellmorph.urlpath.URLPath`, which answer the same calls.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import yaml

from cellmorph import atomic
from cellmorph.errors import CellmorphError
from cellmorph.urlpath import AnyPath, URLPath, as_path

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from cellmorph.outputs import OutputSet

CHECKPOINTS = "checkpoints"


FOLD_NAMES = {"val": "validation", "test": "test"}


@dataclass(frozen=True)
class RunDir:
    """Paths and reads/writes of one run directory (a local folder or an object-store URL)."""

    path: AnyPath

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", as_path(self.path))

    @property
    def remote(self) -> bool:
        """True when the run lives in an object store (no local temporary files, no links)."""
        return isinstance(self.path, URLPath)

    # ------------------------------------------------------------------------------ layout
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> AnyPath:
        return self.path / "config.yaml"

    @property
    def classes(self) -> AnyPath:
        return self.path / "classes.json"

    @property
    def data_summary(self) -> AnyPath:
        return self.path / "data_summary.json"

    @property
    def metrics_log(self) -> AnyPath:
        return self.path / "metrics.jsonl"

    @property
    def result(self) -> AnyPath:
        return self.path / "metrics.json"

    @property
    def profiles(self) -> AnyPath:
        """The held-out wells' profiles (pycytominer; :mod:`cellmorph.profiles`)."""
        return self.path / "profiles.parquet"  # outputs.PROFILES (not imported: no pyarrow)

    def outputs(self, fold: str = "val") -> OutputSet:
        """The per-image and per-well outputs of a fold (:mod:`cellmorph.outputs`)."""
        from cellmorph.outputs import OutputSet

        return OutputSet(self.path, f"{fold}_")

    def predictions(self, fold: str = "val") -> AnyPath:
        return self.outputs(fold).predictions

    def embeddings(self, fold: str = "val") -> AnyPath:
        return self.outputs(fold).embeddings

    @property
    def events(self) -> AnyPath:
        return self.path / "events.jsonl"

    @property
    def progress(self) -> AnyPath:
        return self.path / "progress.json"

    @property
    def checkpoints(self) -> AnyPath:
        return self.path / CHECKPOINTS

    @property
    def last_checkpoint(self) -> AnyPath:
        return self.checkpoints / "last.pt"

    @property
    def best_checkpoint(self) -> AnyPath:
        return self.checkpoints / "best.pt"

    def epoch_checkpoint(self, epoch: int) -> AnyPath:
        return self.checkpoints / f"best-epoch{epoch:03d}.pt"

    @property
    def logs(self) -> AnyPath:
        return self.path / "logs"

    @property
    def audit(self) -> AnyPath:
        return self.path / "audit.json"

    @property
    def report(self) -> AnyPath:
        return self.path / "report.html"

    @property
    def figures(self) -> AnyPath:
        return self.path / "figures"

    @property
    def ray_storage(self) -> AnyPath:
        """Ray Train's ``storage_path`` for this run."""
        return self.path / "ray"

    @property
    def tracking(self) -> AnyPath:
        """The run's MLflow run (``tracking.mlflow_uri``): resumes log to the same one."""
        return self.path / "tracking.json"

    @property
    def placement_group(self) -> AnyPath:
        """The Train worker group's placement group id (a Tune sweep releases it)."""
        return self.path / ".ray_placement_group"

    # ----------------------------------------------------------------------------- writes
    def create(self, config: dict[str, Any], classes: list[str], label_column: str,
               summary: dict[str, Any]) -> None:  # fmt: skip
        """Write the run's description (rank 0, after every check that could refuse the run)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        atomic.write_text(self.config, yaml.safe_dump(config, sort_keys=False))
        save_label_encoding(LabelEncoding(label_column, list(classes)), self.classes)
        atomic.write_text(self.data_summary, json.dumps(summary, indent=2, default=str))

    def begin(self, first_epoch: int, workers: list[dict[str, Any]]) -> None:
        """Start (or resume at ``first_epoch``): keep one metrics line per earlier epoch, drop
        temporary files a killed writer left, and record the event with the worker processes."""
        self._trim_metrics(first_epoch)
        for folder in (self.path, self.checkpoints):
            if folder.is_dir():
                atomic.remove_stale_temps(folder)
        self.progress.unlink(missing_ok=True)
        event = "resume" if first_epoch > 0 else "start"
        self.log_event(event, epoch=first_epoch, workers=workers)

    def _trim_metrics(self, before_epoch: int) -> None:
        """Keep the latest line of each epoch < ``before_epoch``: a rerun epoch logs once."""
        latest = {
            int(r.get("epoch", -1)): r for r in self.history() if r.get("epoch", -1) < before_epoch
        }
        if self.metrics_log.is_file() or latest:
            text = "".join(json.dumps(latest[e]) + "\n" for e in sorted(latest))
            atomic.write_text(self.metrics_log, text)

    def log_epoch(self, record: dict[str, Any]) -> None:
        """Append one epoch's line to ``metrics.jsonl``."""
        with self.metrics_log.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def log_event(self, event: str, **fields: Any) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with self.events.open("a") as f:
            f.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")

    def write_progress(self, progress: dict[str, Any]) -> None:
        atomic.write_text(self.progress, json.dumps(progress))

    def write_selection(self, epoch: int, metrics: dict[str, Any]) -> None:
        """The best epoch so far: ``metrics.json`` with its validation scores."""
        atomic.write_text(self.result, json.dumps(
            {"fold": "validation", "epoch": epoch, **metrics, "validation": metrics}, indent=2
        ))  # fmt: skip

    def write_final(self, epoch: int | None, scores: dict[str, dict[str, Any]],
                    extra: dict[str, Any] | None = None, unit: str = "field") -> dict[str, Any]:  # fmt: skip
        """``metrics.json`` for the chosen epoch: the test fold's scores as the headline (the
        validation fold's when there is no test fold), both folds side by side, and ``extra``.
        A cell store's (``unit``) leads with its headline, ``well_balanced_accuracy``."""
        fold = "test" if scores.get("test") else "val"
        result = {"fold": FOLD_NAMES[fold], "epoch": epoch, **lead(unit, scores[fold]), **scores[fold],
                  "validation": scores.get("val"), "test": scores.get("test"), **(extra or {})}  # fmt: skip
        atomic.write_text(self.result, json.dumps(result, indent=2))
        return result

    def write_tracking(self, info: dict[str, Any]) -> None:
        atomic.write_text(self.tracking, json.dumps(info, indent=2))

    def write_audit(self, audit: dict[str, Any]) -> None:
        atomic.write_text(self.audit, json.dumps(audit, indent=2))

    # ------------------------------------------------------------------------------ reads
    def require(self) -> RunDir:
        """This run, or a CellmorphError when the folder is not a cellmorph run."""
        if not self.path.is_dir():
            raise CellmorphError(f"run directory not found: {self.path}")
        if not self.config.is_file():
            raise CellmorphError(f"{self.config} is missing (is this a cellmorph run directory?)")
        return self

    def read_config(self) -> dict[str, Any]:
        try:
            return yaml.safe_load(self.config.read_text()) or {}
        except yaml.YAMLError as e:
            raise CellmorphError(f"{self.config}: not valid YAML ({e})") from None

    def read_json(self, path: AnyPath, required: bool = True) -> Any:
        if not path.is_file():
            if required:
                raise CellmorphError(f"{path} is missing (is this a finished cellmorph run?)")
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CellmorphError(f"{path}: not valid JSON ({e})") from None

    def read_classes(self) -> LabelEncoding:
        return load_label_encoding(self.classes)

    def read_result(self) -> dict[str, Any]:
        return self.read_json(self.result)

    def history(self) -> list[dict[str, Any]]:
        """Every line of ``metrics.jsonl`` (empty when there is none yet)."""
        return self._jsonl(self.metrics_log)

    def read_progress(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.progress.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _jsonl(self, path: AnyPath) -> list[dict[str, Any]]:
        if not path.is_file():
            return []
        text = path.read_text()
        lines = text.splitlines()
        if lines and not text.endswith("\n"):
            lines = lines[:-1]  # torn by a full disk or a kill mid-append: never finished
        try:
            return [json.loads(ln) for ln in lines if ln.strip()]
        except json.JSONDecodeError as e:
            raise CellmorphError(f"{path}: a line is not valid JSON ({e})") from None

    def read_predictions(self, fold: str = "val",
                         columns: list[str] | None = None) -> pd.DataFrame | None:  # fmt: skip
        """``<fold>_predictions.parquet``, or None when it was not written."""
        import pandas as pd

        p = self.predictions(fold)
        if not p.is_file():
            return None
        return pd.read_parquet(_readable(p), columns=columns)

    def read_embeddings(self, fold: str = "val") -> np.ndarray | None:
        """``<fold>_embeddings.npy``, or None when it was not written; a local file is
        memory-mapped (a reader of a sample of rows never holds the whole array)."""
        import numpy as np

        p = self.embeddings(fold)
        if not p.is_file():
            return None
        return np.load(p, mmap_mode="r") if isinstance(p, Path) else np.load(_readable(p))

    def eval_checkpoint(self) -> AnyPath:
        """The chosen model (``best.pt``), which evaluation scores. ``last.pt`` is never used
        in its place: it is the latest epoch, not the one validation chose."""
        if self.best_checkpoint.is_file():
            return self.best_checkpoint
        why = ("no epoch had a validation score to choose it by" if self.last_checkpoint.is_file()
               else "the run has no checkpoint")  # fmt: skip
        raise CellmorphError(
            f"{self.best_checkpoint} is missing ({why}); last.pt is not the chosen model: "
            "resume the run with the same name, or score last.pt explicitly with "
            "`cellmorph predict --checkpoint`"
        )


def lead(unit: str, metrics: dict[str, Any] | None) -> dict[str, Any]:
    """The keys a result starts with: the store's unit and, for a cell store, the headline
    (the wells' balanced accuracy: a treatment is judged on new wells, not on single cells)."""
    out: dict[str, Any] = {"unit": unit}
    if unit == "cell" and metrics and "well_balanced_accuracy" in metrics:
        out.update({"headline": "well_balanced_accuracy",
                    "well_balanced_accuracy": metrics["well_balanced_accuracy"]})  # fmt: skip
    return out


def _readable(path: AnyPath) -> Any:
    """What pandas and numpy read: the local path, or the object's bytes in memory."""
    return io.BytesIO(path.read_bytes()) if isinstance(path, URLPath) else path


class LabelEncoding(NamedTuple):
    """Class id -> name for one label column (``classes.json``)."""

    label_column: str
    classes: list[str]


def save_label_encoding(encoding: LabelEncoding, path: str | AnyPath) -> AnyPath:
    payload = {"label_column": encoding.label_column, "classes": list(encoding.classes)}
    return atomic.write_text(path, json.dumps(payload, indent=1))


def load_label_encoding(path: str | AnyPath) -> LabelEncoding:
    """Read ``classes.json``; a missing file or key is a CellmorphError naming it."""
    p = as_path(path)
    if not p.is_file():
        raise CellmorphError(f"{p}: label encoding not found")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CellmorphError(f"{p}: not valid JSON ({e})") from None
    for key in ("label_column", "classes"):
        if not isinstance(raw, dict) or key not in raw:
            raise CellmorphError(f"{p}: missing key {key!r}")
    classes = [str(c) for c in raw["classes"]]
    if len(set(classes)) != len(classes):
        raise CellmorphError(f"{p}: 'classes' has duplicate names")
    return LabelEncoding(str(raw["label_column"]), classes)
