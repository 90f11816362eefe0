"""Reading, validating, correcting and resizing the TIFFs of one site.

A site is a list of channel sources ``(path, index)``: ``index`` is -1 for a single-channel file
(LoadData layout: one file per channel) or the channel's position inside a multi-channel file
(folder layout: multi-page, multi-sample or RGB). Every failure is a :class:`BadImage` whose
message becomes the quarantine reason.
"""

from __future__ import annotations

import os
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import tifffile
from PIL import Image, features

# What tifffile (and the imagecodecs decoders it calls) raise for a corrupt or truncated file:
# TiffFileError is a ValueError, imagecodecs' errors RuntimeErrors; struct, zlib, EOF, index and
# key errors come from damaged headers and tag tables. Anything else is a bug.
TIFF_ERRORS = (ValueError, RuntimeError, OSError, EOFError, IndexError, KeyError,
               struct.error, zlib.error)  # fmt: skip

Source = tuple[str, int]
ACCEPTED_DTYPES = (np.dtype("uint16"), np.dtype("uint8"))
LZW = 5  # the TIFF compression tag's value
_LIBTIFF = bool(features.check_codec("libtiff"))  # Pillow built with libtiff (the wheels are)


class BadImage(Exception):
    """A per-image problem: the site goes to quarantine with this message as the reason."""


@dataclass(frozen=True)
class FileInfo:
    """What the header of one TIFF says: channels, height, width, dtype, and its stat."""

    channels: int
    height: int
    width: int
    dtype: str
    size: int
    mtime_ns: int


def _channel_axis_first(shape: tuple[int, ...], axes: str) -> tuple[int, int, int, int | None]:
    """Map a series shape to (channels, height, width, channel axis) or raise BadImage."""
    keep = [(n, a) for n, a in zip(shape, axes) if n != 1 or a in "YX"]
    dims = dict((a, n) for n, a in keep)
    if len(keep) == 2:
        return 1, dims["Y"], dims["X"], None
    if len(keep) == 3 and "Y" in dims and "X" in dims:
        caxis = next(i for i, (_, a) in enumerate(keep) if a not in "YX")
        return keep[caxis][0], dims["Y"], dims["X"], caxis
    raise BadImage(f"unsupported image shape {shape} (axes {axes})")


def _site_series(tif: tifffile.TiffFile) -> tuple[tuple[int, ...], str, np.dtype, list]:
    """(shape, axes, dtype, series to decode) of the image a file holds.

    One series, usually. A file written a page at a time (one channel per write, or one OME
    Image per channel) is several 2-D series of one shape and type: those are its channels,
    stacked on a leading axis. Series of another shape (a thumbnail) are not channels.
    """
    series = tif.series
    first = series[0]
    shape, dtype = tuple(first.shape), np.dtype(first.dtype)
    same = [s for s in series if tuple(s.shape) == shape and np.dtype(s.dtype) == dtype]
    if len(same) > 1 and len(shape) == 2:
        return (len(same), *shape), "I" + first.axes, dtype, same
    return shape, first.axes, dtype, [first]


def _data_end(pages: list, path: str) -> None:
    """Raise BadImage when a strip or tile of any page lies past the end of its file."""
    for page in pages:
        if page is None:  # an OME page in a file that is not there
            raise BadImage(f"unreadable TIFF {path} (a page of its image is missing)")
        fh = page.parent.filehandle
        end = max((o + c for o, c in zip(page.dataoffsets, page.databytecounts)), default=0)
        if end > fh.size:
            raise BadImage(
                f"truncated TIFF {fh.path} (pixel data ends at {end}, file has {fh.size} bytes)"
            )


