"""The thumbnail-scale cells of :mod:`cellmorph.synth` (the demo's plates): geometry scales
with the image (``size / 96``), so a 1080 px site shows the same cells, only larger. Also the
camera (shot and read noise, offset) and the vignette that real-scale fields share.

Every line here is frozen by ``tests/test_synth_scale.py``: the demo's plates must stay
byte-identical, so a change to the pixels drawn here needs a new ``GENERATOR_VERSION``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cellmorph.synth_real import CHANNELS

if TYPE_CHECKING:  # only for hints: synth imports this module
    from cellmorph.synth import Nuisance, Treatment

# Geometry at the reference size of 96 px; everything scales with size / 96 so that a
# 1080 px site shows the same cells at the pilot's resolution.
REF_SIZE = 96
NUCLEUS_RADIUS = 4.0
CELL_TO_NUCLEUS = 2.2
MITO_PER_CELL = 22.0
# Mean photon counts per channel before gains; camera offset and read noise in ADU.
BRIGHTNESS = {"DNA": 2500.0, "ER": 900.0, "RNA": 700.0, "AGP": 800.0, "Mito": 1800.0}
BACKGROUND = np.array([60.0, 80.0, 70.0, 90.0, 50.0], dtype=np.float32)  # autofluorescence
CAMERA_OFFSET = 100.0
READ_NOISE = 4.0


@dataclass(frozen=True)
class Cell:
    """One cell's geometry (pixels) and brightness; drawn once, then painted on all channels."""

    y: float
    x: float
    nucleus_a: float  # semi-axes of the nucleus ellipse
    nucleus_b: float
    angle: float
    offset_y: float  # nucleus centre relative to the cell centre
    offset_x: float
    radius: float  # mean cell radius; the outline wobbles around it
    wobble: np.ndarray  # (3, 2): amplitude and phase of harmonics 2, 3, 4
    brightness: np.ndarray  # per channel, photon scale of this cell
    puncta: int
    mito_intensity: float
    actin_ring: float
    actin_texture: float
    er_texture: float


# ---------------------------------------------------------------------------------------------
# Cells


def _effect(value: float, neutral: float, responds: bool) -> float:
    return value if responds else neutral


def _draw_cell(rng: np.random.Generator, y: float, x: float, scale: float, t: Treatment) -> Cell:
    """Shape and brightness of one cell; responding cells carry the treatment's effects."""
    on = bool(rng.random() < t.responders)
    r_n = NUCLEUS_RADIUS * scale * _effect(t.nucleus_scale, 1.0, on) * rng.lognormal(0.0, 0.12)
    aspect = 1.0 + abs(rng.normal(0.0, 0.12)) + _effect(t.nucleus_elongation, 0.0, on)
    a, b = r_n * math.sqrt(aspect), r_n / math.sqrt(aspect)
    radius = CELL_TO_NUCLEUS * NUCLEUS_RADIUS * scale * rng.lognormal(0.0, 0.10)
    radius = max(radius * _effect(t.cell_scale, 1.0, on), 1.35 * a)
    shift, direction = rng.uniform(0.0, 0.25) * (radius - a), rng.uniform(0.0, 2 * math.pi)
    wobble = np.stack([rng.normal(0.0, 0.06, 3), rng.uniform(0.0, 2 * math.pi, 3)], axis=1)
    brightness = np.array([BRIGHTNESS[c] for c in CHANNELS]) * rng.lognormal(0.0, 0.15, 5)
    brightness[CHANNELS.index("ER")] *= _effect(t.er_intensity, 1.0, on)
    area = (radius / (CELL_TO_NUCLEUS * NUCLEUS_RADIUS * scale)) ** 2
    return Cell(
        y=y,
        x=x,
        nucleus_a=a,
        nucleus_b=b,
        angle=float(rng.uniform(0.0, math.pi)),
        offset_y=shift * math.sin(direction),
        offset_x=shift * math.cos(direction),
        radius=radius,
        wobble=wobble,
        brightness=brightness.astype(np.float32),
        puncta=int(rng.poisson(MITO_PER_CELL * area * _effect(t.mito_puncta, 1.0, on))),
        mito_intensity=_effect(t.mito_intensity, 1.0, on),
        actin_ring=_effect(t.actin_ring, 1.0, on),
        actin_texture=_effect(t.actin_texture, 0.0, on),
        er_texture=_effect(t.er_texture, 0.0, on),
    )


def _cell_positions(rng: np.random.Generator, n: int, size: int, spacing: float) -> np.ndarray:
    """``n`` centres, greedily kept ``spacing`` apart where the field has room (then overlapping)."""
    candidates = rng.uniform(0.0, size, (n * 20, 2))
    kept: list[np.ndarray] = []
    for p in candidates:
        if len(kept) == n:
            break
        if not kept or np.min(np.hypot(*(np.array(kept) - p).T)) >= spacing:
            kept.append(p)
    rest = candidates[-(n - len(kept)) :] if len(kept) < n else candidates[:0]
    return np.concatenate([np.array(kept).reshape(-1, 2), rest])


