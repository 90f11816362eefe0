"""Hostile inputs (issue 24, part 2): nothing wrong is ever read as right.

Illumination functions on the wrong scale, LoadData tables whose mistakes pandas would hide,
labels that split one class, and commands whose output reader leaves early: each is refused in
one line, quarantined with its reason, or normalized with a warning, as docs/integrity.md says.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import CHANNELS, assert_aligned, make_loaddata

from cellmorph.config import ConvertConfig
from cellmorph.errors import CellmorphError
from cellmorph.store import open_store
from conversion import ownership
from conversion.__main__ import main as conversion_main
from conversion.pack import convert

REPO = Path(__file__).resolve().parents[1]


def _cfg(csv: Path, **kw) -> ConvertConfig:
    return ConvertConfig(load_data=str(csv), size=16, shard_size=3, workers=1, **kw)


def _one_line(err: str, *words: str) -> None:
    lines = [line for line in err.split("\n") if line and "\r" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


# --------------------------------------------------------------------------- illumination


def _illum(root: Path, value: float | np.ndarray, size: int = 16) -> Path:
    folder = root / "illum"
    folder.mkdir(exist_ok=True)
    for ch in CHANNELS:
        np.save(folder / f"P0_Illum{ch}.npy", np.broadcast_to(value, (size, size)).astype("f4"))
    return folder


@pytest.mark.parametrize("value", [0.02, 1e-30], ids=["unrescaled-0.02", "tiny-1e-30"])
def test_illumination_function_far_below_one_is_refused(tmp_path: Path, value: float) -> None:
    """A function that multiplies every pixel by 50 (or 1e30) would saturate bright cells."""
    csv = make_loaddata(tmp_path, plates=1, wells=1, sites=2, size=16)
    illum = _illum(tmp_path, value)
    with pytest.raises(CellmorphError, match=r"P0_IllumDNA.npy has median .*rescaled to ~1"):
        convert(_cfg(csv, illum_dir=str(illum)), tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_illumination_function_with_a_near_zero_pocket_is_refused(tmp_path: Path) -> None:
    csv = make_loaddata(tmp_path, plates=1, wells=1, sites=2, size=16)
    fn = np.ones((16, 16), np.float32)
    fn[:2, :2] = 0.001  # positive, so the zero check passes: 1000 times brighter there
    illum = _illum(tmp_path, fn)
    with pytest.raises(CellmorphError, match=r"minimum 0.001, below 0.01 of its median 1"):
        convert(_cfg(csv, illum_dir=str(illum)), tmp_path / "s.zarr")


def test_saturation_by_the_correction_is_counted_per_channel(tmp_path: Path, capsys) -> None:
    """Halving the gain doubles AGP (~40,000) and Mito (~50,000) past 65535: warned with the
    fraction per channel, recorded in the store; DNA, ER and RNA stay below."""
    csv = make_loaddata(tmp_path, plates=1, wells=1, sites=2, size=16)
    illum = _illum(tmp_path, 0.5)
    summary = convert(_cfg(csv, illum_dir=str(illum)), tmp_path / "s.zarr")
    err = capsys.readouterr().err
    assert "saturated pixels at 65535: AGP 100% (512 pixels), Mito 100% (512 pixels)" in err
    assert "DNA" not in err.split("saturated pixels")[1].split(";")[0]
    sat = open_store(tmp_path / "s.zarr").attrs["illumination_saturated"]
    assert sat["AGP"] == {"pixels": 512, "fraction": 1.0} and sat["DNA"]["pixels"] == 0
    assert summary["illumination_saturated"] == sat
    convert(_cfg(csv, illum_dir=str(illum)), tmp_path / "s.zarr")  # nothing to do: still said
    assert "AGP 100%" in capsys.readouterr().err


# --------------------------------------------------------------------------- LoadData tables


def test_a_column_named_twice_stops_naming_it_and_the_file(tmp_path: Path) -> None:
    """pandas would read the second as ``Metadata_pert_iname.1`` and use the first silently."""
    csv = make_loaddata(tmp_path, plates=1, wells=2, sites=1, size=16)
    df = pd.read_csv(csv)
    df["Metadata_pert_iname "] = ["right", "wrong"]  # the same name once trimmed
    df.to_csv(csv, index=False)
    with pytest.raises(CellmorphError, match=r"load_data.csv names column 'Metadata_pert_iname' "
                       r"twice \(columns \d+ and \d+\)"):  # fmt: skip
        convert(_cfg(csv), tmp_path / "s.zarr")
    df.drop(columns=["Metadata_pert_iname "]).to_csv(csv, index=False)
    meta = tmp_path / "meta.csv"
    meta.write_text("Metadata_Plate\tMetadata_Well\tdose\tdose\nP0\tA01\t1\t2\n")
    with pytest.raises(CellmorphError, match=r"meta.csv names column 'dose' twice"):
        convert(_cfg(csv, join=str(meta), join_on=["Metadata_Plate", "Metadata_Well"]),
                tmp_path / "s.zarr")  # fmt: skip


def test_one_file_for_two_channels_is_quarantined(tmp_path: Path) -> None:
    """DNA's file named again for ER (also as ``./images``): ER would be stored as a copy."""
    csv = make_loaddata(tmp_path, plates=1, wells=2, sites=2, size=16)
    df = pd.read_csv(csv)
    df.loc[0, "FileName_OrigER"] = df.loc[0, "FileName_OrigDNA"]
    df.loc[0, "PathName_OrigER"] = "./images/"
    df.to_csv(csv, index=False)
    summary = convert(_cfg(csv), tmp_path / "s.zarr")
    assert summary["images"] == 3 and summary["quarantined"] == 1
    (reason,) = open_store(tmp_path / "s.zarr").quarantine["reason"]
    assert reason.startswith("one file for two channels: DNA and ER are both ")
    assert reason.endswith(df.loc[0, "FileName_OrigDNA"]) and "./" not in reason
    assert summary["quarantine_reasons"][0]["reason"] == "one file named by two channels of a site"
    assert_aligned(tmp_path / "s.zarr")


