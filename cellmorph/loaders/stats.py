"""Channel statistics: what conversion sums while it writes, and what normalization reads.

Per-plate statistics (``attrs["plate_stats"]``) are exact over every image: each shard writer
sums its images per group (a plate's wells, or its negative-control wells), in the linear and
the ``log1p`` space, and the sums are pooled into means and standard deviations.
:mod:`cellmorph.loaders.normalize` turns them into the numbers both loaders apply. Pure numpy:
the writer side imports this module without the loaders' torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MOMENTS = ("sum", "sumsq", "log_sum", "log_sumsq")
GROUP_SEP = "\x1f"  # between plate and the negative-control flag in a group key


def channel_stats(sample: np.ndarray, channels: list[str]) -> dict[str, dict[str, float]]:
    """Per-channel intensity statistics of a (N, C, H, W) sample, for normalization."""
    out: dict[str, dict[str, float]] = {}
    for c, name in enumerate(channels):
        v = sample[:, c].astype(np.float64).ravel()
        p1, p50, p99 = np.percentile(v, [1, 50, 99])
        out[name] = {
            "mean": float(v.mean()), "std": float(max(v.std(), 1e-6)), "p1": float(p1),
            "p50": float(p50), "p99": float(p99), "min": float(v.min()), "max": float(v.max()),
        }  # fmt: skip
    return out


def group_key(plate: str, negcon: bool) -> str:
    return f"{plate}{GROUP_SEP}{int(negcon)}"


def sums_by_group(block: np.ndarray, groups: list[str]) -> dict[str, dict[str, Any]]:
    """Per group key (``plate<GROUP_SEP>0|1``, 1 = negative control): image count and the
    per-channel sums of ``block`` ((N, C, H, W) uint16), linear and ``log1p``."""
    x = block.astype(np.float64)
    logx = np.log1p(x)
    per_image = {
        "sum": x.sum(axis=(2, 3)),
        "sumsq": np.square(x).sum(axis=(2, 3)),
        "log_sum": logx.sum(axis=(2, 3)),
        "log_sumsq": np.square(logx).sum(axis=(2, 3)),
    }
    out: dict[str, dict[str, Any]] = {}
    keys = np.asarray(groups)
    for key in dict.fromkeys(groups):
        sel = keys == key
        out[key] = {
            "n": int(sel.sum()),
            **{m: per_image[m][sel].sum(axis=0).tolist() for m in MOMENTS},
        }
    return out


def _stats(total: dict[str, np.ndarray], n_images: int, pixels: int, channels: list[str]) -> dict:
    n = n_images * pixels
    out = {}
    for c, name in enumerate(channels):
        mean = total["sum"][c] / n
        log_mean = total["log_sum"][c] / n
        out[name] = {
            "mean": float(mean),
            "std": float(max(np.sqrt(max(total["sumsq"][c] / n - mean**2, 0.0)), 1e-6)),
            "log_mean": float(log_mean),
            "log_std": float(max(np.sqrt(max(total["log_sumsq"][c] / n - log_mean**2, 0.0)), 1e-6)),
            "images": n_images,
        }
    return out


def plate_stats_from_sums(records: list[dict[str, dict[str, Any]]], channels: list[str],
                pixels: int) -> dict[str, dict[str, Any]]:  # fmt: skip
    """``{plate: {"all": stats, "negcon": stats or None}}`` from the shards' sums."""
    acc: dict[tuple[str, str], tuple[int, dict[str, np.ndarray]]] = {}
    for record in records:
        for key, s in record.items():
            plate, _, flag = key.partition(GROUP_SEP)
            for scope in ("all", "negcon") if flag == "1" else ("all",):
                n, sums = acc.get(
                    (plate, scope), (0, {m: np.zeros(len(channels)) for m in MOMENTS})
                )
                acc[(plate, scope)] = (n + s["n"], {m: sums[m] + np.asarray(s[m]) for m in MOMENTS})
    plates = sorted({p for p, _ in acc})
    return {
        p: {
            scope: _stats(acc[(p, scope)][1], acc[(p, scope)][0], pixels, channels)
            if (p, scope) in acc
            else None
            for scope in ("all", "negcon")
        }
        for p in plates
    }


def pooled_stats(
    table: dict[str, dict[str, Any]], channels: list[str]
) -> dict[str, dict[str, float]]:
    """Store-wide mean and std (both spaces) pooled from the plates' ``all`` statistics."""
    out = {}
    for name in channels:
        parts = [(t["all"][name], t["all"][name]["images"]) for t in table.values()]
        n = sum(w for _, w in parts)
        entry = {}
        for m, s in (("mean", "std"), ("log_mean", "log_std")):
            mean = sum(p[m] * w for p, w in parts) / n
            second = sum((p[s] ** 2 + p[m] ** 2) * w for p, w in parts) / n
            entry[m], entry[s] = float(mean), float(max(np.sqrt(max(second - mean**2, 0.0)), 1e-6))
        out[name] = entry
    return out


def store_stats(sums: list[dict[str, Any]], sample: np.ndarray, channels: list[str],
                pixels: int) -> dict[str, Any]:  # fmt: skip
    """``stats`` (exact mean and std over every image from the shards' ``sums``, percentiles
    from ``sample``) and ``plate_stats``: the attrs a store's writer records."""
    per_plate = plate_stats_from_sums(sums, channels, pixels)
    stats = channel_stats(sample, channels)
    for name, exact in pooled_stats(per_plate, channels).items():
        stats[name].update(exact)
    return {"stats": stats, "plate_stats": per_plate}
