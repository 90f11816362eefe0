"""Validation metrics a biologist reads: image-level, per-class and well-level.

Everything is computed with scikit-learn against the fixed label set ``range(K)``, so a class
that has no validation images (possible after a grouped split) never shifts the others or
crashes a metric. Treatments are judged per well, so when the wells of the images are given
the image probabilities are averaged per well and scored again.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

from cellmorph.errors import CellmorphError

# The scalar scores evaluation produces, and whether higher ("max") or lower ("min") is better.
# ``train.best_metric`` must name one of them (checked when the config is loaded).
SCORE_MODES: dict[str, str] = {
    "accuracy": "max",
    "balanced_accuracy": "max",
    "macro_f1": "max",
    "loss": "min",
    "well_accuracy": "max",
    "well_balanced_accuracy": "max",
}


def topk_name(k: int) -> str:
    return f"top{k}_accuracy"


def score_mode(name: str, top_k: int) -> str | None:
    """ "max" or "min" for a score evaluation produces with ``eval.top_k``; None if it does not."""
    return "max" if name == topk_name(top_k) else SCORE_MODES.get(name)


def _check_inputs(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> None:
    k = len(classes)
    if probs.ndim != 2 or probs.shape[1] != k:
        raise CellmorphError(f"probabilities have shape {probs.shape}, expected (N, {k})")
    if len(y_true) != len(probs):
        raise CellmorphError(f"{len(y_true)} labels but {len(probs)} probability rows")
    if len(y_true) == 0:
        raise CellmorphError("no validation images to score")
    if y_true.min() < 0 or y_true.max() >= k:
        raise CellmorphError(f"labels outside 0..{k - 1} (found {y_true.min()}..{y_true.max()})")


def _top_k(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    from sklearn.metrics import top_k_accuracy_score

    n_classes = probs.shape[1]
    if n_classes == 2:  # sklearn wants the positive-class score in the binary case
        return float(top_k_accuracy_score(y_true, probs[:, 1], k=k, labels=[0, 1]))
    return float(top_k_accuracy_score(y_true, probs, k=k, labels=np.arange(n_classes)))


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    # Mean recall over the classes present in y_true; predictions of absent classes count as
    # errors. sklearn warns about the absent ones, which is expected here.
    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y_true, y_pred))


def _per_class(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    from sklearn.metrics import precision_recall_fscore_support

    labels = np.arange(len(classes))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        name: {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(s[i]),
        }
        for i, name in enumerate(classes)
    }


def well_level(y_true: np.ndarray, probs: np.ndarray, wells: np.ndarray) -> dict[str, Any]:
    """Mean probability over each well's images, argmax, scored against the well's label.

    A well's label is its images' label (the most common one if a well were ever mixed).
    """
    from sklearn.metrics import accuracy_score

    k = probs.shape[1]
    frame = pd.DataFrame(probs, columns=range(k))
    frame["_well"] = np.asarray(wells)
    mean_probs = frame.groupby("_well", sort=True).mean()
    labels = (
        pd.Series(y_true)
        .groupby(frame["_well"].to_numpy(), sort=True)
        .agg(lambda s: s.value_counts().idxmax())
    )
    labels = labels.loc[mean_probs.index].to_numpy()
    pred = mean_probs.to_numpy().argmax(axis=1)
    return {
        "well_accuracy": float(accuracy_score(labels, pred)),
        "well_balanced_accuracy": _balanced_accuracy(labels, pred),
        "n_wells": int(len(labels)),
    }


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    wells: np.ndarray | None = None,
    top_k: int = 5,
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1, top-k, log loss, chance, per-class, confusion.

    ``probs`` holds softmax probabilities (rows sum to 1); ``wells`` one id per image.
    """
    # scikit-learn is imported here, not at module level: the config imports this module for
    # the score names, and every command loads the config.
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, log_loss

    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    _check_inputs(y_true, probs, classes)
    k = len(classes)
    labels = np.arange(k)
    y_pred = probs.argmax(axis=1)
    counts = np.bincount(y_true, minlength=k)
    out: dict[str, Any] = {
        "n_images": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": _balanced_accuracy(y_true, y_pred),
        # Macro over classes seen in labels or predictions (sklearn's default set), so classes
        # absent from the validation fold and never predicted do not count as F1 = 0.
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "top_k": int(top_k),
        "loss": float(log_loss(y_true, probs / probs.sum(axis=1, keepdims=True), labels=labels)),
        # Chance for balanced accuracy is 1/K; for plain accuracy it is the majority rate.
        "chance": 1.0 / k,
        "chance_majority": float(counts.max() / counts.sum()),
        "per_class": _per_class(y_true, y_pred, classes),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
    if top_k < k:  # with K <= top_k every class is among the top k: a meaningless 1.0
        out[topk_name(top_k)] = _top_k(y_true, probs, top_k)
    if wells is not None:
        if len(wells) != len(y_true):
            raise CellmorphError(f"{len(wells)} well ids for {len(y_true)} images")
        out.update(well_level(y_true, probs, np.asarray(wells)))
    return out
