"""Synthetic fields at the pilot's physical scale (``synth.nucleus_diameter``), with texture.

The thumbnail generator (:mod:`cellmorph.synth`) scales whole cells with the image; here the
physical scale is fixed: a nucleus is ``nucleus_diameter`` px across at any ``size``, a field
holds ``cells_per_field`` cells per 1080 x 1080 px, grouped in colonies with empty background
between them (U2OS leave about half of a pilot field empty). Intensities are calibrated to
the real site in ``tests/data/cpg0000_BR00116991_A01_f01`` (1st, 50th and 99th percentiles per
channel), background and out-of-focus haze included.

Each treatment also has a :class:`Texture`: the 1-4 px patterns (chromatin granularity,
nucleoli, mitochondrial network vs puncta, ER grain, actin fibres). Every texture is drawn with
a mean of one, so changing it moves no channel's mean intensity: with ``texture_only`` the
treatments differ in nothing else.

This module draws the photons of one field; :mod:`cellmorph.synth` adds gains, the vignette and
the camera, and writes the files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage
from scipy.stats import norm

if TYPE_CHECKING:  # only for hints: synth imports this module
    from cellmorph.synth import Nuisance, Treatment

CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")  # order of the rendered array
REAL_SIZE = 1080  # cells_per_field is per this many px squared
CELL_TO_NUCLEUS = 2.5  # cell radius / nucleus radius (U2OS spread wide)
SPACING = 1.6  # nearest nucleus centres, in cell radii: cells touch inside a colony
CELLS_PER_COLONY = 12.0
# Photon levels fitted to the real site's percentiles (before per-plate/well gains ~1):
# empty background (+ the camera's offset of 100), a cell's brightness, and out-of-focus haze
# as a fraction of the signal blurred HAZE_SIGMA px wide.
BACKGROUND = {"DNA": 280.0, "ER": 260.0, "RNA": 400.0, "AGP": 530.0, "Mito": 2650.0}
BRIGHTNESS = {"DNA": 14000.0, "ER": 14000.0, "RNA": 60000.0, "AGP": 24000.0, "Mito": 4000.0}
HAZE = {"DNA": 0.4, "ER": 0.1, "RNA": 0.1, "AGP": 0.08, "Mito": 1.2}
HAZE_SIGMA = 60.0  # px


@dataclass(frozen=True)
class Texture:
    """A treatment's texture at the 1-4 px scale; the defaults are DMSO's.

    ``chromatin`` and ``er_grain``: contrast of fine grain (log-normal, mean one) in the nucleus
    (DNA) and in the ER; ``nucleoli``: 0 = two to four large nucleoli, 1 = up to a dozen small
    ones (same total RNA); ``mito_fragmentation``: 0 = a tubular network, 1 = isolated puncta;
    ``actin_fibres``: contrast of parallel fibres (4 px period) in AGP.
    """

    chromatin: float = 0.15
    nucleoli: float = 0.0
    mito_fragmentation: float = 0.2
    er_grain: float = 0.25
    actin_fibres: float = 0.1


@dataclass(frozen=True)
class RealCell:
    """One cell at real scale: centre, nucleus ellipse, outline, brightness and texture."""

    y: float
    x: float
    nucleus_y: float  # nucleus centre (absolute px)
    nucleus_x: float
    a: float  # nucleus semi-axes and angle
    b: float
    angle: float
    radius: float
    wobble: np.ndarray  # (3, 2): amplitude and phase of outline harmonics 2, 3, 4
    brightness: np.ndarray  # per channel in CHANNELS order
    texture: Texture
    actin_ring: float


def _pick(value: float, neutral: float, on: bool, shape_too: bool) -> float:
    """A treatment's morphology value for a responding cell (neutral when only texture counts)."""
    return value if on and shape_too else neutral


def _texture(t: Treatment, on: bool) -> Texture:
    return t.texture if on else Texture()


