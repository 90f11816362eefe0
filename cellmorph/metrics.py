"""Validation metrics a biologist reads: image-level, per-class and well-level.

Every score is a function of *sufficient statistics* that add up across batches and ranks: the
K x K confusion matrix, the top-k hits and the summed log loss of the images, and the confusion
matrix of the wells (each well's mean probability, argmax, against the well's label). A rank
sums its own images (:class:`ImageSums`) and closes each well once all its images were seen
(:class:`WellSums`); ranks then add their sums, so no probability vector or embedding travels
to rank 0. The formulas are scikit-learn's (accuracy, balanced accuracy, macro F1,
precision/recall/F1 per class, top-k accuracy, log loss), over the fixed label set
``range(K)``: a class with no validation images (possible after a grouped split) never shifts
the others or crashes a metric. ``tests/test_metrics.py`` checks them against scikit-learn.
"""

from __future__ import annotations

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
    "well_macro_f1": "max",
    # cell stores: each site's mean probability over its cells
    "site_accuracy": "max",
    "site_balanced_accuracy": "max",
    "site_macro_f1": "max",
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


# --------------------------------------------------------------------------- image sums


def top_k_hits(y_true: np.ndarray, probs: np.ndarray, k: int) -> int:
    """How many true labels are among the ``k`` highest probabilities (scikit-learn's
    ``top_k_accuracy_score`` rule, ties included; the binary case thresholds at 0.5)."""
    if probs.shape[1] == 2:
        score = probs[:, 1]
        threshold = 0.5 if score.min() >= 0 and score.max() <= 1 else 0.0
        return int(((score > threshold).astype(np.int64) == y_true).sum())
    top = np.argsort(probs, axis=1, kind="mergesort")[:, ::-1][:, :k]
    return int((top == y_true[:, None]).any(axis=1).sum())


