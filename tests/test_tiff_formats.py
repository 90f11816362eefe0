"""Every TIFF that tifffile reads (with imagecodecs) converts to the same stored pixels.

Each format is written here with tifffile from the same pixels: compressed (LZW, Deflate, Zstd,
PackBits, with the horizontal predictor), tiled, BigTIFF, OME-TIFF, and one multi-channel file
per site written in every way a microscope or a script does (one write, a page at a time, one
OME Image per channel, ImageJ). The stores must equal the store of uncompressed files, and the
pixels tifffile decodes. Then the bounds: a plane too large to decode, a pool worker that dies,
and sites that all (or mostly) fail to decode.
"""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from helpers import CHANNELS, FILE_ORDER

from cellmorph.config import ConvertConfig
from cellmorph.errors import CellmorphError
from cellmorph.store import open_store
from conversion.__main__ import main as convert_main
from conversion.pack import ProcessMapper, ShardTask, convert, describe_task

SIZE = 64
SITES = 3
Writer = Callable[[Path, np.ndarray], None]


def pixels(sid: int, ch: str) -> np.ndarray:
    """A site's channel: smooth cells plus noise (LZW and the predictor see real structure)."""
    rng = np.random.default_rng([sid, FILE_ORDER.index(ch)])
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cells = 3000 * (np.sin(xx / (3 + sid)) * np.cos(yy / (4 + FILE_ORDER.index(ch))) + 1)
    return (cells + 500 * sid + rng.integers(0, 200, (SIZE, SIZE))).astype(np.uint16)


def expected(channels: list[str] = CHANNELS) -> np.ndarray:
    return np.stack([np.stack([pixels(s, ch) for ch in channels]) for s in range(SITES)])


def plain(path: Path, data: np.ndarray) -> None:
    tifffile.imwrite(path, data, photometric="minisblack", metadata=None)


SINGLE: dict[str, Writer] = {
    "lzw": lambda p, d: tifffile.imwrite(p, d, compression="lzw"),
    "lzw-predictor": lambda p, d: tifffile.imwrite(p, d, compression="lzw", predictor=True),
    "deflate-predictor": lambda p, d: tifffile.imwrite(p, d, compression="zlib", predictor=True),
    "zstd-predictor": lambda p, d: tifffile.imwrite(p, d, compression="zstd", predictor=True),
    "packbits": lambda p, d: tifffile.imwrite(p, d, compression="packbits"),
    "tiled-deflate": lambda p, d: tifffile.imwrite(p, d, tile=(32, 32), compression="zlib"),
    "bigtiff-lzw": lambda p, d: tifffile.imwrite(p, d, bigtiff=True, compression="lzw"),
    "ome-zstd": lambda p, d: tifffile.imwrite(p, d, ome=True, compression="zstd"),
}


def write_loaddata(root: Path, writer: Writer, suffix: str = ".tiff") -> Path:
    """One file per (site, channel), CPJUMP1 file order, and the LoadData CSV naming them."""
    (root / "images").mkdir(parents=True)
    rows = []
    for sid in range(SITES):
        row = {"Metadata_Plate": "P1", "Metadata_Well": f"A{sid + 1:02d}", "Metadata_Site": 1}
        for k, ch in enumerate(FILE_ORDER):
            name = f"r01c{sid + 1:02d}f01p01-ch{k + 1}sk1fk1fl1{suffix}"
            writer(root / "images" / name, pixels(sid, ch))
            row |= {f"FileName_Orig{ch}": name, f"PathName_Orig{ch}": "images"}
        rows.append({**row, "Metadata_pert_iname": f"drug{sid}"})
    pd.DataFrame(rows).to_csv(root / "ld.csv", index=False)
    return root / "ld.csv"


