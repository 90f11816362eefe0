"""Leakage audit: the original study's protocol next to cellmorph's default, on the same data.

The study oversampled the whole dataset and then split it image by image, so copies of one
image (and sites of one well) sit in training and validation. The audit trains both protocols
and writes both scores side by side with the number of validation images that have an
identical copy in training: the gap is what the leak was worth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cellmorph.config import (
    Config,
    DataConfig,
    config_from_dict,
    config_to_dict,
    resolve_from_store,
)
from cellmorph.errors import CellmorphError
from cellmorph.rundir import RunDir

STUDY_SUFFIX = "-study-protocol"
METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "well_accuracy")
STUDY_TITLE = "original study: oversample, then image-level split"
DEFAULT_TITLE = "cellmorph default: {split} split, oversample the training fold"


def study_config(cfg: Config) -> Config:
    """``cfg`` with the study's protocol: oversample everything, split images, weight classes."""
    raw = config_to_dict(cfg)
    raw["name"] = f"{cfg.name}{STUDY_SUFFIX}"
    raw["data"].update(
        {
            "split": "image",
            "oversample_before_split": True,
            "balance": "both",
            "val_plates": [],
            "test_fraction": 0.0,
            "test_plates": [],
        }  # the study had no test fold
    )
    return config_from_dict(raw)


def _check_default(cfg: DataConfig) -> None:
    if cfg.split == "image" or cfg.oversample_before_split:
        raise CellmorphError(
            "audit: the config to compare against the study must be leak-free "
            f"(data.split={cfg.split}, data.oversample_before_split="
            f"{cfg.oversample_before_split}); use data.split=grouped or plate"
        )


def _val_copies(data: DataConfig) -> tuple[int, int]:
    """(validation images, of which have an identical copy in training) for a data config."""
    from cellmorph.index import build_index, count_val_copies_in_train
    from cellmorph.store.read import open_store

    # The study's leak is what the audit reports; its index warnings would only repeat it.
    index = build_index(
        open_store(data.store, columns=[data.label_column]).metadata,
        data,
        warn=not data.oversample_before_split,
    )
    return len(index.val), count_val_copies_in_train(index)


def _protocol_row(key: str, title: str, run: RunDir, data: DataConfig) -> dict[str, Any]:
    if not run.result.is_file():
        raise CellmorphError(f"audit: {run.result} is missing (did the {key} run finish?)")
    metrics = run.read_result()
    n_val, copies = _val_copies(data)
    row: dict[str, Any] = {"name": key, "title": title, "run_dir": str(run.path)}
    row.update({k: metrics.get(k) for k in METRIC_KEYS})
    row["scored_fold"] = metrics.get("fold", "validation")
    row.update(
        {
            "split": data.split,
            "oversample_before_split": data.oversample_before_split,
            "balance": data.balance,
            "n_val_images": n_val,
            "val_copies_in_train": copies,
        }
    )
    return row


def format_table(result: dict[str, Any]) -> str:
    """The side-by-side table printed at the end of the audit."""
    study, default = result["protocols"]
    labels = ["scored_fold", *METRIC_KEYS, "n_val_images", "val_copies_in_train"]
    width = max(len(x) for x in labels) + 2
    lines = [f"{'':{width}}{'study protocol':>16}{'cellmorph default':>20}"]
    for key in labels:
        a, b = study.get(key), default.get(key)
        fa = f"{a:.3f}" if isinstance(a, float) else str(a)
        fb = f"{b:.3f}" if isinstance(b, float) else str(b)
        lines.append(f"{key:{width}}{fa:>16}{fb:>20}")
    return "\n".join(lines)


def audit(
    cfg: Config,
    *,
    reuse_default_run: RunDir | None = None,
    train: Callable[[Config], RunDir] | None = None,
) -> dict[str, Any]:
    """Train the study protocol (and the default, unless ``reuse_default_run`` holds it) and
    write ``audit.json`` into the default run's directory; returns its content.

    ``train`` runs one config (default: in this process; the demo passes Ray Train so both
    protocols train the same way as its main run).
    """
    if train is None:
        from cellmorph.train import run_local

        train = run_local
    _check_default(cfg.data)
    cfg = resolve_from_store(cfg)  # both protocols train on, and record, one column
    study = study_config(cfg)
    study_dir = train(study)
    default_dir = reuse_default_run or train(cfg)
    result = {
        "protocols": [
            _protocol_row("study", STUDY_TITLE, study_dir, study.data),
            _protocol_row(
                "default", DEFAULT_TITLE.format(split=cfg.data.split), default_dir, cfg.data
            ),
        ],
        "note": (
            "Both models are trained on the same images with the same settings except the "
            "split and balancing. The study's numbers are inflated by validation images that "
            "also sit in training (identical copies, and sites of the same well); cellmorph's "
            "come from its test fold, which shares no well with training and chose nothing."
        ),
    }
    default_dir.write_audit(result)
    return result
