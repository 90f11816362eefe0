"""``cellmorph inspect [--verify]``: what a store holds, and every image against its checksums."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from cellmorph.shardfile import (
    DECODE_ERRORS,
    EMPTY,
    StoreDamage,
    chunk_payload,
    index_range,
    layout_of,
    parse_index,
    shard_key,
)
from cellmorph.store.layout import (
    CHECKSUM,
    METADATA,
    PLATE,
    SITE,
    WELL,
    StoreError,
    image_checksum,
    well_ids,
)
from cellmorph.store.read import Store


def verify_store(store: Store, progress: bool = True) -> list[str]:
    """Check every image against what the store recorded for it: the shard's index, the chunk's
    crc32c, that the chunk is this row's (its crc equals ``chunk_crc32c``), that it decodes,
    and that the decoded pixels match ``checksum``. One line per damaged image; [] when sound.
    """
    import numcodecs
    from tqdm import tqdm

    layout = layout_of(store.images)
    if layout is None or not layout.chunk_crc or store.folder is None:
        raise StoreError(f"{store.path}: images are not laid out as cellmorph format 2 writes them")
    codec = numcodecs.get_codec(dict(layout.codec))
    n, per = len(store), layout.shard_rows
    problems: list[str] = []
    names = well_ids(store.metadata)
    site = store.metadata[SITE].astype(str).to_numpy()
    recorded = (store.chunk_crcs(), store.metadata[CHECKSUM].astype(str).to_numpy())
    bar = tqdm(range(-(-n // per)), unit="shard", desc="verify", leave=False,
               disable=None if progress else True)  # fmt: skip
    for shard in bar:
        rows = range(shard * per, min(n, (shard + 1) * per))
        for row, reason in _verify_shard(store, layout, codec, shard, rows, recorded):
            problems.append(f"row {row} ({names[row]}/{site[row]}): {reason}")
    return problems


def _verify_shard(store: Store, layout: Any, codec: Any, shard: int, rows: range,
                  recorded: tuple[np.ndarray, np.ndarray]) -> list[tuple[int, str]]:  # fmt: skip
    key = shard_key(store.images, shard)
    try:
        data = store.folder.read(key)  # type: ignore[union-attr]
        start, nbytes = index_range(layout, len(data))
        index = parse_index(data[start : start + nbytes], layout, len(data), key)
    except StoreDamage as e:
        return [(r, str(e).removeprefix(f"{store.path}: ")) for r in rows]
    (expected, sums), view, out = recorded, memoryview(data), []
    for r in rows:
        off, size = index[r - rows.start]
        where = f"{key} chunk {r - rows.start}"
        if off == EMPTY:
            out.append((r, f"{where} was never written (missing chunk)"))
            continue
        try:
            chunk = view[int(off) : int(off) + int(size)]
            payload = chunk_payload(chunk, layout, int(expected[r]), where)
            pixels = np.frombuffer(codec.decode(payload), dtype="<u2")
        except StoreDamage as e:
            out.append((r, str(e)))
            continue
        except DECODE_ERRORS as e:  # a decoder's own error: the bytes are not a valid frame
            out.append((r, f"{where} does not decode ({e})"))
            continue
        if pixels.size != int(np.prod(layout.chunk_shape)):
            out.append((r, f"{where} decodes to {pixels.size} values, not {layout.chunk_shape}"))
        elif image_checksum(pixels) != sums[r]:
            out.append((r, f"{where}: pixels differ from the image checksum in {METADATA}"))
    return out


def describe(store: Store, label_column: str | None = None) -> dict[str, Any]:
    """Summary for ``cellmorph inspect``: counts of images, plates, wells, classes, quarantine."""
    md = store.metadata
    info: dict[str, Any] = {
        "path": str(store.path),
        "format": store.attrs.get("cellmorph_format"),
        "images": len(store),
        "unit": store.unit,  # "cell": one row per nucleus (attrs.crop says how)
        "shape": list(store.shape),
        "channels": store.channels,
        "codec": store.attrs.get("codec"),
        "plates": int(md[PLATE].nunique()),
        "wells": int(md.groupby([PLATE, WELL]).ngroups),
        "quarantined": len(store.quarantine),
    }
    if store.unit == "cell":
        info["crop"] = store.attrs.get("crop")
        info["sites_without_cells"] = store.attrs.get("sites_without_cells")
    if label_column and label_column in md.columns:
        counts = md[label_column].value_counts()
        info["label_column"] = label_column
        info["classes"] = int(counts.size)
        info["class_counts"] = {str(k): int(v) for k, v in counts.items()}
    return info


def dumps(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2)