def test_two_sites_naming_the_same_files_are_both_quarantined(tmp_path: Path) -> None:
    """Exact copies under two keys would sit on both sides of a split (README: honest numbers):
    every site naming a shared file goes, as with a duplicated (plate, well, site)."""
    csv = make_loaddata(tmp_path, plates=1, wells=4, sites=2, size=16)
    df = pd.read_csv(csv)
    files = [c for c in df.columns if c.startswith("FileName_Orig")]
    df.loc[3, files] = df.loc[0, files].to_numpy()  # a copy of A01/1 under A02/2
    df.loc[2, "FileName_OrigMito"] = df.loc[1, "FileName_OrigMito"]  # A01/2's Mito in A02/1
    df.loc[[6, 7], "FileName_OrigDNA"] = ""  # names the folder: not shared, not a file
    df.to_csv(csv, index=False)
    summary = convert(_cfg(csv), tmp_path / "s.zarr")
    assert summary["images"] == 2 and summary["quarantined"] == 6
    q = open_store(tmp_path / "s.zarr").quarantine.sort_values(["well", "site"])
    assert q["reason"].str.endswith("is not a regular file").sum() == 2
    q = q.loc[q["well"] != "A04"]
    assert q["reason"].str.startswith("same file as site P0/").all(), q["reason"]
    assert list(q["well"] + "/" + q["site"]) == ["A01/1", "A01/2", "A02/1", "A02/2"]
    assert "P0/A02/2" in q["reason"].iloc[0] and "P0/A01/1" in q["reason"].iloc[3]
    assert_aligned(tmp_path / "s.zarr")


def test_labels_that_differ_by_case_or_spaces_are_one_class(tmp_path: Path, capsys) -> None:
    csv = make_loaddata(tmp_path, plates=1, wells=4, sites=2, size=16)
    df = pd.read_csv(csv)
    df["Metadata_pert_iname"] = ["DMSO", "DMSO", "DMSO ", " dmso", "Dmso", "taxol", "Taxol", "x"]
    df.to_csv(csv, index=False)
    convert(_cfg(csv), tmp_path / "s.zarr")
    err = capsys.readouterr().err
    assert "'Dmso' (1), 'dmso' (1) -> 'DMSO' (3)" in err and "'taxol' (1) -> 'Taxol' (1)" in err
    st = open_store(tmp_path / "s.zarr")
    assert st.metadata["Metadata_pert_iname"].value_counts().to_dict() == {
        "DMSO": 5, "Taxol": 2, "x": 1}  # fmt: skip
    assert st.attrs["source"]["label_case_merged"] == [
        "'Dmso' (1), 'dmso' (1) -> 'DMSO' (3)", "'taxol' (1) -> 'Taxol' (1)"]  # fmt: skip