def stored(cfg: ConvertConfig, out: Path) -> np.ndarray:
    summary = convert(cfg, out)
    assert summary["quarantined"] == 0, summary["quarantine_reasons"]
    return open_store(out).images[:]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """The stores of uncompressed files, one per layout; both equal the pixels written."""
    root = tmp_path_factory.mktemp("plain")
    ld = stored(ConvertConfig(load_data=str(write_loaddata(root, plain)), size=SIZE, workers=1),
                root / "ld.zarr")  # fmt: skip
    folder = stored(folder_cfg(write_folder(root, stack_writer("one-write"))), root / "f.zarr")
    assert np.array_equal(ld, expected()) and np.array_equal(folder, expected())
    return {"loaddata": ld, "folder": folder}


@pytest.mark.parametrize("fmt", list(SINGLE))
def test_single_channel_formats_store_the_same_pixels(tmp_path: Path, baseline, fmt: str) -> None:
    suffix = ".ome.tiff" if fmt.startswith("ome") else ".tiff"
    csv = write_loaddata(tmp_path, SINGLE[fmt], suffix)
    images = stored(ConvertConfig(load_data=str(csv), size=SIZE, workers=1), tmp_path / "s.zarr")
    assert np.array_equal(images, baseline["loaddata"])


LIBTIFF_CASES = {  # plain LZW planes: libtiff decodes them (conversion.tiffs._decode_libtiff)
    "strips": {}, "predictor": {"predictor": True}, "tiles": {"tile": (32, 32)},
    "uint8": {"dtype": np.uint8}, "bigtiff": {"bigtiff": True}, "one-row-strips": {"rowsperstrip": 1},
}  # fmt: skip


@pytest.mark.parametrize("case", list(LIBTIFF_CASES))
def test_plain_lzw_planes_are_decoded_by_libtiff_as_tifffile_does(tmp_path: Path, monkeypatch,
                                                                   case: str) -> None:  # fmt: skip
    """A single-plane LZW file is decoded through Pillow's libtiff (faster than imagecodecs):
    the same pixels tifffile decodes, also on the real JUMP site. Other files and damaged
    pixel data go to tifffile, so a damaged file fails with tifffile's reason."""
    from conversion import tiffs

    used: list[str] = []  # the files whose pixels came from Pillow's libtiff decoder
    pixels_of = tiffs._pixels
    monkeypatch.setattr(
        tiffs, "_pixels", lambda im, *a: used.append(im.filename) or pixels_of(im, *a)
    )
    kw = dict(LIBTIFF_CASES[case])
    data = pixels(1, "DNA").astype(kw.pop("dtype", np.uint16))
    path = tmp_path / "x.tiff"
    tifffile.imwrite(path, data, compression="lzw", photometric="minisblack", **kw)
    got = tiffs.read_file(str(path))
    gc.collect()  # the plane may be Pillow's own memory (no copy): it outlives the image
    _ = [np.full(data.shape, 7, data.dtype) for _ in range(8)]
    assert used == [str(path)] and got.dtype == data.dtype
    assert np.array_equal(got, data[None]) and np.array_equal(got[0], tifffile.imread(path))
    if case == "strips":
        real = next((Path(__file__).parent / "data" / "cpg0000_BR00116991_A01_f01").glob("*.tiff"))
        assert np.array_equal(tiffs.read_file(str(real))[0], tifffile.imread(real))
        raw = bytearray(path.read_bytes())
        with tifffile.TiffFile(path) as tif:
            start = tif.pages.first.dataoffsets[0]
        raw[start : start + 64] = b"\xff" * 64  # damaged LZW codes, the file's size unchanged
        path.write_bytes(bytes(raw))
        assert tiffs._decode_libtiff(str(path), (data.shape, data.dtype)) is None
        assert tiffs._decode_libtiff(str(path)) is None
        with pytest.raises(tiffs.BadImage, match=r"cannot decode .*x.tiff \(ImcdError"):
            tiffs.read_file(str(path))
    # zlib, and big-endian 16-bit LZW, go to tifffile (big-endian bytes are the same for uint8)
    for other in ({"compression": "zlib"}, {"compression": "lzw", "byteorder": ">"}):
        tifffile.imwrite(path, data, photometric="minisblack", **other)
        used.clear()
        libtiff = other["compression"] == "lzw" and data.itemsize == 1
        assert np.array_equal(tiffs.read_file(str(path))[0], data)
        assert used == ([str(path)] if libtiff else [])


