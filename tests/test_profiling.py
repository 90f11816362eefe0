"""Phenotypic activity (copairs mAP against negative controls) of well profiles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from cellmorph.profiling import (
    activity_report,
    intensity_features,
    negcon_mask,
    phenotypic_activity,
)


def _wells(seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """8 DMSO wells, 4 wells of a strong treatment, 4 of one that looks like DMSO."""
    rng = np.random.default_rng(seed)
    rows = [("DMSO", True)] * 8 + [("strong", False)] * 4 + [("inert", False)] * 4
    table = pd.DataFrame(rows, columns=["treatment", "_negcon"]).assign(well=range(16), images=3)
    feats = rng.normal(size=(16, 32))
    feats[8:12] += 4 * rng.normal(size=32)  # the strong treatment moves its profile
    return table, feats


def test_strong_treatment_is_retrieved_and_inert_one_is_not():
    table, feats = _wells()
    out = phenotypic_activity(table, feats, seed=0, null_size=2000)
    per = out["per_treatment"]
    assert per["strong"]["mAP"] > 0.95 and per["strong"]["retrieved"]
    assert per["inert"]["mAP"] < 0.8 and not per["inert"]["retrieved"]
    assert out["fraction_retrieved"] == 0.5 and out["treatments"] == 2 and out["negcon_wells"] == 8
    again = phenotypic_activity(table, feats, seed=0, null_size=2000)
    assert again == out  # seeded: the same p-values every time


def test_too_few_controls_or_replicates_is_skipped_with_the_reason():
    table, feats = _wells()
    out = phenotypic_activity(table.iloc[7:], feats[7:])  # one DMSO well left
    assert "skipped" in out and "negative-control" in out["skipped"]


def test_negcon_wells_come_from_the_stores_column_only():
    md = pd.DataFrame({"Metadata_control_type": ["negcon", "trt", " negcon "]})
    assert negcon_mask(md, "Metadata_control_type=negcon").tolist() == [True, False, True]
    # No column, or no spec: no negative controls (never a guess from a label such as DMSO).
    plain = pd.DataFrame({"Metadata_pert_iname": ["DMSO", "a"]})
    assert negcon_mask(plain, "Metadata_control_type=negcon").tolist() == [False, False]
    assert negcon_mask(md, "").tolist() == [False, False, False]


def test_report_compares_embeddings_with_the_intensity_baseline():
    table, feats = _wells(1)
    flat = np.random.default_rng(2).normal(size=(16, 10))  # carries no treatment signal
    out = activity_report(table, {"embeddings": feats, "intensity_baseline": flat})
    assert out["embeddings"]["per_treatment"]["strong"]["retrieved"]
    assert out["embeddings"]["mean_map"] > out["intensity_baseline"]["mean_map"]
    assert out["wells"] == 16


def test_intensity_features_are_per_channel_statistics():
    x = torch.zeros(2, 3, 8, 8)
    x[1, 2] = 5.0
    f = intensity_features(x)
    assert f.shape == (2, 15)  # mean, std, p5, p50, p95 for each of 3 channels
    assert f[1, 2] == 5.0 and f[0].max() == 0.0


def test_feature_selection_is_pycytominers_with_many_correlated_pairs():
    """The vectorized correlation_threshold drops exactly the features pycytominer drops, on
    profiles of few wells where most features correlate (thousands of pairs), a constant
    feature and a missing value included."""
    import pycytominer

    from cellmorph.profiles import SELECT, correlation_threshold, feature_select

    rng = np.random.default_rng(3)
    base = rng.normal(size=(6, 4))
    feats = base @ rng.normal(size=(4, 150)) + 0.05 * rng.normal(size=(6, 150))
    feats[:, 7] = 1.0  # no variance
    feats[2, 11] = np.nan
    names = [f"emb_{i:04d}" for i in range(150)]
    table = pd.DataFrame(feats, columns=names).assign(Metadata_Well=[f"A{i}" for i in range(6)])
    table = table[["Metadata_Well", *names]]
    ref = pycytominer.feature_select(table, features=names, operation=SELECT)
    got = feature_select(table, names)
    assert list(got.columns) == list(ref.columns)
    pd.testing.assert_frame_equal(got, ref)
    assert 5 <= len(ref.columns) - 1 < 100  # some features kept, most dropped
    from pycytominer.operations import correlation_threshold as reference

    complete = [n for n in names if n not in ("emb_0007", "emb_0011")]
    want = reference(table, features=complete)
    assert sorted(correlation_threshold(table, complete)) == sorted(want) and len(want) > 100