def test_a_label_with_a_control_character_is_quarantined(tmp_path: Path) -> None:
    csv = make_loaddata(tmp_path, plates=1, wells=2, sites=2, size=16)
    df = pd.read_csv(csv)
    df["Metadata_pert_iname"] = ["DMSO", "DMSO\x00", "DM\x07SO", "DMSO\t"]  # the tab is trimmed
    df.to_csv(csv, index=False)
    summary = convert(_cfg(csv), tmp_path / "s.zarr")
    st = open_store(tmp_path / "s.zarr")
    assert summary["images"] == 2 and set(st.metadata["Metadata_pert_iname"]) == {"DMSO"}
    assert sorted(st.quarantine["reason"]) == [
        "label 'DMSO\\x00' in column Metadata_pert_iname holds a control character",
        "label 'DM\\x07SO' in column Metadata_pert_iname holds a control character",
    ]


def test_the_index_merges_case_variants_of_stores_converted_before(caplog) -> None:
    """A store converted before the rule still cannot split a class by case; a control
    character makes a label missing there."""
    from cellmorph.labels import _encode_raw, encode_labels

    md = pd.DataFrame({"y": ["DMSO", "dmso ", "DMSO", "Taxol", "taxol", "a\x00", None, " "]})
    with caplog.at_level("WARNING", logger="cellmorph.labels"):
        codes, names = _encode_raw(md, "y")
    assert list(names) == ["DMSO", "Taxol"]
    assert codes.tolist() == [0, 0, 0, 1, 1, -1, -1, -1]
    assert "'dmso' (1) -> 'DMSO' (2)" in caplog.text and "control character" in caplog.text
    assert encode_labels(md, "y", ["DMSO", "Taxol"]).tolist() == codes.tolist()


# --------------------------------------------------------------------------- inspect, --out


def test_inspect_with_an_unknown_label_column_names_the_columns(tmp_path: Path, capsys) -> None:
    csv = make_loaddata(tmp_path, plates=1, wells=1, sites=2, size=16)
    convert(_cfg(csv), tmp_path / "s.zarr")
    capsys.readouterr()
    assert conversion_main(["inspect", str(tmp_path / "s.zarr"), "--label-column", "Nope"]) == 2
    _one_line(capsys.readouterr().err, "--label-column Nope", "Metadata_pert_iname, sid")


def test_out_through_a_loop_of_links_is_one_line(tmp_path: Path, capsys) -> None:
    csv = make_loaddata(tmp_path, plates=1, wells=1, sites=1, size=16)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "file").write_text("x")
    for out in ("loop", "loop/s.zarr", "file/s.zarr"):
        rc = conversion_main(["convert", "--load-data", str(csv), "--out", str(tmp_path / out),
                              "--size", "16", "--workers", "1"])  # fmt: skip
        assert rc == 2
        _one_line(capsys.readouterr().err, f"--out {tmp_path / out}", "cannot be a store path")
    assert not (tmp_path / ".loop.writer").exists()


def test_overwrite_through_dot_dot_replaces_the_store_and_leaves_nothing(tmp_path: Path) -> None:
    """``s.zarr/images/..`` is s.zarr: its writer's folder and the new build belong beside it
    (before: built inside the store, then EBUSY renaming "..", 16 MB left behind)."""
    csv = make_loaddata(tmp_path, plates=1, wells=2, sites=2, size=16)
    store = tmp_path / "s.zarr"
    convert(_cfg(csv), store)
    before = open_store(store).attrs["generation"]
    summary = convert(_cfg(csv), store / "images" / "..", overwrite=True)
    assert summary["store"] == str(store) and summary["replaced"]
    assert open_store(store).attrs["generation"] != before
    assert sorted(p.name for p in store.iterdir() if p.name.endswith(".writer")) == []
    assert sorted(p.name for p in (store / "images").iterdir()) == ["c", "zarr.json"]
    assert not ownership.staging(store).exists()
    assert_aligned(store)