# ------------------------------------------------------------- one multi-channel file per site


def _pages(stack: np.ndarray, path: Path, **kw) -> None:
    with tifffile.TiffWriter(path, ome=kw.pop("ome", None)) as tif:
        for plane in stack:
            tif.write(plane, photometric="minisblack", **kw)


def stack_writer(kind: str) -> Writer:
    """Ways of writing (C, H, W) channels into one file."""
    return {
        "one-write": lambda p, d: plain(p, d),
        "one-write-lzw-predictor": lambda p, d: tifffile.imwrite(
            p, d, photometric="minisblack", compression="lzw", predictor=True
        ),
        "tiled-bigtiff-zstd": lambda p, d: tifffile.imwrite(
            p, d, photometric="minisblack", bigtiff=True, tile=(32, 32), compression="zstd"
        ),
        "page-per-write-deflate": lambda p, d: _pages(d, p, compression="zlib", predictor=True),
        "page-per-write-mixed-codecs": _mixed,
        "ome-cyx": lambda p, d: tifffile.imwrite(
            p, d, ome=True, metadata={"axes": "CYX"}, compression="zlib"
        ),
        "ome-tczyx": lambda p, d: tifffile.imwrite(
            p, d[None, :, None], ome=True, metadata={"axes": "TCZYX"}, compression="lzw"
        ),
        "ome-image-per-channel": lambda p, d: _pages(d, p, ome=True, compression="zstd"),
        "imagej": lambda p, d: tifffile.imwrite(p, d, imagej=True, metadata={"axes": "CYX"}),
        "planar-samples": lambda p, d: tifffile.imwrite(
            p, d, photometric="minisblack", planarconfig="separate", compression="packbits"
        ),
    }[kind]


def _mixed(path: Path, stack: np.ndarray) -> None:
    """Each page with its own codec (tifffile then sees one series per page)."""
    codecs = ["lzw", "zlib", "zstd", "packbits", None]
    with tifffile.TiffWriter(path) as tif:
        for plane, codec in zip(stack, codecs):
            tif.write(plane, photometric="minisblack", compression=codec, metadata=None)


def write_folder(root: Path, writer: Writer) -> tuple[Path, Path]:
    folder = root / "folder"
    folder.mkdir(parents=True)
    rows = []
    for sid in range(SITES):
        writer(folder / f"exp_IMG{sid:03d}.tif", np.stack([pixels(sid, ch) for ch in FILE_ORDER]))
        rows.append({"image_id": f"img{sid:03d}", "Metadata_Plate": "P1",
                     "Metadata_Well": f"A{sid + 1:02d}", "Metadata_pert_iname": f"d{sid}"})  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "meta.csv", index=False)
    return folder, root / "meta.csv"


def folder_cfg(paths: tuple[Path, Path], **kw) -> ConvertConfig:
    return ConvertConfig(images=str(paths[0]), metadata=str(paths[1]), id_pattern=r"_(IMG\d+)",
                         id_column="image_id", file_channels=FILE_ORDER, size=SIZE, workers=1,
                         **kw)  # fmt: skip


@pytest.mark.parametrize(
    "kind",
    ["one-write-lzw-predictor", "tiled-bigtiff-zstd", "page-per-write-deflate",
     "page-per-write-mixed-codecs", "ome-cyx", "ome-tczyx", "ome-image-per-channel", "imagej",
     "planar-samples"],
)  # fmt: skip
def test_multi_channel_files_store_the_same_pixels(tmp_path: Path, baseline, kind: str) -> None:
    images = stored(folder_cfg(write_folder(tmp_path, stack_writer(kind))), tmp_path / "s.zarr")
    assert np.array_equal(images, baseline["folder"])


# ------------------------------------------------------------------ headers that must not pass


