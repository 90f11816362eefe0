"""Scoring a model on store rows: the one inference path of training, ``evaluate`` and ``predict``.

:func:`score` runs a model over a fold on every rank of a :class:`~cellmorph.distributed.Context`
(one process for ``predict``): each rank adds up its images (confusion, top-k hits, log loss) and
closes each well as soon as its images were seen (mean probability, embedding and input
statistics), streaming both to its part of the outputs (:mod:`cellmorph.outputs`); ranks then
add their sums in one all-reduce, and rank 0 merges the few wells split between two ranks and
the parts. No probability or embedding travels to rank 0. Well profiles and their phenotypic
activity are then built from the outputs (:func:`cellmorph.profiles.profile`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cellmorph.cells import write_sites
from cellmorph.checkpoint import Checkpoint
from cellmorph.distributed import Context
from cellmorph.errors import CellmorphError
from cellmorph.metrics import ImageSums, WellSums, merge_open, scores_from_sums, well_confusion
from cellmorph.metrics import well_labels as wells_majority
from cellmorph.model import CellNet, build_model
from cellmorph.outputs import (
    OutputSet,
    empty_images,
    empty_wells,
    merge,
)
from cellmorph.profiling import intensity_features
from cellmorph.store.read import Store

# --------------------------------------------------------------------------- devices and models


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks the first GPU when torch sees one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise CellmorphError(
            f"--device {spec}: not a device (use auto, cpu, cuda or cuda:N)"
        ) from None
    if dev.type not in ("cpu", "cuda"):
        raise CellmorphError(f"--device {spec}: cellmorph runs on cpu or cuda devices")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CellmorphError(f"--device {spec}: torch sees no CUDA GPU on this machine")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise CellmorphError(
            f"--device {spec}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0..)"
        )
    return dev


def resolve_amp(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether to use a GradScaler) for ``train.amp`` on ``device``."""
    if device.type == "cuda":
        if mode == "auto":
            return (
                (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)
            )
        if mode == "bf16":
            return torch.bfloat16, False
        if mode == "fp16":
            return torch.float16, True
        return None, False
    if mode == "fp16":
        raise CellmorphError(
            "train.amp: fp16 with a GradScaler needs a GPU; use bf16 or off on CPU"
        )
    # On CPU, autocast costs more than it saves for this model: off unless asked.
    return (torch.bfloat16, False) if mode == "bf16" else (None, False)


def model_from_checkpoint(ckpt: Checkpoint) -> CellNet:
    """Rebuild the network from the checkpoint's own config (no pretrained file needed)."""
    model_cfg = ckpt.config.model.model_copy(update={"pretrained": None})
    model = build_model(model_cfg, len(ckpt.channels), len(ckpt.classes))
    model.load_state_dict(ckpt.state["model"])
    return model.eval()


def iter_infer(model: nn.Module, loader: Any, device: torch.device,
               amp: torch.dtype | None) -> Iterator[tuple[np.ndarray, ...]]:  # fmt: skip
    """Per batch: store rows, softmax probabilities, embeddings and the intensity statistics of
    the model's input (all float32). ``amp``: the autocast dtype training used (``train.amp``)."""
    net = getattr(model, "module", model)
    net = getattr(net, "_orig_mod", net)  # a compiled model's plain module
    net.eval()
    with torch.inference_mode():
        for x, _y, rows in loader:
            x = x.to(device, non_blocking=True)
            autocast = torch.autocast(device.type, dtype=amp) if amp else nullcontext()
            with autocast:
                logits, emb = net.forward_with_embedding(x)
            probs = torch.softmax(logits.float(), dim=1)
            yield (
                np.asarray(torch.as_tensor(rows).cpu(), dtype=np.int64),
                probs.cpu().numpy().astype(np.float32),
                emb.float().cpu().numpy().astype(np.float32),
                intensity_features(x),
            )


# --------------------------------------------------------------------------- one fold