def test_a_failed_swap_keeps_the_old_store_and_removes_the_build(tmp_path: Path,
                                                                  monkeypatch) -> None:  # fmt: skip
    csv = make_loaddata(tmp_path, plates=1, wells=2, sites=2, size=16)
    store = tmp_path / "s.zarr"
    convert(_cfg(csv), store)
    before = open_store(store).attrs["generation"]

    def busy(a: Path, b: Path) -> bool:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(b))

    monkeypatch.setattr(ownership, "_exchange", busy)
    with pytest.raises(CellmorphError, match="cannot put the new store in place .*unchanged"):
        convert(_cfg(csv), store, overwrite=True)
    assert open_store(store).attrs["generation"] == before
    assert not ownership.staging(store).exists()


def test_binary_config_is_one_line_naming_it(tmp_path: Path, capsys) -> None:
    csv = make_loaddata(tmp_path, plates=1, wells=1, sites=1, size=16)
    binary = tmp_path / "model.yaml"
    binary.write_bytes(bytes(range(256)) * 4)  # byte 0x80 is not UTF-8
    nul = tmp_path / "nul.yaml"
    nul.write_text("convert:\n  size: 16\n\x00\n")  # text, but not YAML (a NUL character)
    for cfg, words in ((binary, ["is not text", "give a YAML file"]), (nul, ["not valid YAML"])):
        rc = conversion_main(["convert", "--config", str(cfg), "--load-data", str(csv),
                              "--out", str(tmp_path / "s.zarr")])  # fmt: skip
        assert rc == 2
        _one_line(capsys.readouterr().err, str(cfg), *words)


# --------------------------------------------------------------------------- closed stdout


def _cellmorph(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "cellmorph"
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "cellmorph", *args]


def _reader_leaves(argv: list[str], cwd: Path) -> tuple[int, str]:
    """Run a command whose stdout pipe is closed before it writes (``| head -0``, at once)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()
    err = p.stderr.read().decode()
    return p.wait(timeout=300), err


def test_a_reader_that_leaves_early_changes_no_exit_status(tmp_path: Path) -> None:
    """``cellmorph convert ... | head -1`` after a complete store exits 0, ``inspect --verify``
    still verifies (0, or 2 for a damaged store), ``synth`` writes its plate: no traceback."""
    csv = make_loaddata(tmp_path, plates=1, wells=2, sites=2, size=16)
    rc, err = _reader_leaves(_cellmorph("convert", "--load-data", str(csv), "--out", "s.zarr",
                                        "--size", "16", "--workers", "1"), tmp_path)  # fmt: skip
    assert rc == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
    assert len(open_store(tmp_path / "s.zarr")) == 4
    rc, err = _reader_leaves(_cellmorph("inspect", "s.zarr", "--verify"), tmp_path)
    assert rc == 0 and "Traceback" not in err, err
    chunk = next(p for p in (tmp_path / "s.zarr" / "images" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:-40] + bytes(40))  # damage: verify must still say so
    rc, err = _reader_leaves(_cellmorph("inspect", "s.zarr", "--verify"), tmp_path)
    assert rc == 2 and "failed verification" in err and "Traceback" not in err, err
    rc, err = _reader_leaves(_cellmorph("synth", "raw", "--plates", "1", "--rows", "1",
                                        "--cols", "2", "--sites", "1", "--size", "32"),
                             tmp_path)  # fmt: skip
    assert rc == 0 and "Traceback" not in err, err
    assert (tmp_path / "raw" / "load_data.csv").is_file()


def test_closed_pipe_in_a_shell_pipeline_exits_zero(tmp_path: Path) -> None:
    """The same through bash with pipefail, as a user types it."""
    csv = make_loaddata(tmp_path, plates=1, wells=1, sites=2, size=16)
    convert(_cfg(csv), tmp_path / "s.zarr")
    cmd = " ".join(_cellmorph("inspect", "s.zarr", "--verify"))
    p = subprocess.run(["bash", "-o", "pipefail", "-c", f"{cmd} | head -c0"], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr


# --------------------------------------------------------------------------- docs


def test_every_test_docs_integrity_names_exists() -> None:
    """docs/integrity.md's guarantees each name the test that checks them: those tests exist."""
    import re

    text = (REPO / "docs" / "integrity.md").read_text()
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", text)
    assert len(named) >= 20
    missing = [
        f"{f}::{t}"
        for f, t in named
        if not re.search(rf"^def {t}\(", (REPO / "tests" / f).read_text(), re.M)
    ]
    assert missing == []