def test_truncated_tile_and_truncated_later_page_are_quarantined(tmp_path: Path) -> None:
    """The truncation check covers every tile, and every page of a page-per-channel file."""
    csv = write_loaddata(tmp_path, SINGLE["tiled-deflate"])
    tile = tmp_path / "images" / pd.read_csv(csv).at[1, "FileName_OrigER"]
    tile.write_bytes(tile.read_bytes()[:-40])  # the last tile ends past the end of the file
    summary = convert(ConvertConfig(load_data=str(csv), size=SIZE, workers=1), tmp_path / "a.zarr")
    assert summary["images"] == SITES - 1
    assert [r["reason"] for r in summary["quarantine_reasons"]] == ["truncated TIFF"]

    paths = write_folder(tmp_path / "f", stack_writer("page-per-write-deflate"))
    last = sorted(paths[0].iterdir())[0]
    with tifffile.TiffFile(last) as tif:  # the last channel's page, in the file's last bytes
        end = tif.pages[-1].dataoffsets[0] + 8
    last.write_bytes(last.read_bytes()[:end])
    summary = convert(folder_cfg(paths), tmp_path / "b.zarr")
    assert summary["images"] == SITES - 1
    assert [r["reason"] for r in summary["quarantine_reasons"]] == ["truncated TIFF"]