@dataclass(frozen=True)
class Fold:
    """What scoring needs to know about the store rows, per store row."""

    classes: list[str]
    labels: np.ndarray  # signed class id; -1: not known (unlabelled store, dropped class)
    wells: np.ndarray  # int32 well id (cellmorph.store.layout.well_codes)
    sites: np.ndarray | None = None  # cell stores: int32 site id (cellmorph.cells.site_codes)


@dataclass
class FoldResult:
    """Scores on one fold (rank 0); ``metrics`` is None when no image of it has a label."""

    metrics: dict[str, Any] | None
    images: int
    wells: int


class _Pass:
    """One rank's sums over its part of a fold, and its streamed outputs."""

    def __init__(self, fold: Fold, rows: np.ndarray, top_k: int, out: OutputSet | None,
                 rank: int):  # fmt: skip
        k, wells = len(fold.classes), fold.wells
        self.fold, self.k = fold, k
        self.labelled = bool((fold.labels[rows] >= 0).any()) if len(rows) else False
        self.image = ImageSums(k, top_k)
        expected = np.bincount(wells[rows], minlength=int(wells.max()) + 1 if len(wells) else 0)
        self.sums: WellSums | None = None  # widths known with the first batch
        self.expected = expected
        known = rows[fold.labels[rows] >= 0]
        self.well_label = wells_majority(known, fold.labels, wells, k)  # -1: no known label
        self.well_cm = np.zeros((k, k), np.int64)
        self.first = np.full(len(expected), np.iinfo(np.int64).max, np.int64)
        self.images, self.wells = out.writers(rank) if out is not None else (None, None)
        self.widths = (k, 0, 0)
        self.site_cm = np.zeros((k, k), np.int64)  # cell stores: sites by mean probability
        self.site_sums = self.site_label = None
        if fold.sites is not None:
            n_sites = int(fold.sites.max(initial=-1)) + 1
            self.site_sums = WellSums(np.bincount(fold.sites[rows], minlength=n_sites), [k])
            self.site_label = wells_majority(known, fold.labels, fold.sites, k)

    def add(self, rows: np.ndarray, probs: np.ndarray, emb: np.ndarray, feats: np.ndarray) -> None:
        # int64 in the outputs whatever the index holds (int8 labels at up to 127 classes)
        labels, ids = self.fold.labels[rows].astype(np.int64), self.fold.wells[rows]
        if self.labelled:
            known = labels >= 0
            self.image.add(labels[known], probs[known])
        np.minimum.at(self.first, ids, rows)
        if self.sums is None:
            self.widths = (self.k, emb.shape[1], feats.shape[1])
            self.sums = WellSums(self.expected, list(self.widths))
        closed = self.sums.add(ids, probs, emb, feats)
        if self.site_sums is not None:
            sites = self.site_sums.add(self.fold.sites[rows], probs)
            if sites is not None:
                self.add_sites(sites[0], sites[2])
        if self.images is not None:
            self.images.write(row=rows, label=labels, probs=probs, embedding=emb)
        if closed is not None:
            self._closed(closed)

    def _closed(self, closed: tuple[np.ndarray, ...]) -> None:
        ids, counts, probs, emb, feats = closed
        self.add_wells(ids, probs)
        if self.wells is not None:
            self.wells.write(well=ids, first_row=self.first[ids], n_images=counts, probs=probs,
                             embedding=emb, features=feats)  # fmt: skip

    def add_wells(self, ids: np.ndarray, probs: np.ndarray) -> None:
        """The wells' confusion: each labelled well's mean probability against its label."""
        known = self.well_label[ids] >= 0
        if known.any():
            self.well_cm += well_confusion(self.well_label[ids][known], probs[known], self.k)

    def add_sites(self, ids: np.ndarray, probs: np.ndarray) -> None:
        known = self.site_label[ids] >= 0
        if known.any():
            self.site_cm += well_confusion(self.site_label[ids][known], probs[known], self.k)

    def open_wells(self) -> tuple[np.ndarray, ...] | None:
        if self.sums is None:
            return None
        ids, counts, *sums = self.sums.open_wells()
        return (ids, counts, *sums, self.first[ids])

    def open_sites(self) -> tuple[np.ndarray, ...] | None:
        return self.site_sums.open_wells() if self.site_sums is not None else None

    def close(self) -> None:
        _k, dim, f = self.widths
        if self.images is not None:
            self.images.close(empty_images(self.k, dim))
            self.wells.close(empty_wells(self.k, dim, f))

    def abort(self) -> None:
        if self.images is not None:
            self.images.abort()
            self.wells.abort()


