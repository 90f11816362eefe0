"""compute_metrics against small cases worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cellmorph.errors import CellmorphError
from cellmorph.metrics import compute_metrics
from cellmorph.store import well_ids


def _probs(pred: list[int], k: int, confidence: float = 0.7) -> np.ndarray:
    """Rows that put ``confidence`` on the predicted class and share the rest evenly."""
    p = np.full((len(pred), k), (1 - confidence) / (k - 1))
    p[np.arange(len(pred)), pred] = confidence
    return p


def test_imbalanced_case_by_hand():
    # 6 images of a, 2 of b; the model always says a.
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    m = compute_metrics(y, _probs([0] * 8, 2), ["a", "b"], top_k=5)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["balanced_accuracy"] == pytest.approx((1.0 + 0.0) / 2)  # recall a=1, b=0
    # F1(a) = 2*0.75*1/(1.75) = 6/7, F1(b) = 0
    assert m["macro_f1"] == pytest.approx((6 / 7 + 0) / 2)
    assert m["chance_majority"] == pytest.approx(0.75)
    assert m["chance"] == pytest.approx(0.5)
    assert "top5_accuracy" not in m  # k >= K: every label is in the top 5, a meaningless 1.0
    assert m["loss"] == pytest.approx(-(6 * np.log(0.7) + 2 * np.log(0.3)) / 8)
    assert m["per_class"]["a"] == {
        "precision": 0.75,
        "recall": 1.0,
        "f1": pytest.approx(6 / 7),
        "support": 6,
    }
    assert m["per_class"]["b"]["support"] == 2 and m["per_class"]["b"]["recall"] == 0.0
    assert m["confusion_matrix"] == [[6, 0], [2, 0]]
    json.dumps(m)  # goes to metrics.json as is


def test_top_k_and_zero_support_class():
    classes = ["a", "b", "c", "d"]
    y = np.array([0, 1, 2])
    probs = np.array(
        [
            [0.5, 0.3, 0.1, 0.1],  # top-1 right
            [0.5, 0.3, 0.1, 0.1],  # true b is 2nd
            [0.5, 0.3, 0.15, 0.05],  # true c is 3rd
        ]
    )
    m = compute_metrics(y, probs, classes, top_k=2)
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["top2_accuracy"] == pytest.approx(2 / 3)
    # class d has no images and is never predicted: reported with support 0, no crash
    assert m["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert len(m["confusion_matrix"]) == 4 and m["confusion_matrix"][3] == [0, 0, 0, 0]
    # balanced accuracy averages over classes present in y_true: (1 + 0 + 0) / 3
    assert m["balanced_accuracy"] == pytest.approx(1 / 3)


def test_well_level_accuracy_uses_mean_probability():
    classes = ["a", "b"]
    # Well W1 (label a): one confident wrong site, two mildly right sites -> mean says b.
    # Well W2 (label b): two right sites. Well W3 (label a): one right site.
    y = np.array([0, 0, 0, 1, 1, 0])
    probs = np.array([[0.05, 0.95], [0.6, 0.4], [0.6, 0.4], [0.2, 0.8], [0.4, 0.6], [0.9, 0.1]])
    wells = np.array(["W1", "W1", "W1", "W2", "W2", "W3"])
    m = compute_metrics(y, probs, classes, wells=wells)
    assert m["accuracy"] == pytest.approx(5 / 6)
    # W1 mean p(a) = (0.05+0.6+0.6)/3 = 0.4167 < 0.5 -> wrong; W2, W3 right.
    assert m["well_accuracy"] == pytest.approx(2 / 3)
    assert m["n_wells"] == 3
    # wells per class: a -> W1 (wrong), W3 (right): 0.5; b -> W2 (right): 1.0
    assert m["well_balanced_accuracy"] == pytest.approx(0.75)


def test_well_ids_join_plate_and_well():
    md = pd.DataFrame(
        {"Metadata_Plate": ["P1", "P1", "P2"], "Metadata_Well": ["A01", "A01", "A01"]}
    )
    ids = well_ids(md)
    assert list(ids) == ["P1/A01", "P1/A01", "P2/A01"]
    with pytest.raises(CellmorphError, match="Metadata_Well"):
        well_ids(md.drop(columns="Metadata_Well"))


def test_bad_shapes_are_clear_errors():
    with pytest.raises(CellmorphError, match="expected \\(N, 3\\)"):
        compute_metrics(np.array([0, 1]), np.ones((2, 2)) / 2, ["a", "b", "c"])
    with pytest.raises(CellmorphError, match="outside"):
        compute_metrics(np.array([0, 5]), np.ones((2, 2)) / 2, ["a", "b"])


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize(("k", "top_k"), [(2, 1), (5, 2), (12, 3)])
def test_sufficient_statistics_match_scikit_learn(k, top_k):
    """Every score, computed from the sums, equals scikit-learn's on the images, also with
    classes absent from the labels and ties in the probabilities."""
    from sklearn import metrics as skm

    rng = np.random.default_rng(k)
    y = rng.integers(0, k - (k > 2), 300)  # the last class never occurs (k > 2)
    logits = rng.normal(size=(300, k)) + 1.5 * np.eye(k)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs[:10] = 1.0 / k  # ties: argmax and top-k break them as scikit-learn does
    wells = rng.integers(0, 40, 300).astype(str)
    m = compute_metrics(y, probs, [f"c{i}" for i in range(k)], wells=wells, top_k=top_k)
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["loss"] == pytest.approx(skm.log_loss(y, probs, labels=np.arange(k)))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=np.arange(k)).tolist()
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=np.arange(k), zero_division=0)
    for i in range(k):
        got = m["per_class"][f"c{i}"]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx(
            (p[i], r[i], f[i], s[i])
        )
    if top_k < k:
        score = probs[:, 1] if k == 2 else probs
        expected = skm.top_k_accuracy_score(y, score, k=top_k, labels=np.arange(k))
        assert m[f"top{top_k}_accuracy"] == pytest.approx(expected)
    # wells: mean probability per well, argmax, against the well's majority label
    frame = pd.DataFrame(probs).assign(w=wells, y=y)
    mean = frame.groupby("w")[list(range(k))].mean()
    label = frame.groupby("w")["y"].agg(lambda v: np.bincount(v).argmax()).loc[mean.index]
    well_pred = mean.to_numpy().argmax(1)
    assert m["n_wells"] == len(mean)
    assert m["well_accuracy"] == pytest.approx(skm.accuracy_score(label, well_pred))
    assert m["well_balanced_accuracy"] == pytest.approx(
        skm.balanced_accuracy_score(label, well_pred)
    )


def test_sums_of_parts_equal_the_sums_of_the_whole():
    """What ranks add up: the sums of any split of the images are the sums of all of them."""
    from cellmorph.metrics import ImageSums, WellSums, merge_open

    rng = np.random.default_rng(0)
    y, probs = rng.integers(0, 4, 200), rng.dirichlet(np.ones(4), 200)
    wells = np.repeat(np.arange(40), 5)  # wells of 5 consecutive images
    whole, parts = ImageSums(4, 2), [ImageSums(4, 2) for _ in range(3)]
    whole.add(y, probs)
    cuts = np.split(np.arange(200), [63, 141])  # both cuts fall inside a well
    for part, idx in zip(parts, cuts):
        part.add(y[idx], probs[idx])
    total = ImageSums(4, 2).load(sum(p.vector() for p in parts))
    assert (total.confusion == whole.confusion).all() and total.top_hits == whole.top_hits
    assert total.loss_sum == pytest.approx(whole.loss_sum)
    # wells: each part closes the wells it holds whole; the two split wells merge
    expected = np.bincount(wells)
    streams = [WellSums(expected, [4]) for _ in cuts]
    closed = [s.add(wells[idx], probs[idx]) for s, idx in zip(streams, cuts)]
    assert sum(len(c[0]) for c in closed) == 38
    ids, counts, means = merge_open([s.open_wells() for s in streams])
    assert list(ids) == [12, 28] and list(counts) == [5, 5]
    np.testing.assert_allclose(means, [probs[60:65].mean(0), probs[140:145].mean(0)])