def draw_cell(
    rng: np.random.Generator, y: float, x: float, diameter: float, t: Treatment, only_texture: bool
) -> RealCell:
    """Shape, brightness and texture of one cell; responders carry the treatment's effects."""
    on = bool(rng.random() < t.responders)
    shape = not only_texture
    r_n = 0.5 * diameter * _pick(t.nucleus_scale, 1.0, on, shape) * rng.lognormal(0.0, 0.12)
    aspect = 1.0 + abs(rng.normal(0.0, 0.12)) + _pick(t.nucleus_elongation, 0.0, on, shape)
    a, b = r_n * math.sqrt(aspect), r_n / math.sqrt(aspect)
    radius = CELL_TO_NUCLEUS * 0.5 * diameter * rng.lognormal(0.0, 0.10)
    radius = max(radius * _pick(t.cell_scale, 1.0, on, shape), 1.35 * a)
    shift, direction = rng.uniform(0.0, 0.3) * (radius - a), rng.uniform(0.0, 2 * math.pi)
    brightness = np.array([BRIGHTNESS[c] for c in CHANNELS]) * rng.lognormal(0.0, 0.15, 5)
    brightness[CHANNELS.index("ER")] *= _pick(t.er_intensity, 1.0, on, shape)
    brightness[CHANNELS.index("Mito")] *= _pick(t.mito_intensity, 1.0, on, shape)
    return RealCell(
        y=y,
        x=x,
        nucleus_y=y + shift * math.sin(direction),
        nucleus_x=x + shift * math.cos(direction),
        a=a,
        b=b,
        angle=float(rng.uniform(0.0, math.pi)),
        radius=radius,
        wobble=np.stack([rng.normal(0.0, 0.06, 3), rng.uniform(0.0, 2 * math.pi, 3)], axis=1),
        brightness=brightness.astype(np.float32),
        texture=_texture(t, on),
        actin_ring=_pick(t.actin_ring, 1.0, on, shape),
    )


def colony_positions(rng: np.random.Generator, n: int, size: int, spacing: float) -> np.ndarray:
    """``n`` (y, x) centres in colonies of ~12, no two closer than ``spacing`` (fewer if the
    colonies run out of room)."""
    n_colonies = max(1, round(n / CELLS_PER_COLONY))
    centres = rng.uniform(0.0, size, (n_colonies, 2))
    spread = 0.5 * spacing * math.sqrt(CELLS_PER_COLONY)
    # Candidates in batches: one draw per batch, a Python loop only over the short kept list.
    kept = np.empty((0, 2))
    for _ in range(40):
        if len(kept) >= n:
            break
        batch = centres[rng.integers(0, n_colonies, 4 * n)] + rng.normal(0.0, spread, (4 * n, 2))
        batch = batch[((batch >= 0) & (batch < size)).all(axis=1)]
        for p in batch:
            if len(kept) >= n:
                break
            if len(kept) == 0 or np.min(np.hypot(*(kept - p).T)) >= spacing:
                kept = np.vstack([kept, p])
    return kept


def unit_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """White noise smoothed at ``sigma`` px and scaled to unit variance (grain of that size)."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), sigma)
    field /= field.std() + 1e-12
    return field


def _above(field: np.ndarray, level: float) -> np.ndarray:
    """max(field - level, 0) scaled to mean one (field ~ N(0, 1): the mean is known)."""
    mean = norm.pdf(level) - level * norm.sf(level)
    return np.maximum(field - level, 0.0) / mean


@dataclass(frozen=True)
class Fields:
    """Per-site texture fields the cells cut their patches from (mean-one patterns)."""

    grain_dna: np.ndarray
    grain_er: np.ndarray
    mito_network: np.ndarray
    mito_puncta: np.ndarray


def texture_fields(rng: np.random.Generator, size: int) -> Fields:
    """The site's grain (DNA 1 px, ER 1.2 px) and mitochondria (network at 2 px, puncta at 1 px)."""
    return Fields(
        grain_dna=unit_noise(rng, size, 1.0),
        grain_er=unit_noise(rng, size, 1.2),
        mito_network=_above(unit_noise(rng, size, 2.0), 0.3),
        mito_puncta=_above(unit_noise(rng, size, 1.0), 1.6),
    )


def _lognormal_grain(grain: np.ndarray, contrast: float) -> np.ndarray:
    """exp(c g - c^2 / 2) for unit-normal grain g: mean one at any contrast."""
    return np.exp(contrast * grain - 0.5 * contrast * contrast)


def _sigmoid(distance: np.ndarray, width: float) -> np.ndarray:
    """1 inside (distance < 0), 0 outside, with a soft edge ``width`` px wide."""
    return 1.0 / (1.0 + np.exp(np.clip(distance / width, -30.0, 30.0)))