def _merge_split(opened: list[tuple[np.ndarray, ...] | None]) -> dict[str, np.ndarray] | None:
    """Rank 0: the wells whose images several ranks saw, whole again."""
    parts = [o for o in opened if o is not None]
    if not parts:
        return None
    ids, counts, probs, emb, feats = merge_open([o[:-1] for o in parts])
    first = np.full(len(ids), np.iinfo(np.int64).max, np.int64)
    for o in parts:
        np.minimum.at(first, np.searchsorted(ids, o[0]), o[-1])
    return {"well": ids, "first_row": first, "n_images": counts,
            "probs": probs.astype(np.float32), "embedding": emb.astype(np.float32),
            "features": feats.astype(np.float32)}  # fmt: skip


def score(model: nn.Module, loader: Any, rows: np.ndarray, fold: Fold, ctx: Context, top_k: int,
          amp: torch.dtype | None = None, out: OutputSet | None = None,
          store: Store | None = None, progress: bool = False) -> FoldResult | None:  # fmt: skip
    """Score ``model`` on ``rows`` (the rows ``loader`` covers across ranks, each rank a
    contiguous part); with ``out``, write the fold's outputs (``store`` gives the metadata).
    ``progress``: a bar of images/s and ETA on rank 0. Returns the result on rank 0, None on
    the others."""
    from tqdm import tqdm

    rows = np.unique(rows)
    p = _Pass(fold, rows, top_k, out, ctx.rank)
    unit = "cell" if fold.sites is not None else "img"
    bar = tqdm(total=len(rows), unit=unit, desc="predict", disable=None if progress and ctx.is_main else True)  # fmt: skip
    try:
        for r, probs, emb, feats in iter_infer(model, loader, ctx.device, amp):
            p.add(r, probs, emb, feats)
            bar.update(len(r))
        p.close()
    except BaseException:
        p.abort()
        raise
    finally:
        bar.close()
    opened = ctx.gather_to_main(p.open_wells())
    split = _merge_split(opened) if ctx.is_main else None
    if split is not None:
        p.add_wells(split["well"], split["probs"])
    sites = [o for o in ctx.gather_to_main(p.open_sites()) or [] if o is not None]
    if ctx.is_main and sites:  # the sites whose cells two ranks saw
        ids, _counts, probs = merge_open(sites)
        p.add_sites(ids, probs)
    total = ctx.sum(np.concatenate([p.image.vector(), p.well_cm.ravel(), p.site_cm.ravel()]))
    ctx.barrier()  # every rank's part is complete
    if not ctx.is_main:
        return None
    n_images = n_wells = 0
    if out is not None and store is not None:
        n_images, n_wells = merge(out, ctx.world_size, fold.classes, store.metadata_rows(), split)
        if fold.sites is not None:
            write_sites(out, fold.classes)
    metrics = None
    if p.labelled:
        kk = p.k * p.k
        image = p.image.load(total[: kk + 2])
        cms = total[kk + 2 :].reshape(2, p.k, p.k)
        metrics = scores_from_sums(image, fold.classes, cms[0],
                                   cms[1] if fold.sites is not None else None)  # fmt: skip
    return FoldResult(metrics, n_images, n_wells)