class ImageSums:
    """Image-level sufficient statistics: confusion matrix, top-k hits, summed log loss."""

    def __init__(self, k: int, top_k: int):
        self.k, self.top_k = k, top_k
        self.confusion = np.zeros((k, k), np.int64)
        self.top_hits = 0
        self.loss_sum = 0.0

    def add(self, y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """Add a batch (labels, softmax probabilities); returns its predicted classes."""
        y = np.asarray(y_true, dtype=np.int64)
        p = np.asarray(probs, dtype=np.float64)
        pred = p.argmax(axis=1)
        self.confusion += np.bincount(y * self.k + pred, minlength=self.k**2).reshape(self.k, -1)
        if self.top_k < self.k:
            self.top_hits += top_k_hits(y, p, self.top_k)
        # log loss of the renormalized probabilities, clipped as scikit-learn clips them
        eps = np.finfo(np.float64).eps
        p_true = np.clip(p[np.arange(len(y)), y] / p.sum(axis=1), eps, 1 - eps)
        self.loss_sum += float(-np.log(p_true).sum())
        return pred

    def vector(self) -> np.ndarray:
        """Everything as one float64 vector, for one all-reduce (counts stay exact < 2**53)."""
        return np.concatenate([self.confusion.ravel(), [self.top_hits, self.loss_sum]]).astype(
            np.float64
        )

    def load(self, vec: np.ndarray) -> ImageSums:
        """Set the sums from :meth:`vector`'s layout (after ranks added theirs)."""
        kk = self.k * self.k
        self.confusion = np.rint(vec[:kk]).astype(np.int64).reshape(self.k, self.k)
        self.top_hits, self.loss_sum = int(round(vec[kk])), float(vec[kk + 1])
        return self


# --------------------------------------------------------------------------- well sums


class WellSums:
    """Running per-well sums of arrays (probabilities, embeddings...) over a stream of images.

    ``expected`` holds, per well id, how many of the coming images belong to the well; a well
    is *closed* as soon as that many were added, so memory holds only the wells still open
    (in store order, a handful), not every well. Wells whose images this stream never
    completes (split across ranks) stay open: :meth:`open_wells` hands them to the merge.
    """

    def __init__(self, expected: np.ndarray, widths: list[int]):
        self.expected = np.asarray(expected, dtype=np.int64)
        self.widths = widths
        self.slot = np.full(len(self.expected), -1, np.int64)
        self.ids = np.zeros(0, np.int64)  # well id in each slot (-1: free)
        self.count = np.zeros(0, np.int64)
        self.sums = [np.zeros((0, w)) for w in widths]
        self.free: list[int] = []

    def _slots(self, ids: np.ndarray) -> np.ndarray:
        new = np.unique(ids[self.slot[ids] < 0])
        if len(new):
            reuse = [self.free.pop() for _ in range(min(len(new), len(self.free)))]
            grow = len(new) - len(reuse)
            start = len(self.ids)
            if grow:
                self.ids = np.concatenate([self.ids, np.full(grow, -1, np.int64)])
                self.count = np.concatenate([self.count, np.zeros(grow, np.int64)])
                self.sums = [np.vstack([s, np.zeros((grow, s.shape[1]))]) for s in self.sums]
            slots = np.array(reuse + list(range(start, start + grow)), np.int64)
            self.slot[new], self.ids[slots] = slots, new
        return self.slot[ids]

    def add(self, ids: np.ndarray, *values: np.ndarray) -> tuple[np.ndarray, ...] | None:
        """Add a batch; returns the wells it closed, ``(ids, counts, *means)``, or None."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return None
        slots = self._slots(ids)
        order = np.argsort(slots, kind="stable")
        used, starts = np.unique(slots[order], return_index=True)
        self.count[used] += np.diff(np.append(starts, len(order)))
        for s, v in zip(self.sums, values):
            s[used] += np.add.reduceat(np.asarray(v, np.float64)[order], starts, axis=0)
        done = used[self.count[used] >= self.expected[self.ids[used]]]
        done = done[np.argsort(self.ids[done])]  # by well id, not by the slot reused
        return self._close(done) if len(done) else None

    def _close(self, slots: np.ndarray) -> tuple[np.ndarray, ...]:
        ids, counts = self.ids[slots].copy(), self.count[slots].copy()
        means = [s[slots] / counts[:, None] for s in self.sums]
        for s in self.sums:
            s[slots] = 0.0
        self.slot[ids], self.ids[slots], self.count[slots] = -1, -1, 0
        self.free.extend(slots.tolist())
        return (ids, counts, *means)

    def open_wells(self) -> tuple[np.ndarray, ...]:
        """The wells not closed: ``(ids, counts, *sums)`` (sums, not means: to be merged)."""
        slots = np.flatnonzero(self.ids >= 0)
        return (self.ids[slots], self.count[slots], *[s[slots] for s in self.sums])


def merge_open(parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Merge :meth:`WellSums.open_wells` of several ranks: ``(ids, counts, *means)``."""
    ids = np.concatenate([p[0] for p in parts])
    if not len(ids):
        return (ids, ids, *[np.zeros((0, p.shape[1])) for p in parts[0][2:]])
    uniq, inverse = np.unique(ids, return_inverse=True)
    counts = np.bincount(inverse, np.concatenate([p[1] for p in parts])).astype(np.int64)
    means = []
    for j in range(2, len(parts[0])):
        total = np.zeros((len(uniq), parts[0][j].shape[1]))
        np.add.at(total, inverse, np.concatenate([p[j] for p in parts]))
        means.append(total / counts[:, None])
    return (uniq, counts, *means)


def well_labels(rows: np.ndarray, labels: np.ndarray, wells: np.ndarray,
                n_classes: int) -> np.ndarray:  # fmt: skip
    """Per well id: the label of its images among ``rows`` (the most common one, the smaller
    class id on a tie; -1 for wells without rows)."""
    ids, y = wells[rows].astype(np.int64), labels[rows]  # int64: ids * n_classes may pass 2**31
    out = np.full(int(wells.max()) + 1 if len(wells) else 0, -1, np.int64)
    pairs, counts = np.unique(ids * n_classes + y, return_counts=True)
    order = np.lexsort((pairs % n_classes, -counts, pairs // n_classes))
    w = pairs[order] // n_classes
    first = np.r_[True, w[1:] != w[:-1]] if len(w) else np.zeros(0, bool)
    out[w[first]] = (pairs[order] % n_classes)[first]
    return out


# --------------------------------------------------------------------------- scores


def _recall_mean(confusion: np.ndarray) -> float:
    """Balanced accuracy: mean recall over the classes that have true images."""
    support = confusion.sum(axis=1)
    seen = support > 0
    return float(np.mean(np.diag(confusion)[seen] / support[seen])) if seen.any() else 0.0


def _per_class(confusion: np.ndarray, classes: list[str]) -> tuple[dict[str, Any], np.ndarray]:
    tp = np.diag(confusion).astype(np.float64)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        denom = 2 * tp + (predicted - tp) + (support - tp)
        f1 = np.where(denom > 0, 2 * tp / denom, 0.0)
    table = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]),
               "f1": float(f1[i]), "support": int(support[i])}
        for i, name in enumerate(classes)
    }  # fmt: skip
    return table, f1


