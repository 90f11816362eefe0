"""The store: the contract between conversion (writer) and training (reader).

A zarr v3 group::

    store.zarr/
      zarr.json            attrs: cellmorph_format, channels, stats, size, codec, source, created
      images/              (N, C, H, W) uint16, one image per inner chunk, S images per shard
      metadata.parquet     one row per image, row i == images[i]
      quarantine.csv       every rejected input and why (may be empty, always present)

Only this module knows the layout; writers and readers go through it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec

from cellmorph import atomic
from cellmorph.errors import CellmorphError

FORMAT_VERSION = 1
IMAGES = "images"
METADATA = "metadata.parquet"
QUARANTINE = "quarantine.csv"
QUARANTINE_COLUMNS = ["source", "plate", "well", "site", "reason"]

# The metadata schema. Label columns are free-form (Metadata_pert_iname, ...).
PLATE = "Metadata_Plate"
WELL = "Metadata_Well"
SITE = "Metadata_Site"
KEYS = [PLATE, WELL, SITE]  # one image per (plate, well, site)
CHECKSUM = "checksum"  # of the stored uint16 bytes of each image
REQUIRED_COLUMNS = [*KEYS, CHECKSUM]
STORE_ROW = "store_row"  # the row number of an image in outputs (predictions, embeddings)


class StoreError(CellmorphError):
    """A store that cannot be read as a cellmorph store; the message names the path or key."""


def compressor_for(codec: str) -> Any:
    """zstd (CPU decode, best ratio) or LZ4 (decodable on the GPU by DALI's inflate)."""
    if codec == "zstd":
        return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
    if codec == "lz4":
        from zarr.codecs.numcodecs import LZ4

        return LZ4(acceleration=1)
    raise StoreError(f"unknown codec {codec!r} (expected zstd or lz4)")


def create_images(
    path: str | Path,
    n: int,
    channels: list[str],
    size: int,
    codec: str = "zstd",
    shard_size: int = 1024,
    attrs: dict[str, Any] | None = None,
) -> zarr.Array:
    """Create (overwrite) the group and its empty ``images`` array; returns the array.

    ``attrs`` (source description, resize policy...) is stored next to the format fields.
    Channel statistics are added later with :func:`write_attrs` once the pixels are known.
    """
    if n <= 0:
        raise StoreError(f"{path}: cannot create a store with {n} images")
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    shard = max(1, min(shard_size, n))
    arr = group.create_array(
        IMAGES,
        shape=(n, len(channels), size, size),
        chunks=(1, len(channels), size, size),
        shards=(shard, len(channels), size, size),
        dtype="uint16",
        compressors=compressor_for(codec),
        fill_value=0,
    )
    group.attrs.update(
        {
            "cellmorph_format": FORMAT_VERSION,
            "channels": list(channels),
            "size": size,
            "codec": codec,
            "shard_size": shard,
            **(attrs or {}),
        }
    )
    return arr


def write_file(path: str | Path, name: str, write: Any) -> None:
    """Write ``<store>/<name>`` atomically with ``write(target)``: a temporary file + rename
    locally, one fsspec put for URLs (``s3://``...), where a put is already all-or-nothing."""
    if "://" in str(path):
        import io

        import fsspec

        buf = io.BytesIO()
        write(buf)
        with fsspec.open(f"{str(path).rstrip('/')}/{name}", "wb") as f:
            f.write(buf.getvalue())
        return
    atomic.write_with(Path(path) / name, write)


def write_bytes(path: str | Path, name: str, data: bytes) -> None:
    """Write ``<store>/<name>`` (any file the store keeps beside its arrays) atomically."""
    write_file(path, name, lambda f: _put(f, data))


def _put(target: Any, data: bytes) -> None:
    if hasattr(target, "write"):
        target.write(data)
    else:
        Path(target).write_bytes(data)


def discard_shard(path: str | Path, images: zarr.Array, index: int) -> None:
    """Delete shard file ``index`` of ``images`` before it is rewritten whole.

    A writer killed mid-write can leave a torn shard file; zarr reads an existing shard before
    writing into it, so the rewrite would fail on the torn one instead of replacing it.
    """
    import fsspec

    key = images.metadata.encode_chunk_key((index,) + (0,) * (images.ndim - 1))
    fs, root = fsspec.core.url_to_fs(str(path))
    target = f"{root.rstrip('/')}/{IMAGES}/{key}"
    if fs.exists(target):
        fs.rm(target)


def write_attrs(path: str | Path, attrs: dict[str, Any]) -> None:
    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    group.attrs.update(attrs)


def write_metadata(path: str | Path, metadata: pd.DataFrame) -> None:
    """Write ``metadata.parquet`` atomically (row i describes images[i])."""
    missing = [c for c in REQUIRED_COLUMNS if c not in metadata.columns]
    if missing:
        raise StoreError(f"{path}: metadata lacks required column(s) {', '.join(missing)}")
    write_file(path, METADATA, lambda f: metadata.reset_index(drop=True).to_parquet(f, index=False))


def write_quarantine(path: str | Path, rows: list[dict[str, Any]]) -> None:
    df = pd.DataFrame(rows, columns=QUARANTINE_COLUMNS)
    write_file(path, QUARANTINE, lambda f: df.to_csv(f, index=False))


def channel_stats(sample: np.ndarray, channels: list[str]) -> dict[str, dict[str, float]]:
    """Per-channel intensity statistics of a (N, C, H, W) sample, for normalization."""
    out: dict[str, dict[str, float]] = {}
    for c, name in enumerate(channels):
        v = sample[:, c].astype(np.float64).ravel()
        p1, p50, p99 = np.percentile(v, [1, 50, 99])
        out[name] = {
            "mean": float(v.mean()),
            "std": float(max(v.std(), 1e-6)),
            "p1": float(p1),
            "p50": float(p50),
            "p99": float(p99),
            "min": float(v.min()),
            "max": float(v.max()),
        }
    return out


# --------------------------------------------------------------------------- plate statistics
# Per-plate channel statistics (attrs["plate_stats"]), exact over every image: writers sum each
# group of images (a plate's wells, or its negative-control wells) and the sums are pooled.

MOMENTS = ("sum", "sumsq", "log_sum", "log_sumsq")
GROUP_SEP = "\x1f"  # between plate and the negative-control flag in a group key


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


def image_stats(images: np.ndarray, plates: list[str], negcon: list[bool],
                channels: list[str]) -> dict[str, Any]:  # fmt: skip
    """``stats`` and ``plate_stats`` attrs for a set of images held in memory (tests, small
    writers): the same numbers a conversion computes shard by shard."""
    sums = sums_by_group(images, [group_key(p, n) for p, n in zip(plates, negcon)])
    per_plate = plate_stats_from_sums([sums], channels, images.shape[-1] * images.shape[-2])
    stats = channel_stats(images, channels)
    for name, exact in pooled_stats(per_plate, channels).items():
        stats[name].update(exact)
    return {"stats": stats, "plate_stats": per_plate}


@dataclass(frozen=True)
class Store:
    """A read-only view of a finished store."""

    path: Path
    images: zarr.Array
    metadata: pd.DataFrame
    attrs: dict[str, Any]
    quarantine: pd.DataFrame = field(repr=False)

    @property
    def channels(self) -> list[str]:
        return list(self.attrs["channels"])

    @property
    def stats(self) -> dict[str, dict[str, float]]:
        return dict(self.attrs.get("stats", {}))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def open_store(path: str | Path) -> Store:
    """Open a finished store for reading, checking the format version and row alignment."""
    p = Path(path)
    if not (p / "zarr.json").is_file():
        raise StoreError(f"{p}: not a zarr store (no zarr.json)")
    try:
        group = zarr.open_group(str(p), mode="r", zarr_format=3)
    except Exception as e:  # zarr raises several types for unreadable groups
        raise StoreError(f"{p}: cannot open zarr group ({e})") from None
    attrs = dict(group.attrs)
    version = attrs.get("cellmorph_format")
    if version != FORMAT_VERSION:
        raise StoreError(
            f"{p}: attrs.cellmorph_format is {version!r}, this cellmorph reads {FORMAT_VERSION}"
        )
    if attrs.get("complete") is False:
        raise StoreError(f"{p}: conversion has not finished (rerun the same convert command)")
    if IMAGES not in group:
        raise StoreError(f"{p}: no '{IMAGES}' array")
    images = group[IMAGES]
    meta_path = p / METADATA
    if not meta_path.is_file():
        raise StoreError(f"{p}: missing {METADATA}")
    metadata = pd.read_parquet(meta_path)
    if len(metadata) != images.shape[0]:
        raise StoreError(
            f"{p}: {METADATA} has {len(metadata)} rows but images has {images.shape[0]}"
        )
    q_path = p / QUARANTINE
    quarantine = (
        pd.read_csv(q_path) if q_path.is_file() else pd.DataFrame(columns=QUARANTINE_COLUMNS)
    )
    return Store(path=p, images=images, metadata=metadata, attrs=attrs, quarantine=quarantine)


def well_ids(metadata: pd.DataFrame) -> np.ndarray:
    """One string per image naming its well (``plate/well``)."""
    missing = [c for c in (PLATE, WELL) if c not in metadata.columns]
    if missing:
        raise StoreError(f"metadata lacks column(s) {missing} that name an image's well")
    plate = metadata[PLATE].astype(str).to_numpy().astype(str)
    well = metadata[WELL].astype(str).to_numpy().astype(str)
    return np.char.add(np.char.add(plate, "/"), well)


def describe(store: Store, label_column: str | None = None) -> dict[str, Any]:
    """Summary for ``cellmorph inspect``: counts of images, plates, wells, classes, quarantine."""
    md = store.metadata
    info: dict[str, Any] = {
        "path": str(store.path),
        "format": store.attrs.get("cellmorph_format"),
        "images": len(store),
        "shape": list(store.shape),
        "channels": store.channels,
        "codec": store.attrs.get("codec"),
        "plates": int(md[PLATE].nunique()),
        "wells": int(md.groupby([PLATE, WELL]).ngroups),
        "quarantined": len(store.quarantine),
    }
    if label_column and label_column in md.columns:
        counts = md[label_column].value_counts()
        info["label_column"] = label_column
        info["classes"] = int(counts.size)
        info["class_counts"] = {str(k): int(v) for k, v in counts.items()}
    return info


def dumps(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2)