# ---------------------------------------------------------------------------------------------
# Painting


def _sigmoid_edge(distance: np.ndarray, width: float) -> np.ndarray:
    """1 inside (distance < 0), 0 outside, with a soft edge ``width`` pixels wide."""
    return 1.0 / (1.0 + np.exp(np.clip(distance / width, -30.0, 30.0)))


def _stripes(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, wavelength: float):
    """A plane wave in [-1, 1] in a random direction: parallel fibres (stress-fibre-like)."""
    theta, phase = rng.uniform(0.0, math.pi), rng.uniform(0.0, 2 * math.pi)
    k = 2 * math.pi / wavelength
    ky, kx = k * math.sin(theta), k * math.cos(theta)
    # cos(ky*y + kx*x + p) as products of 1-D terms: y and x are open grids, so the trig is 1-D.
    return np.cos(ky * y) * np.cos(kx * x + phase) - np.sin(ky * y) * np.sin(kx * x + phase)


def _waves(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, wavelength: float, n: int = 3):
    """Cheap isotropic-looking texture in [-1, 1]: the mean of ``n`` random plane waves."""
    return sum(_stripes(rng, y, x, wavelength) for _ in range(n)) / n


@functools.lru_cache(maxsize=32)
def _stamp(sigma: float) -> np.ndarray:
    """A Gaussian spot with peak 1, 3 sigma wide on each side."""
    h = max(1, math.ceil(3 * sigma))
    g = np.exp(-0.5 * (np.arange(-h, h + 1, dtype=np.float32) / sigma) ** 2)
    return np.outer(g, g)


def _add_stamp(img: np.ndarray, stamp: np.ndarray, y: float, x: float, amp: float) -> None:
    """Add ``amp * stamp`` centred on (y, x), clipped at the image border."""
    h = stamp.shape[0] // 2
    cy, cx = round(y), round(x)
    y0, y1 = max(cy - h, 0), min(cy + h + 1, img.shape[0])
    x0, x1 = max(cx - h, 0), min(cx + h + 1, img.shape[1])
    if y0 < y1 and x0 < x1:
        img[y0:y1, x0:x1] += amp * stamp[y0 - cy + h : y1 - cy + h, x0 - cx + h : x1 - cx + h]


def _paint_cell(rng: np.random.Generator, signal: np.ndarray, cell: Cell, scale: float) -> None:
    """Add one cell's photons to ``signal`` (C, H, W), channel order :data:`CHANNELS`."""
    size = signal.shape[1]
    half = cell.radius * (1.0 + np.abs(cell.wobble[:, 0]).sum()) + 3.0 * scale
    y0, y1 = max(int(cell.y - half), 0), min(int(cell.y + half) + 2, size)
    x0, x1 = max(int(cell.x - half), 0), min(int(cell.x + half) + 2, size)
    if y0 >= y1 or x0 >= x1:
        return
    # Open grids: 1-D coordinates broadcast to the patch, so the trig stays 1-D where it can.
    y = (np.arange(y0, y1, dtype=np.float32) - cell.y)[:, None]
    x = (np.arange(x0, x1, dtype=np.float32) - cell.x)[None, :]

    # Nucleus: a rotated ellipse around the (offset) nucleus centre.
    ny, nx = y - cell.offset_y, x - cell.offset_x
    cos_a, sin_a = math.cos(cell.angle), math.sin(cell.angle)
    u, v = nx * cos_a + ny * sin_a, ny * cos_a - nx * sin_a
    rn = np.sqrt((u / cell.nucleus_a) ** 2 + (v / cell.nucleus_b) ** 2)
    r_nuc = math.sqrt(cell.nucleus_a * cell.nucleus_b)
    nucleus = _sigmoid_edge((rn - 1.0) * r_nuc, 0.5 * scale)

    # Cell outline: a circle whose radius wobbles with the angle (harmonics 2-4).
    rho, phi = np.sqrt(y * y + x * x), np.arctan2(y, x)
    outline = cell.radius * (
        1.0 + sum(a * np.cos(k * phi + p) for k, (a, p) in zip((2, 3, 4), cell.wobble))
    )
    rc = rho / outline
    cyto = _sigmoid_edge((rc - 1.0) * cell.radius, 0.8 * scale)
    cyto_only = cyto * (1.0 - nucleus)

    b = dict(zip(CHANNELS, cell.brightness))
    patch = signal[:, y0:y1, x0:x1]

    patch[0] += b["DNA"] * nucleus * (1.0 + 0.2 * _waves(rng, ny, nx, 3.0 * scale))

    perinuclear = np.exp(-np.maximum(rn - 1.0, 0.0) * r_nuc / (0.45 * cell.radius))
    envelope = np.exp(-(((rn - 1.0) * r_nuc / (0.6 * scale)) ** 2))
    er_tex = 1.0 + (0.15 + cell.er_texture) * _waves(rng, y, x, 2.5 * scale)
    patch[1] += b["ER"] * (cyto_only * (0.35 + 0.65 * perinuclear) * er_tex + 0.5 * envelope)

    patch[2] += b["RNA"] * (0.55 * cyto_only + 0.35 * nucleus)

    ring = np.exp(-(((rc - 1.0) * cell.radius / (0.9 * scale)) ** 2))
    fibres = 1.0 + (0.1 + cell.actin_texture) * _stripes(rng, y, x, 2.5 * scale)
    patch[3] += b["AGP"] * (cell.actin_ring * ring + 0.25 * cyto * fibres)

    patch[4] += (0.08 * b["Mito"] * cell.mito_intensity) * cyto_only

    _paint_spots(rng, signal, cell, scale)