def group_scores(level: str, confusion: np.ndarray) -> dict[str, Any]:
    """``<level>_accuracy``, ``_balanced_accuracy``, ``_macro_f1`` and ``n_<level>s`` from the
    confusion matrix of groups of images (wells, sites) scored by their mean probability."""
    cm = np.asarray(confusion)
    n = int(cm.sum())
    _, f1 = _per_class(cm, [str(i) for i in range(len(cm))])
    present = (cm.sum(axis=1) > 0) | (cm.sum(axis=0) > 0)
    return {
        f"{level}_accuracy": float(np.trace(cm) / max(n, 1)),
        f"{level}_balanced_accuracy": _recall_mean(cm),
        f"{level}_macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        f"n_{level}s": n,
    }


def scores_from_sums(image: ImageSums, classes: list[str], wells: np.ndarray | None = None,
                     sites: np.ndarray | None = None) -> dict[str, Any]:  # fmt: skip
    """Every score from the sums; ``wells``, ``sites``: the confusion matrices of the wells and
    (cell stores) of the sites, each scored by its mean probability."""
    cm, k = image.confusion, len(classes)
    n = int(cm.sum())
    if n == 0:
        raise CellmorphError("no validation images to score")
    support = cm.sum(axis=1)
    per_class, f1 = _per_class(cm, classes)
    # Macro F1 over classes seen in labels or predictions (scikit-learn's default set), so
    # classes absent from the fold and never predicted do not count as F1 = 0.
    present = (support > 0) | (cm.sum(axis=0) > 0)
    out: dict[str, Any] = {
        "n_images": n,
        "accuracy": float(np.trace(cm) / n),
        "balanced_accuracy": _recall_mean(cm),
        "macro_f1": float(f1[present].mean()),
        "top_k": int(image.top_k),
        "loss": image.loss_sum / n,
        # Chance for balanced accuracy is 1/K; for plain accuracy it is the majority rate.
        "chance": 1.0 / k,
        "chance_majority": float(support.max() / n),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }
    if image.top_k < k:  # with K <= top_k every class is among the top k: a meaningless 1.0
        out[topk_name(image.top_k)] = image.top_hits / n
    if sites is not None:
        out.update(group_scores("site", sites))
    if wells is not None:
        out.update(group_scores("well", wells))
    return out


def well_confusion(labels: np.ndarray, mean_probs: np.ndarray, k: int) -> np.ndarray:
    """Confusion matrix of wells: label against the argmax of the mean probability."""
    pred = np.asarray(mean_probs).argmax(axis=1)
    return np.bincount(labels * k + pred, minlength=k * k).reshape(k, k)


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    wells: np.ndarray | None = None,
    top_k: int = 5,
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1, top-k, log loss, chance, per-class, confusion,
    and well-level accuracy when ``wells`` (one id per image) is given; all images in memory.

    ``probs`` holds softmax probabilities (rows sum to 1). Distributed evaluation computes
    the same numbers from per-rank sums (``cellmorph.train.evaluate``).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    _check_inputs(y_true, probs, classes)
    k = len(classes)
    image = ImageSums(k, top_k)
    image.add(y_true, probs)
    if wells is None:
        return scores_from_sums(image, classes)
    if len(wells) != len(y_true):
        raise CellmorphError(f"{len(wells)} well ids for {len(y_true)} images")
    codes = pd.factorize(pd.Series(np.asarray(wells)))[0].astype(np.int64)
    rows = np.arange(len(y_true))
    sums = WellSums(np.bincount(codes), [k])
    ids, _counts, means = sums.add(codes, probs)  # every well closes: all images are here
    labels = well_labels(rows, y_true, codes, k)[ids]
    return scores_from_sums(image, classes, well_confusion(labels, means, k))
