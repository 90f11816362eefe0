"""``synth`` at the pilot's physical scale, texture-only treatments, legacy plates unchanged,
and an output folder that is never silently overwritten."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import ndimage
from scipy.spatial import cKDTree

from cellmorph import synth, synth_real
from cellmorph.config import Config, NucleiConfig, SynthConfig, validate
from cellmorph.errors import CellmorphError
from conversion.nuclei import find_nuclei

REAL = Path(__file__).parent / "data" / "cpg0000_BR00116991_A01_f01"
PHENIX = {"Mito": 1, "AGP": 2, "RNA": 3, "ER": 4, "DNA": 5}
PILOT_DIAMETER = 29.8


def _digest(out: Path) -> tuple[str, int]:
    """One sha256 over the sha256 of every TIFF and CSV under ``out`` (names included)."""
    files = {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.suffix in (".tiff", ".csv")
    }
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(), len(files)


# Computed with the generator as it was before real scale existed (commit 1ca5c30): the
# thumbnail plates, the demo's included, must not change by a bit. numpy picks its float32
# exp/sin/cos kernels by the CPU at import, and they differ in the last bit, which moves a few
# uint16 pixels: the first digests here, taken on earlier machines, failed on an AVX2-only AMD
# EPYC (2026-12-03) for commit 1ca5c30's code as for today's, and with numpy held to its SSE
# kernels the default and demo plates change too. So the plates are drawn in a child process
# held to numpy's x86-64-v3 (AVX2) kernels, which x86-64 machines of the last decade have; the
# digests are commit 1ca5c30's under that setting.
NUMPY_X86_V3 = {"NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"}
LEGACY = {
    "default": (dict(plates=1, rows=2, cols=5, sites=2),
                "9c80a8e3b2d9a1bc2072dfc15b5c73860512316de34cef6bf08be1e1edc6cd13", 101),
    "demo": (dict(seed=0, plates=1, rows=4, cols=6, sites=1, size=96, cells_per_site=28),
             "b462f2b9dd386d1d179fd3f5591fdb1fc1361a6331d2f06284eb9d649845288c", 121),
    "large": (dict(plates=1, rows=1, cols=1, sites=1, size=300, seed=3),
              "c5c8eba59691a4369077baf3749d52c9247a51f80d9c155d579d1a5d99c2d86b", 6),
}  # fmt: skip


def _has_numpy_x86_v3() -> bool:
    from numpy._core._multiarray_umath import __cpu_features__

    return bool(__cpu_features__.get("X86_V3"))


@pytest.mark.skipif(not _has_numpy_x86_v3(), reason="the digests are numpy's x86-64-v3 kernels'")
@pytest.mark.parametrize("name", sorted(LEGACY))
def test_thumbnail_plates_are_byte_identical_to_before(name: str, tmp_path: Path) -> None:
    settings, digest, files = LEGACY[name]
    code = (
        "import sys; from cellmorph import synth; from cellmorph.config import SynthConfig; "
        f"synth.generate_plate(SynthConfig(out=sys.argv[1], **{settings!r}), progress=False)"
    )
    env = {**os.environ, **NUMPY_X86_V3}
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, check=True)
    assert _digest(tmp_path) == (digest, files)
    assert not (tmp_path / synth.LOCATIONS).exists()
    # The real-scale settings are not part of a thumbnail plate's key: plates written before
    # they existed are still current.
    assert "nucleus_diameter" not in json.loads((tmp_path / "synth.json").read_text())


def _real(channel: str) -> np.ndarray:
    return tifffile.imread(REAL / f"r01c01f01p01-ch{PHENIX[channel]}sk1fk1fl1.tiff")


@pytest.fixture(scope="module")
def real_scale_plate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("real")
    cfg = SynthConfig(out=str(out), plates=1, rows=1, cols=2, sites=2, size=1080,
                      nucleus_diameter=PILOT_DIAMETER)  # fmt: skip
    csv = synth.generate_plate(cfg, progress=False)
    return csv, pd.read_csv(csv)


def _site(csv: Path, row: pd.Series) -> tuple[dict[str, np.ndarray], np.ndarray]:
    images = {ch: tifffile.imread(csv.parent / row[f"PathName_Orig{ch}"]
                                  / row[f"FileName_Orig{ch}"]) for ch in synth.CHANNELS}  # fmt: skip
    loc = csv.parent / "locations" / row["Metadata_Plate"]
    table = pd.read_csv(loc / f"{row['Metadata_Well']}-{row['Metadata_Site']}-Nuclei.csv")
    assert list(table.columns) == ["Nuclei_Location_Center_X", "Nuclei_Location_Center_Y"]
    return images, table.to_numpy()


def test_real_scale_site_looks_like_the_pilot_site(real_scale_plate) -> None:
    csv, df = real_scale_plate
    assert len(df) == 4 and set(df["Metadata_pert_iname"]) == {"DMSO", "AMG900"}
    real = {ch: np.percentile(_real(ch), [1, 50, 99]) for ch in synth.CHANNELS}
    for _, row in df[df["Metadata_pert_iname"] == "DMSO"].iterrows():
        images, truth = _site(csv, row)
        for ch, img in images.items():
            assert img.shape == (1080, 1080) and img.dtype == np.uint16
            ratio = np.percentile(img, [1, 50, 99]) / real[ch]
            assert ((ratio > 1 / 1.5) & (ratio < 1.5)).all(), (ch, ratio)
        found = find_nuclei(images["DNA"], NucleiConfig())
        assert 70 <= len(found) <= 130, len(found)
        inside = truth[((truth > 20) & (truth < 1060)).all(axis=1)]  # border nuclei are dropped
        assert (cKDTree(found[:, :2]).query(inside)[0] <= 8).mean() >= 0.9
        assert (cKDTree(truth).query(found[:, :2])[0] <= 8).mean() >= 0.9
        diameter = np.median(2 * np.sqrt(found[:, 2] / np.pi))
        assert 0.8 * PILOT_DIAMETER <= diameter <= 1.2 * PILOT_DIAMETER, diameter
        # Colonies with empty background between them: about half the field is empty, as in
        # the pilot (ER above twice its background: 44% there).
        er = images["ER"]
        assert 0.25 < (er > 2 * np.percentile(er, 1)).mean() < 0.65


UNIT = synth.Nuisance(gain=np.ones(len(synth.CHANNELS), dtype=np.float32))


def test_physical_scale_is_fixed_whatever_the_size() -> None:
    dmso = synth.TREATMENTS[0]
    counts, diameters = {}, {}
    for size in (540, 1080):
        found = []
        for seed in range(4):
            signal, centres = synth_real.draw_field(
                np.random.default_rng(seed), size, PILOT_DIAMETER, 100.0, dmso, UNIT
            )
            found.append(find_nuclei(signal[0], NucleiConfig()))
            counts.setdefault(size, []).append(len(centres))
        areas = np.concatenate([f[:, 2] for f in found])
        diameters[size] = np.median(2 * np.sqrt(areas / np.pi))
    assert 80 <= np.mean(counts[1080]) <= 120
    assert 3.0 <= np.mean(counts[1080]) / np.mean(counts[540]) <= 5.5  # a quarter of the area
    assert abs(diameters[540] / diameters[1080] - 1) < 0.1  # same nuclei, not scaled down


def _fine(signal: np.ndarray, mask: np.ndarray) -> float:
    """Contrast at the 1-4 px scale: what is left after a 2 px blur, over the mean."""
    high = signal - ndimage.gaussian_filter(signal, 2.0)
    return float(high[mask].std() / signal[mask].mean())


def test_texture_only_treatments_differ_only_in_fine_texture() -> None:
    by_name = {t.name: t for t in synth.TREATMENTS}
    base, centres = synth_real.draw_field(np.random.default_rng(5), 540, PILOT_DIAMETER, 100.0,
                                          by_name["DMSO"], UNIT, only_texture=True)  # fmt: skip
    masks = {ch: base[i] > 2 * np.percentile(base[i], 1) for i, ch in enumerate(synth.CHANNELS)}
    # Treatment -> the channel whose fine texture it changes.
    targets = {"AMG900": "DNA", "FK-866": "Mito", "NVS-PAK1-1": "AGP", "aloxistatin": "ER",
               "TC-S-7004": "RNA"}  # fmt: skip
    for name, channel in targets.items():
        t = by_name[name]
        assert t.texture != synth_real.Texture()
        other, where = synth_real.draw_field(np.random.default_rng(5), 540, PILOT_DIAMETER,
                                             100.0, t, UNIT, only_texture=True)  # fmt: skip
        np.testing.assert_array_equal(where, centres)  # same cells in the same places
        means = other.reshape(5, -1).mean(1) / base.reshape(5, -1).mean(1)
        assert np.allclose(means, 1.0, atol=0.02), (name, means)
        i = synth.CHANNELS.index(channel)
        assert _fine(other[i], masks[channel]) > 1.3 * _fine(base[i], masks[channel]), name
    # Without texture_only, AMG900 also enlarges nuclei (its morphology effect).
    big, _ = synth_real.draw_field(np.random.default_rng(5), 540, PILOT_DIAMETER, 100.0,
                                   by_name["AMG900"], UNIT)  # fmt: skip
    areas = [np.median(find_nuclei(s[0], NucleiConfig())[:, 2]) for s in (base, big)]
    assert areas[1] > 1.5 * areas[0]


def test_texture_only_needs_real_scale_and_the_cli_takes_it(tmp_path: Path) -> None:
    from cellmorph.cli import build_parser

    with pytest.raises(CellmorphError, match=r"synth.*texture_only"):
        validate(Config, {"synth": {"texture_only": True}})
    argv = ["synth", str(tmp_path / "t"), "--plates", "1", "--rows", "1", "--cols", "3",
            "--sites", "1", "--size", "256", "--nucleus-diameter", "29.8", "--texture-only",
            "--quiet"]  # fmt: skip
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0
    settings = json.loads((tmp_path / "t" / "synth.json").read_text())
    assert settings["texture_only"] is True and settings["nucleus_diameter"] == 29.8
    assert len(list((tmp_path / "t" / "locations" / "SYNP01").glob("*-Nuclei.csv"))) == 3
    img = tifffile.imread(next((tmp_path / "t" / "SYNP01" / "Images").glob("*ch5*.tiff")))
    assert img.shape == (256, 256)


def _synth_cli(out: Path, *extra: str) -> int:
    from cellmorph.cli import build_parser

    argv = ["synth", str(out), "--plates", "1", "--rows", "2", "--cols", "2", "--sites", "1",
            "--size", "48", "--quiet", *extra]  # fmt: skip
    args = build_parser().parse_args(argv)
    return args.func(args)


def test_synth_refuses_a_folder_holding_other_files(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    (out / "SYNP01" / "Images").mkdir(parents=True)
    mine = out / "SYNP01" / "Images" / "r01c01f01p01-ch5sk1fk1fl1.tiff"
    mine.write_bytes(b"a real image")
    with pytest.raises(CellmorphError, match=r"raw holds SYNP01 that synth did not write"):
        _synth_cli(out)
    assert mine.read_bytes() == b"a real image"
    assert not (out / "synth.json").exists()
    assert _synth_cli(out, "--overwrite") == 0
    assert mine.read_bytes() != b"a real image"


def test_synth_rewrites_only_its_own_plate_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    assert _synth_cli(out) == 0
    tiff = next((out / "SYNP01" / "Images").glob("*.tiff"))
    first = tiff.read_bytes()
    assert _synth_cli(out) == 0  # the same command again: the same plate
    settings = json.loads((out / "synth.json").read_text())
    (out / "synth.json").write_text(json.dumps({**settings, "complete": False}))
    assert _synth_cli(out) == 0  # an interrupted run of the same command is finished
    assert tiff.read_bytes() == first
    with pytest.raises(CellmorphError, match=r"raw holds a plate generated with other settings "
                                             r"\(seed=0\)"):  # fmt: skip
        _synth_cli(out, "--seed", "7")
    assert tiff.read_bytes() == first
    assert _synth_cli(out, "--seed", "7", "--overwrite") == 0
    assert tiff.read_bytes() != first
    # The library's default (the demo regenerating its own folder) replaces a synth plate.
    cfg = SynthConfig(out=str(out), plates=1, rows=2, cols=2, sites=1, size=48, seed=9)
    synth.generate_plate(cfg, progress=False)
    assert json.loads((out / "synth.json").read_text())["seed"] == 9
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _synth_cli(empty) == 0