def _nucleoli(
    rng: np.random.Generator, cell: RealCell, ys: np.ndarray, xs: np.ndarray
) -> np.ndarray:
    """Nucleoli as Gaussian spots inside the nucleus: more and smaller as ``nucleoli`` -> 1,
    with the same total (integral) so that RNA's mean does not move."""
    frag = cell.texture.nucleoli
    count = int(rng.integers(2, 5)) + int(round(frag * rng.uniform(5, 9)))
    sigma = 2.4 * (1.0 - 0.55 * frag)
    r = math.sqrt(cell.a * cell.b)
    spots = np.zeros((len(ys), len(xs[0])), dtype=np.float32)
    for dy, dx in rng.uniform(-0.5, 0.5, (count, 2)) * r:
        gy = np.exp(-0.5 * ((ys - cell.nucleus_y - dy) / sigma) ** 2)
        gx = np.exp(-0.5 * ((xs - cell.nucleus_x - dx) / sigma) ** 2)
        spots += (gy * gx) * (3.0 * 2.4**2 / (sigma**2 * count))
    return spots


def paint_cell(rng: np.random.Generator, signal: np.ndarray, cell: RealCell, f: Fields) -> None:
    """Add one cell's photons to ``signal`` (C, H, W) in :data:`CHANNELS` order."""
    size = signal.shape[1]
    half = cell.radius * (1.0 + np.abs(cell.wobble[:, 0]).sum()) + 4.0
    y0, y1 = max(int(cell.y - half), 0), min(int(cell.y + half) + 2, size)
    x0, x1 = max(int(cell.x - half), 0), min(int(cell.x + half) + 2, size)
    if y0 >= y1 or x0 >= x1:
        return
    ys = np.arange(y0, y1, dtype=np.float32)[:, None]
    xs = np.arange(x0, x1, dtype=np.float32)[None, :]
    ny, nx = ys - cell.nucleus_y, xs - cell.nucleus_x
    cos_a, sin_a = math.cos(cell.angle), math.sin(cell.angle)
    u, v = nx * cos_a + ny * sin_a, ny * cos_a - nx * sin_a
    r_nuc = math.sqrt(cell.a * cell.b)
    edge_n = (np.sqrt((u / cell.a) ** 2 + (v / cell.b) ** 2) - 1.0) * r_nuc  # px from the rim
    nucleus = _sigmoid(edge_n, 0.8)
    y, x = ys - cell.y, xs - cell.x
    phi = np.arctan2(y, x)
    outline = cell.radius * (
        1.0 + sum(a * np.cos(k * phi + p) for k, (a, p) in zip((2, 3, 4), cell.wobble))
    )
    edge_c = np.sqrt(y * y + x * x) - outline
    cyto = _sigmoid(edge_c, 2.0)
    cyto_only = cyto * (1.0 - nucleus)
    perinuclear = np.exp(-np.maximum(edge_n, 0.0) / (0.45 * cell.radius))
    b = dict(zip(CHANNELS, cell.brightness))
    tex = cell.texture
    win = (slice(y0, y1), slice(x0, x1))
    spots = _nucleoli(rng, cell, ys, xs) * nucleus
    patch = signal[:, y0:y1, x0:x1]
    dna = nucleus * _lognormal_grain(f.grain_dna[win], tex.chromatin)
    patch[0] += b["DNA"] * dna * (1.0 - 0.5 * np.minimum(spots / 3.0, 1.0))
    envelope = np.exp(-((edge_n / 1.5) ** 2))
    er = cyto_only * (0.1 + 0.9 * perinuclear**2) * _lognormal_grain(f.grain_er[win], tex.er_grain)
    patch[1] += b["ER"] * (er + 0.3 * envelope)
    patch[2] += b["RNA"] * (0.35 * cyto_only * perinuclear**2 + 0.12 * nucleus + 0.5 * spots)
    _paint_actin(rng, patch[3], cell, b["AGP"], cyto, edge_c, (y, x))
    mito = (1.0 - tex.mito_fragmentation) * f.mito_network[win]
    mito += tex.mito_fragmentation * f.mito_puncta[win]
    patch[4] += b["Mito"] * 0.5 * cyto_only * (0.2 + 0.8 * perinuclear) * mito


