"""Embeddings judged as image-based profiling judges them: phenotypic activity by mAP.

For every treatment, the wells of that treatment are the positives and the negative-control
wells (DMSO) the negatives: each treatment well ranks all the others by cosine similarity of the
well-level profiles (:mod:`cellmorph.profiles`: pycytominer's median per well, normalized per
plate to the negative controls, feature-selected), its average precision says how well its
replicates stand out from the controls, and the treatment's mean average precision (mAP) gets a
permutation p-value, corrected for multiple testing (Benjamini-Hochberg). A treatment is
*retrieved* when its corrected p-value is below 0.05. This is the JUMP consortium's metric,
computed with its library, copairs.

The same metric on simple per-channel intensity statistics of the same images (mean, std and
three percentiles of each channel of the model's input) is reported beside it, so the number
says what the network adds.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from cellmorph.store.layout import parse_negcon

THRESHOLD = 0.05
NULL_SIZE = 10_000
# Pairs per similarity batch in copairs: its default (20,000 pairs of two 1,280-wide float64
# rows per thread) alone takes ~2 GB; this keeps a profile of thousands of wells near 300 MB.
PAIR_BATCH = 2_048
NEGCON_FLAG = "_negcon"
REFERENCE = "_reference_index"


def negcon_mask(metadata: pd.DataFrame, spec: str | None) -> np.ndarray:
    """Which rows are negative controls: those whose ``COLUMN`` is ``VALUE`` (the store's
    ``negcon`` attribute); none when the spec is empty or the column is absent."""
    parsed = parse_negcon(spec)
    if parsed is None or parsed[0] not in metadata.columns:
        return np.zeros(len(metadata), bool)
    column, value = parsed
    return (metadata[column].astype(str).str.strip() == value).to_numpy()


def phenotypic_activity(wells: pd.DataFrame, feats: np.ndarray, *, seed: int = 0,
                        null_size: int = NULL_SIZE) -> dict[str, Any]:  # fmt: skip
    """mAP of each treatment against the negative controls, and the fraction retrieved."""
    from copairs.map import average_precision, mean_average_precision
    from copairs.matching import assign_reference_index

    n_neg = int(wells[NEGCON_FLAG].sum())
    treated = wells.loc[~wells[NEGCON_FLAG], "treatment"].value_counts()
    if n_neg < 2 or not (treated >= 2).any():
        return {"skipped": f"needs >= 2 negative-control wells and a treatment in >= 2 wells "
                           f"(have {n_neg} controls, {int((treated >= 2).sum())} such treatments)"}  # fmt: skip
    meta = assign_reference_index(
        wells.reset_index(drop=True), NEGCON_FLAG, reference_col=REFERENCE
    )
    logging.getLogger("copairs").setLevel(logging.WARNING)
    ap = average_precision(
        meta, np.asarray(feats, np.float64), pos_sameby=["treatment", REFERENCE], pos_diffby=[],
        neg_sameby=[], neg_diffby=[NEGCON_FLAG, REFERENCE], progress_bar=False,
        batch_size=PAIR_BATCH,
    )  # fmt: skip
    ap = ap[~ap[NEGCON_FLAG]].dropna(subset=["average_precision"])
    maps = mean_average_precision(ap, sameby=["treatment"], null_size=null_size,
                                  threshold=THRESHOLD, seed=seed, progress_bar=False)  # fmt: skip
    per = {
        str(r.treatment): {"mAP": float(r.mean_average_precision), "p": float(r.p_value),
                           "q": float(r.corrected_p_value), "retrieved": bool(r.below_corrected_p)}
        for r in maps.itertuples()
    }  # fmt: skip
    return {
        "mean_map": float(maps["mean_average_precision"].mean()),
        "fraction_retrieved": float(maps["below_corrected_p"].mean()),
        "treatments": len(per),
        "negcon_wells": n_neg,
        "per_treatment": per,
    }


def activity_report(wells: pd.DataFrame | None, profiles: dict[str, np.ndarray],
                    seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Phenotypic activity of well-level ``profiles`` (name -> (W, F) means, rows of ``wells``:
    a table of ``well``, ``treatment``, the negative-control flag and ``images``)."""
    out: dict[str, Any] = {"threshold": THRESHOLD, "metric": "copairs mAP vs negative controls"}
    for name, feats in profiles.items():
        out[name] = phenotypic_activity(wells, feats, seed=seed)
        out["wells"] = len(wells)
    return out


def intensity_features(x: Any) -> np.ndarray:
    """Per image and channel: mean, std and the 5th/50th/95th percentiles of the model input
    (``(N, C, H, W)`` torch tensor); percentiles from every 4th pixel each way."""
    import torch

    x = x.float()
    sub = x[:, :, ::4, ::4].flatten(2)
    q = torch.quantile(sub, torch.tensor([0.05, 0.5, 0.95], device=x.device), dim=2)
    stats = [x.mean(dim=(2, 3)), x.std(dim=(2, 3)), *q]  # each (N, C)
    return torch.cat(stats, dim=1).cpu().numpy().astype(np.float32)