def huge_tiff(path: Path, side: int = 20000) -> None:
    """A real side x side uint16 TIFF of zeros, Deflate-compressed in tiles: about 1 MB on disk,
    written a tile at a time (the 800 MB plane is never in memory)."""
    per_side = -(-side // 1024)
    tiles = (np.zeros((1024, 1024), np.uint16) for _ in range(per_side * per_side))
    tifffile.imwrite(path, tiles, shape=(side, side), dtype=np.uint16, tile=(1024, 1024),
                     compression="zlib", metadata=None)  # fmt: skip


def test_a_plane_larger_than_max_pixels_is_quarantined_from_its_header(tmp_path: Path) -> None:
    csv = write_loaddata(tmp_path, plain)
    big = tmp_path / "images" / pd.read_csv(csv).at[0, "FileName_OrigRNA"]
    huge_tiff(big)
    assert big.stat().st_size < 2_000_000
    summary = convert(ConvertConfig(load_data=str(csv), size=SIZE, workers=1), tmp_path / "s.zarr")
    assert summary["images"] == SITES - 1 and summary["quarantined"] == 1
    (reason,) = open_store(tmp_path / "s.zarr").quarantine.reason
    assert reason.startswith(f"image too large: {big} is 20000x20000 (400,000,000 pixels")
    assert "--max-pixels 16,777,216" in reason
    assert summary["quarantine_reasons"] == [
        {"reason": "image larger than --max-pixels 16,777,216", "count": 1,
         "fix": "--max-pixels, if the machine has the memory"}
    ]  # fmt: skip


def test_max_pixels_option_reaches_the_probe(tmp_path: Path, capsys) -> None:
    """--max-pixels below the fields' 64 x 64 = 4096 pixels: every site is refused, and the stop
    names the reason, the fix and where the reasons are."""
    csv = write_loaddata(tmp_path, plain)
    out = tmp_path / "s.zarr"
    args = ["convert", "--load-data", str(csv), "--out", str(out), "--size", str(SIZE)]
    assert convert_main([*args, "--workers", "1", "--max-pixels", "4095"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err == (
        f"error: no valid sites: all {SITES} inputs were quarantined for the same reason: image "
        "larger than --max-pixels 4,095; fix: --max-pixels, if the machine has the memory "
        f"(reasons per input in {out}/quarantine.csv)"
    )
    assert len(pd.read_csv(out / "quarantine.csv")) == SITES
    assert convert_main([*args, "--workers", "1", "--max-pixels", "4096", "--overwrite"]) == 0


# ------------------------------------------------------------ a dead worker, sites that fail


def _killed_on_shard_2(task: ShardTask) -> int:
    """What the kernel's out-of-memory killer does to a pool worker, on shard 2 only."""
    if task.index == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return task.index


def test_a_worker_killed_mid_shard_stops_naming_the_shard_and_its_files(tmp_path: Path) -> None:
    """Shards 0 and 1 finish, the worker dies on 2, 3 waits: the stop names shard 2 and its
    files, not the finished shards."""
    files = [str(tmp_path / f"site{i}_DNA.tiff") for i in range(3)]
    tasks = [
        ShardTask(out=str(tmp_path / "s.zarr"), index=i, start=1024 * i, key="k", size=160,
                  sites=[([(f, -1)], []) for f in files], groups=["P1"] * 3)
        for i in range(4)
    ]  # fmt: skip
    mapper = ProcessMapper(1)
    try:
        with pytest.raises(CellmorphError) as err:
            list(mapper(_killed_on_shard_2, tasks))
    finally:
        mapper.close()
    msg = str(err.value)
    held = f"shard 2 (rows 2048-2050, 3 site(s): {files[0]} .. {files[2]})"
    assert f"while the workers held: {held} (1 more task(s) were waiting)" in msg
    assert "shard 0" not in msg and "shard 1 " not in msg
    assert "most likely for memory" in msg and "--max-pixels" in msg and "--workers" in msg
    probe = [(0, [(files[0], -1)], ["DNA"], None, 160, 1), (1, [(files[2], -1)], ["DNA"], None, 160, 1)]  # fmt: skip
    assert describe_task(probe) == f"header checks of 2 site(s) ({files[0]} .. {files[2]})"


def corrupt_pixels(path: Path) -> None:
    """Keep the header, zero the compressed pixels: only decoding finds it (while packing)."""
    tifffile.imwrite(path, tifffile.imread(path), compression="zlib")
    with tifffile.TiffFile(path) as t:
        off, n = t.pages[0].dataoffsets[0], t.pages[0].databytecounts[0]
    raw = bytearray(path.read_bytes())
    raw[off + 2 : off + n - 2] = bytes(n - 4)
    path.write_bytes(bytes(raw))


def bad_decode(root: Path, sites: int) -> list[str]:
    """A LoadData input whose first ``sites`` sites fail to decode; the convert arguments."""
    csv = write_loaddata(root, plain)
    for name in pd.read_csv(csv)["FileName_OrigDNA"][:sites]:
        corrupt_pixels(root / "images" / name)
    return ["convert", "--load-data", str(csv), "--out", str(root / "s.zarr"),
            "--size", str(SIZE), "--workers", "1"]  # fmt: skip


def test_every_site_failing_to_decode_stops_with_reasons_and_quarantine_csv(
    tmp_path: Path, capsys
) -> None:
    args = bad_decode(tmp_path, SITES)
    for _ in range(2):  # the rerun resumes the unfinished store and stops the same way
        assert convert_main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == (
            f"error: no valid sites: all {SITES} inputs were quarantined for the same reason: "
            f"pixels fail to decode (reasons per input in {tmp_path}/s.zarr/quarantine.csv)"
        )
        q = pd.read_csv(tmp_path / "s.zarr" / "quarantine.csv")
        assert len(q) == SITES and q.reason.str.startswith("cannot decode ").all()
        assert sorted(q.well) == [f"A{s + 1:02d}" for s in range(SITES)]


@pytest.mark.parametrize(("bad", "warned"), [(2, True), (1, False)])
def test_summary_warns_when_half_or_more_sites_were_quarantined(
    tmp_path: Path, capsys, bad: int, warned: bool
) -> None:
    assert convert_main(bad_decode(tmp_path, bad)) == 0
    out = capsys.readouterr().out
    assert open_store(tmp_path / "s.zarr").images.shape[0] == SITES - bad
    warning = (
        f"warning: {bad} of {SITES} sites ({100 * bad / SITES:.0f}%) were quarantined: most of "
        "the input is missing from the store; check the reasons below (every site's in "
        f"{tmp_path}/s.zarr/quarantine.csv) before training"
    )
    assert (warning in out.splitlines()) is warned, out
    assert f"  {bad}  pixels fail to decode" in out