def _paint_actin(
    rng: np.random.Generator,
    agp: np.ndarray,
    cell: RealCell,
    bright: float,
    cyto: np.ndarray,
    edge_c: np.ndarray,
    yx: tuple[np.ndarray, np.ndarray],
) -> None:
    """Cortical ring, parallel fibres (4 px period) across the cell, and a Golgi spot."""
    y, x = yx
    theta, phase = rng.uniform(0.0, math.pi), rng.uniform(0.0, 2 * math.pi)
    k = 2 * math.pi / 4.0
    fibres = 1.0 + min(cell.texture.actin_fibres, 1.0) * np.cos(
        k * (y * math.sin(theta) + x * math.cos(theta)) + phase
    )
    ring = np.exp(-((edge_c / 3.0) ** 2))
    agp += bright * (0.25 * cell.actin_ring * ring + 0.12 * cyto * fibres)
    golgi_dir = rng.uniform(0.0, 2 * math.pi)
    gy = cell.nucleus_y - cell.y + 1.3 * cell.a * math.sin(golgi_dir)
    gx = cell.nucleus_x - cell.x + 1.3 * cell.a * math.cos(golgi_dir)
    agp += bright * 1.2 * np.exp(-((y - gy) ** 2 + (x - gx) ** 2) / (2 * 5.0**2))


def _upsample(n_small: int, step: int, size: int) -> np.ndarray:
    """(size, n_small) linear interpolation weights from a grid sampled every ``step`` px."""
    pos = np.clip(np.arange(size, dtype=np.float32) / step, 0, n_small - 1)
    lo = np.minimum(pos.astype(int), n_small - 2) if n_small > 1 else np.zeros(size, int)
    w = np.zeros((size, n_small), dtype=np.float32)
    frac = pos - lo if n_small > 1 else np.zeros(size, np.float32)
    w[np.arange(size), lo] = 1.0 - frac
    if n_small > 1:
        w[np.arange(size), lo + 1] += frac
    return w


def _haze(signal: np.ndarray) -> np.ndarray:
    """Out-of-focus light around the cells: the signal blurred wide (at 1/8 resolution, then
    interpolated back with two small matrix products: fast and smooth)."""
    size, step = signal.shape[1], 8
    small = ndimage.gaussian_filter(
        signal[:, ::step, ::step], (0, HAZE_SIGMA / step, HAZE_SIGMA / step)
    )
    up = _upsample(small.shape[1], step, size)
    big = up @ small @ up.T  # (size, n) @ (C, n, n) @ (n, size)
    return big * np.array([HAZE[c] for c in CHANNELS], np.float32)[:, None, None]


def draw_field(
    rng: np.random.Generator,
    size: int,
    diameter: float,
    cells_per_field: float,
    treatment: Treatment,
    well: Nuisance,
    only_texture: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Photons of one real-scale field (5, size, size) float32, and the nucleus centres (n, 2)
    as (x, y) px. Gains, vignette and camera are the caller's."""
    shape_too = not only_texture
    # Nuclear size and cell density vary less between DMSO wells of a plate than in the
    # thumbnails (whose wells must differ visibly in ~14 cells): half the jitter, in log terms.
    d = diameter * math.sqrt(well.size)
    density = math.sqrt(well.density) * (treatment.density if shape_too else 1.0)
    n = int(rng.poisson(cells_per_field * (size / REAL_SIZE) ** 2 * density))
    spacing = SPACING * CELL_TO_NUCLEUS * 0.5 * d
    # Geometry and texture draw from separate streams: with texture_only, one seed gives the
    # same cells, in the same places, under every treatment.
    geometry, texture = rng.spawn(2)
    fields = texture_fields(texture, size)
    signal = np.zeros((len(CHANNELS), size, size), dtype=np.float32)
    centres = []
    for y, x in colony_positions(geometry, n, size, spacing):
        cell = draw_cell(geometry, float(y), float(x), d, treatment, only_texture)
        paint_cell(texture, signal, cell, fields)
        centres.append((cell.nucleus_x, cell.nucleus_y))
    signal += _haze(signal)
    signal += np.array([BACKGROUND[c] for c in CHANNELS], np.float32)[:, None, None]
    return signal, np.array(centres, dtype=np.float64).reshape(-1, 2)