def _paint_spots(rng: np.random.Generator, signal: np.ndarray, cell: Cell, scale: float) -> None:
    """Nucleoli (RNA), the Golgi (AGP) and mitochondrial puncta (Mito) as Gaussian spots."""
    cy, cx = cell.y + cell.offset_y, cell.x + cell.offset_x
    r_nuc = math.sqrt(cell.nucleus_a * cell.nucleus_b)
    b = dict(zip(CHANNELS, cell.brightness))
    nucleolus = _stamp(round(0.7 * scale, 3))
    for _ in range(int(rng.integers(2, 5))):
        dy, dx = rng.uniform(-0.45, 0.45, 2) * r_nuc
        _add_stamp(signal[2], nucleolus, cy + dy, cx + dx, 1.2 * b["RNA"])
    golgi_dir = rng.uniform(0.0, 2 * math.pi)
    golgi_r = 1.25 * cell.nucleus_a
    _add_stamp(
        signal[3],
        _stamp(round(1.2 * scale, 3)),
        cy + golgi_r * math.sin(golgi_dir),
        cx + golgi_r * math.cos(golgi_dir),
        0.9 * b["AGP"],
    )
    # Puncta in an annulus around the nucleus (mitochondria gather perinuclearly).
    inner = 1.1 * cell.nucleus_a
    outer = max(inner + scale, 0.9 * cell.radius)
    rho = rng.uniform(inner, outer, cell.puncta)
    ang = rng.uniform(0.0, 2 * math.pi, cell.puncta)
    amps = b["Mito"] * cell.mito_intensity * rng.lognormal(0.0, 0.3, cell.puncta)
    spot = _stamp(round(0.6 * scale, 3))
    for r, a, amp in zip(rho, ang, amps):
        _add_stamp(signal[4], spot, cy + r * math.sin(a), cx + r * math.cos(a), float(amp))


@functools.lru_cache(maxsize=4)
def vignette(size: int) -> np.ndarray:
    """Illumination falloff (same for every site: what illumination correction removes)."""
    c = (np.arange(size, dtype=np.float32) - (size - 1) / 2) / size
    return (1.0 - 0.3 * (c[:, None] ** 2 + c[None, :] ** 2)).astype(np.float32)


def camera(rng: np.random.Generator, photons: np.ndarray) -> np.ndarray:
    """Shot noise (Gaussian approximation of Poisson, exact enough at these counts), read noise,
    offset; rounded and clipped to uint16."""
    # In place: at 1080 px this is the costliest step of a site.
    adu = rng.standard_normal(photons.shape, dtype=np.float32)
    adu *= np.sqrt(photons + READ_NOISE**2)
    adu += photons
    adu += CAMERA_OFFSET + 0.5  # + 0.5, then truncation by astype, rounds to nearest
    np.clip(adu, 0, 65535, out=adu)
    return adu.astype(np.uint16)


def draw_site(
    rng: np.random.Generator,
    size: int,
    cells: int,
    treatment: Treatment,
    plate: Nuisance,
    well: Nuisance,
) -> np.ndarray:
    """One field of view: a (5, size, size) uint16 array in :data:`CHANNELS` order.

    ``cells`` is the expected number of cells before the treatment's and well's density.
    """
    px = size / REF_SIZE  # pixels per reference pixel: edges, spots and textures
    cell_scale = px * well.size  # cell dimensions also carry the well's size jitter
    n = max(1, int(rng.poisson(cells * well.density * treatment.density)))
    spacing = 1.6 * CELL_TO_NUCLEUS * NUCLEUS_RADIUS * cell_scale
    signal = np.zeros((len(CHANNELS), size, size), dtype=np.float32)
    for y, x in _cell_positions(rng, n, size, spacing):
        cell = _draw_cell(rng, float(y), float(x), cell_scale, treatment)
        _paint_cell(rng, signal, cell, px)
    signal += BACKGROUND[:, None, None]
    signal *= vignette(size)[None]
    signal *= (plate.gain * well.gain)[:, None, None]
    return camera(rng, signal)
