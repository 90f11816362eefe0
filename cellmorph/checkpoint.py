"""Checkpoint files: written atomically, read with ``weights_only=True``, kept by one saver.

A checkpoint is a dict of tensors and plain values: model, optimizer, scheduler, scaler, epoch,
RNG state, the resolved config, classes, channels, normalization and the epoch's metrics.
:class:`CheckpointSaver` writes ``last.pt`` once per epoch and keeps ``best.pt`` and the best
``keep_best`` epochs as hard links to it (copies where links are impossible).
"""

from __future__ import annotations

import io
import math
import pickle
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cellmorph import atomic
from cellmorph.config import Config, validate
from cellmorph.errors import CellmorphError
from cellmorph.rundir import RunDir
from cellmorph.urlpath import AnyPath, URLPath, as_path

# What torch.load(weights_only=True) raises for a foreign, truncated or corrupt file (an
# empty file, a pickle of other objects, a damaged zip, random bytes): found by loading each.
# Anything else (a TypeError from a bad argument) is a bug and keeps its traceback.
LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, IndexError, KeyError, ValueError)

REQUIRED_KEYS = ("model", "config", "classes", "channels")


def save_checkpoint(state: dict[str, Any], path: AnyPath) -> None:
    """Write to a temporary file and rename it, so a crash never leaves half a checkpoint.

    Serialized in memory first: torch reports a full disk as an opaque RuntimeError, a plain
    file write as the OSError (ENOSPC) that names the checkpoint.
    """
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic.write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | AnyPath) -> dict[str, Any]:
    """A cellmorph checkpoint (tensors and plain Python values only: no pickled code); a local
    path or an object-store URL."""
    p = as_path(path)
    if not p.is_file():
        raise CellmorphError(f"checkpoint not found: {p}")
    source = io.BytesIO(p.read_bytes()) if isinstance(p, URLPath) else p
    try:
        ckpt = torch.load(source, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as e:
        raise CellmorphError(f"{p}: not a readable cellmorph checkpoint ({e})") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CellmorphError(f"{p}: checkpoint lacks key(s) {missing}")
    return ckpt


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read for inference: its config validated like any other config."""

    path: AnyPath
    state: dict[str, Any]
    config: Config
    classes: list[str]
    channels: list[str]

    @property
    def norm(self) -> dict[str, Any] | None:
        """The training normalization (``Normalization.to_dict()``); None in old checkpoints."""
        return self.state.get("norm")

    @property
    def epoch(self) -> int | None:
        return self.state.get("epoch")


def read_checkpoint(path: str | AnyPath) -> Checkpoint:
    """:func:`load_checkpoint` plus its config parsed by the config model (a bad one is a
    one-line error naming the key)."""
    p = as_path(path)
    state = load_checkpoint(p)
    cfg = validate(Config, state["config"], f"{p}: checkpoint config")
    return Checkpoint(p, state, cfg, [str(c) for c in state["classes"]], list(state["channels"]))


def check_compatible(ckpt: dict[str, Any], classes: list[str], channels: list[str],
                     model_config: dict[str, Any], src: AnyPath,
                     store_digest: str | None = None) -> None:  # fmt: skip
    """Refuse to resume across a change of classes, channels, model shape or store content."""
    if list(ckpt.get("channels", [])) != list(channels):
        raise CellmorphError(
            f"{src}: checkpoint channels {ckpt.get('channels')} differ from the store's {channels}"
        )
    if list(ckpt.get("classes", [])) != list(classes):
        ck = ckpt.get("classes", [])
        raise CellmorphError(
            f"{src}: checkpoint has {len(ck)} classes {ck[:5]}... but this data has "
            f"{len(classes)} {classes[:5]}...; use a new run name to train from scratch"
        )
    old = (ckpt.get("config") or {}).get("model", {})
    changed = [k for k in ("backbone", "width_mult") if k in old and old[k] != model_config[k]]
    if changed:
        detail = ", ".join(f"model.{k} {old[k]} -> {model_config[k]}" for k in changed)
        raise CellmorphError(
            f"{src}: the model changed since this run started ({detail}); "
            "use a new run name to train from scratch"
        )
    check_same_store(ckpt, store_digest, src)


def check_same_store(ckpt: dict[str, Any], store_digest: str | None, src: AnyPath) -> None:
    """The store must be the one the checkpoint was trained on (its ``metadata_digest``): a
    re-converted store moves images between rows and folds, so resumed training or a re-run
    evaluation would mix two datasets. Checkpoints without a digest are not checked."""
    recorded = ckpt.get("store_digest")
    if recorded and store_digest and recorded != store_digest:
        store = (ckpt.get("config") or {}).get("data", {}).get("store")
        raise CellmorphError(
            f"{src}: the store {store} changed since this checkpoint was trained (converted "
            "again?): its rows are other images now; use a new run name to train on it"
        )


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),
        "python": random.getstate()[1],
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.asarray(state["numpy"], dtype=np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


def update_best(best_k: list[tuple[float, int]], score: float, epoch: int, k: int,
                mode: str = "max") -> tuple[list[tuple[float, int]], list[int]]:  # fmt: skip
    """The top-``k`` (score, epoch) list after ``epoch`` scored ``score``, best first (ties:
    the earlier epoch), and the epochs that fell out of it. ``mode`` "min": lower is better."""
    if k == 0 or math.isnan(score):
        return best_k, []
    sign = -1.0 if mode == "max" else 1.0
    ranked = sorted([*best_k, (score, epoch)], key=lambda t: (sign * t[0], t[1]))
    return ranked[:k], [e for _, e in ranked[k:]]


class CheckpointSaver:
    """``last.pt`` each epoch (one ``torch.save``), ``best.pt`` and the best ``keep_best`` epochs
    as ``best-epochNNN.pt`` by one validation score, in the spirit of timm's CheckpointSaver.

    The ranking (``best_k``, best first; ``best`` is its head, or the single best epoch when
    ``keep_best`` is 0) is stored inside each checkpoint, so a resumed run keeps ranking.
    """

    def __init__(self, run: RunDir, metric: str, mode: str, keep_best: int):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.run, self.metric, self.mode, self.keep_best = run, metric, mode, keep_best
        self.best_k: list[tuple[float, int]] = []
        self.best: tuple[float, int] | None = None

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Take the ranking from a resumed ``last.pt``, and finish the links that a crash right
        after writing it may have left undone (``last.pt`` *is* that epoch's state)."""
        self.best_k = [(float(s), int(e)) for s, e in ckpt.get("best_k", [])]
        best = ckpt.get("best")
        self.best = (float(best[0]), int(best[1])) if best else None
        self._link(int(ckpt["epoch"]), [])

    def is_better(self, score: float) -> bool:
        if math.isnan(score):
            return False
        if self.best is None:
            return True
        return score > self.best[0] if self.mode == "max" else score < self.best[0]

    def save(self, state: dict[str, Any], epoch: int, score: float) -> bool:
        """Save ``epoch``'s state; returns whether it is the new best."""
        is_best = self.is_better(score)
        if is_best:
            self.best = (score, epoch)
        self.best_k, dropped = update_best(self.best_k, score, epoch, self.keep_best, self.mode)
        state = {**state, "epoch": epoch, "best_k": [list(t) for t in self.best_k],
                 "best": list(self.best) if self.best else None}  # fmt: skip
        save_checkpoint(state, self.run.last_checkpoint)
        self._link(epoch, dropped)
        return is_best

    def _link(self, epoch: int, dropped: list[int]) -> None:
        last = self.run.last_checkpoint
        if self.best is not None and self.best[1] == epoch:
            atomic.link_or_copy(last, self.run.best_checkpoint)
        if any(e == epoch for _, e in self.best_k):
            atomic.link_or_copy(last, self.run.epoch_checkpoint(epoch))
        for old in dropped:
            self.run.epoch_checkpoint(old).unlink(missing_ok=True)