def probe_file(path: str) -> FileInfo:
    """Validate a TIFF from its header: readable, sane shape/dtype, pixel data inside the file.

    Checking that every strip/tile lies within the file catches truncation without decoding.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadImage(f"missing file {path}") from None
    except OSError as e:
        raise BadImage(f"cannot stat {path} ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):  # a folder, a FIFO (would block forever), a device
        raise BadImage(f"{path} is not a regular file")
    try:
        with tifffile.TiffFile(path) as tif:
            shape, axes, dtype, series = _site_series(tif)
            _data_end([p for s in series for p in s.pages], path)
    except BadImage:
        raise
    except TIFF_ERRORS as e:  # a corrupt header
        raise BadImage(f"unreadable TIFF {path} ({type(e).__name__}: {e})") from None
    if dtype not in ACCEPTED_DTYPES:
        raise BadImage(f"unsupported dtype {dtype} in {path} (expected uint16 or uint8)")
    try:
        nch, h, w, _ = _channel_axis_first(shape, axes)
    except BadImage as e:
        raise BadImage(f"{path}: {e}") from None
    return FileInfo(nch, h, w, str(dtype), st.st_size, st.st_mtime_ns)


def check_size(path: str, info: FileInfo, max_pixels: int) -> None:
    """Refuse, from the header, a plane too large to decode: a 20000x20000 field compresses to
    ~1 MB but decodes to GBs, and a pool worker killed for memory names no file."""
    if info.height * info.width <= max_pixels:
        return
    itemsize = np.dtype(info.dtype).itemsize
    gb = info.channels * info.height * info.width * itemsize * 3 / 1e9  # + float32 copy to resize
    raise BadImage(
        f"image too large: {path} is {info.width}x{info.height} "
        f"({info.height * info.width:,} pixels a plane, above the limit --max-pixels "
        f"{max_pixels:,}); decoding and resizing it would take at least {gb:.1f} GB"
    )


def probe_site(
    sources: list[Source], names: list[str], max_pixels: int | None = None
) -> dict[str, FileInfo]:
    """Probe every file of a site and check the channels agree on shape and dtype (and that
    no plane has more than ``max_pixels`` pixels)."""
    infos = {p: probe_file(p) for p in dict.fromkeys(p for p, _ in sources)}
    for path, info in infos.items():
        if max_pixels is not None:
            check_size(path, info, max_pixels)
    dims = {}
    for name, (path, idx) in zip(names, sources):
        info = infos[path]
        if idx < 0 and info.channels != 1:
            raise BadImage(f"{path}: expected one channel for {name}, found {info.channels}")
        if idx >= info.channels:
            raise BadImage(f"{path}: has {info.channels} channel(s), {name} is channel {idx + 1}")
        dims[name] = (info.height, info.width, info.dtype)
    if len(set(dims.values())) > 1:
        detail = ", ".join(f"{n} {h}x{w} {d}" for n, (h, w, d) in dims.items())
        raise BadImage(f"channels differ in shape or dtype: {detail}")
    return infos


def _plain_lzw(tif: tifffile.TiffFile, series: list) -> tuple[tuple[int, int], np.dtype] | None:
    """(shape, dtype) of a file of one 2-D plane, one unsigned 8- or 16-bit sample, LZW,
    little-endian (the JUMP and CPJUMP1 images), else None."""
    if len(series) != 1 or len(series[0].pages) != 1 or len(tif.pages) != 1:
        return None
    page = tif.pages.first
    dtype = np.dtype(page.dtype) if page.dtype is not None else None
    if (dtype not in ACCEPTED_DTYPES or page.compression != LZW or tif.byteorder != "<"
            or page.samplesperpixel != 1 or len(page.shape) != 2 or page.fillorder != 1
            or page.bitspersample != 8 * dtype.itemsize or page.predictor not in (1, 2)):  # fmt: skip
        return None
    return tuple(page.shape), dtype


def _pixels(im: Image.Image, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """The decoded image's pixels (read-only), without a copy where Pillow exports them as one
    Arrow array (``np.asarray`` copies them through ``tobytes``: ~20% of the decode)."""
    import pyarrow as pa

    im.load()
    n = shape[0] * shape[1]
    try:
        arr = pa.array(im)
    except (ValueError, TypeError, NotImplementedError, pa.ArrowException):
        arr = None  # a mode or memory layout Pillow does not export
    if arr is not None and len(arr) == n and arr.offset == 0 and arr.null_count == 0:
        data = arr.buffers()[1]
        if data is not None and data.size >= n * dtype.itemsize:
            return np.frombuffer(data, dtype=dtype, count=n).reshape(shape)
    return np.asarray(im)


# Pillow's mode for the plain planes libtiff decodes without tifffile reading the header first.
_PLAIN_MODES = {"I;16": np.dtype("uint16"), "L": np.dtype("uint8")}


def _plain_plane(im: Image.Image) -> tuple[tuple[int, int], np.dtype] | None:
    """What :func:`_plain_lzw` asks of tifffile's header, from the header Pillow already read:
    one page, one sample of an accepted type, little-endian (Pillow's "I;16"), LZW, black is
    zero, no fill order or predictor libtiff would undo differently. None otherwise."""

    def tag(code: int, default: int | None = None) -> object:
        value = im.tag_v2.get(code)  # a tag may be absent, None, or one value in a tuple
        value = default if value is None else value
        return value[0] if isinstance(value, tuple) and len(value) == 1 else value

    dtype = _PLAIN_MODES.get(im.mode)
    if (dtype is None or im.format != "TIFF" or getattr(im, "n_frames", 1) != 1
            or tag(259) != LZW or tag(277, 1) != 1 or tag(262) != 1 or tag(266, 1) != 1
            or tag(317, 1) not in (1, 2) or tag(339, 1) != 1
            or tag(258) != 8 * dtype.itemsize):  # fmt: skip
        return None
    return (im.size[1], im.size[0]), dtype


def _decode_libtiff(path: str,
                    plane: tuple[tuple[int, int], np.dtype] | None = None) -> np.ndarray | None:  # fmt: skip
    """A single plane decoded by libtiff (through Pillow): ~1.6x faster than imagecodecs' LZW,
    the same pixels (tests/test_tiff_formats.py). ``plane``: the (shape, dtype) tifffile read
    from the header; without it, Pillow's own header read decides (:func:`_plain_plane`: one
    header read a file, not two; tifffile's took ~0.6 ms, ~4% of a 1080 px plane's decode).
    None for any other file, a mismatch or any error: then tifffile decodes it, and says why a
    damaged file fails."""
    if not _LIBTIFF:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's decompression-bomb warning: probed
            with Image.open(path) as im:
                plane = plane or _plain_plane(im)
                data = None if plane is None else _pixels(im, *plane)
    except Exception:  # noqa: BLE001  damaged or odd: tifffile's path decides
        return None
    if data is None or plane is None or data.shape != plane[0] or data.dtype != plane[1]:
        return None
    return data


def read_file(path: str) -> np.ndarray:
    """Decode a TIFF into (channels, H, W), whatever its layout (pages, samples, RGB). A plain
    LZW plane is decoded by libtiff (:func:`_decode_libtiff`: from Pillow's header read, or
    from tifffile's when only tifffile finds it plain), anything else by tifffile."""
    data = _decode_libtiff(path)
    if data is not None:
        return data.reshape(1, *data.shape)
    try:
        with tifffile.TiffFile(path) as tif:
            _, axes, _, series = _site_series(tif)
            plain = _plain_lzw(tif, series)
            data = None if plain is None else _decode_libtiff(path, plain)
            if data is None:
                data = (np.stack([s.asarray() for s in series]) if len(series) > 1
                        else series[0].asarray())  # fmt: skip
    except TIFF_ERRORS as e:  # a corrupt or truncated image
        raise BadImage(f"cannot decode {path} ({type(e).__name__}: {e})") from None
    nch, h, w, caxis = _channel_axis_first(tuple(data.shape), axes)
    data = data.squeeze() if data.ndim > 2 else data
    if caxis is None:
        return data.reshape(1, h, w)
    return np.moveaxis(data, caxis, 0).reshape(nch, h, w)


def read_site(sources: list[Source]) -> list[np.ndarray]:
    """Decode a site's channels in the requested order: one (H, W) plane per channel."""
    cache: dict[str, np.ndarray] = {}
    planes = []
    for path, idx in sources:
        if path not in cache:
            cache[path] = read_file(path)
        planes.append(cache[path][max(idx, 0)])
    kinds = {(p.shape, str(p.dtype)) for p in planes}
    if len(kinds) > 1:
        raise BadImage(f"channels differ in shape or dtype after decoding: {sorted(kinds)}")
    return planes


def center_crop(plane: np.ndarray) -> np.ndarray:
    """Crop (..., H, W) to the central square, so resizing never distorts cells."""
    h, w = plane.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return plane[..., top : top + s, left : left + s]


def resize_plane(plane: np.ndarray, size: int) -> np.ndarray:
    """Antialiased resize of one (H, W) plane to (size, size), rounded to uint16.

    Pillow's bilinear filter widens its support when shrinking (a triangle filter over the
    source footprint), so 1080 -> 160 averages instead of aliasing. It runs in float32 ("F"),
    converted inside Pillow from the integer plane: faster than a numpy astype, same result.
    """
    plane = center_crop(plane)
    if plane.dtype != np.float32 and plane.shape == (size, size):
        return plane.astype(np.uint16)
    plane = np.ascontiguousarray(plane)
    pil = (
        Image.fromarray(plane, mode="F")
        if plane.dtype == np.float32
        else Image.fromarray(plane).convert("F")
    )
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.Resampling.BILINEAR)
    return np.clip(np.rint(np.asarray(pil)), 0, 65535).astype(np.uint16)


def resize(planes: np.ndarray | list[np.ndarray], size: int) -> np.ndarray:
    """Center-crop to square and resize every channel: (C, size, size) uint16."""
    return np.stack([resize_plane(p, size) for p in planes])


def apply_illum(planes: list[np.ndarray], illum: list[np.ndarray]) -> list[np.ndarray]:
    """Divide each channel by its illumination function (CellProfiler's "Divide" correction)."""
    out = []
    for plane, fn in zip(planes, illum):
        if fn.shape != plane.shape:
            raise BadImage(f"illumination function shape {fn.shape} != image shape {plane.shape}")
        out.append(plane.astype(np.float32) / np.maximum(fn, 1e-6))
    return out
