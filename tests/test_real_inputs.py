"""Real inputs: the original study's files, the JUMP pilot's plate maps, strings, keys, pixel scale.

The plate maps and metadata tables under ``tests/fixtures/cpjump1`` are the pilot's own files
(see the README there). Expected labels are computed here with the csv module, independently of
the code under test.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellmorph.config import ConvertConfig, load_config
from cellmorph.errors import CellmorphError
from cellmorph.store import open_store
from conversion.__main__ import main as convert_main
from conversion.cli import add_convert_arguments, config_from_args
from conversion.layouts import column_ids, load_inputs, reason_kind
from conversion.pack import convert

CPJUMP1 = Path(__file__).parent / "fixtures" / "cpjump1"
BARCODES = CPJUMP1 / "barcode_platemap.csv"
COMPOUNDS = CPJUMP1 / "external_metadata" / "JUMP-Target-1_compound_metadata.tsv"
CRISPR = CPJUMP1 / "external_metadata" / "JUMP-Target-1_crispr_metadata.tsv"
COMPOUND_PLATES = ["BR00116991", "BR00117010"]
CRISPR_PLATE, ORF_PLATE = "BR00118041", "BR00117006"
CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
ALL_WELLS = [f"{r}{c:02d}" for r in "ABCDEFGHIJKLMNOP" for c in range(1, 25)]


def tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def expected_compound_labels() -> dict[str, str]:
    """Well -> pert_iname of the compound map, DMSO for the solvent wells (the oracle)."""
    names = {r["broad_sample"]: r["pert_iname"] for r in tsv(COMPOUNDS)}
    pm = tsv(CPJUMP1 / "platemap" / "JUMP-Target-1_compound_platemap.txt")
    return {r["well_position"]: names[r["broad_sample"]] if r["broad_sample"] else r["solvent"] for r in pm}  # fmt: skip


def write_loaddata(
    path: Path, plates: list[str], wells: list[str], folder: str = "/nowhere"
) -> Path:
    """A LoadData CSV like the pilot's (no labels); files need not exist for table-level tests."""
    rows = []
    for plate in plates:
        for well in wells:
            row = {"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": "1"}
            for k, ch in enumerate(["Mito", "AGP", "RNA", "ER", "DNA"]):
                row[f"FileName_Orig{ch}"] = f"{plate}_{well}_ch{k + 1}.tiff"
                row[f"PathName_Orig{ch}"] = folder
            rows.append(row)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def pilot_cfg(csv_path: Path, **kw) -> ConvertConfig:
    return ConvertConfig(
        load_data=str(csv_path), barcode_platemap=str(BARCODES), size=16, workers=1,
        external_metadata=[str(COMPOUNDS), str(CRISPR)], **kw,
    )  # fmt: skip


def reasons_of(inputs) -> list[str]:
    return [q["reason"] for q in inputs.quarantine]


# ------------------------------------------------------------------ JUMP plate maps, real files


def test_compound_map_labels_all_384_wells_of_every_plate(tmp_path: Path) -> None:
    inputs = load_inputs(pilot_cfg(write_loaddata(tmp_path / "ld.csv", COMPOUND_PLATES, ALL_WELLS)))
    assert inputs.quarantine == []
    sites = inputs.sites
    assert len(sites) == 2 * 384
    oracle = expected_compound_labels()
    for plate in COMPOUND_PLATES:
        one = sites[sites.Metadata_Plate == plate]
        assert dict(zip(one.Metadata_Well, one.Metadata_pert_iname)) == oracle
        assert one.Metadata_pert_iname.nunique() == 303
        assert (one.Metadata_pert_iname == "DMSO").sum() == 64
        counts = one.Metadata_control_type.value_counts().to_dict()
        # Treated compounds' control_type is the literal string NA in the table: kept as text.
        assert counts == {"NA": 260, "negcon": 64, "poscon_diverse": 28, "poscon_cp": 26, "poscon_orf": 6}  # fmt: skip
    dmso = sites[sites.Metadata_pert_iname == "DMSO"].iloc[0]
    assert dmso.Metadata_broad_sample == "DMSO" and dmso.Metadata_solvent == "DMSO"
    assert dmso.Metadata_Plate_Map_Name == "JUMP-Target-1_compound_platemap"
    treated = sites[sites.Metadata_Well == "A01"].iloc[0]
    assert treated.Metadata_broad_sample == "BRD-A86665761-001-01-1"
    assert treated.Metadata_pert_iname == "gabapentin-enacarbil"


def test_crispr_map_joins_broad_sample_to_gene(tmp_path: Path) -> None:
    csv_path = write_loaddata(tmp_path / "ld.csv", [CRISPR_PLATE], ALL_WELLS)
    inputs = load_inputs(pilot_cfg(csv_path, label_column="Metadata_broad_sample"))
    gene = {r["broad_sample"]: r["gene"] for r in tsv(CRISPR)}
    pm = {r["well_position"]: r["broad_sample"] for r in tsv(CPJUMP1 / "platemap" / "JUMP-Target-1_crispr_platemap.txt")}  # fmt: skip
    sites = inputs.sites
    assert len(sites) == 380
    for well, sample, g in zip(
        sites.Metadata_Well, sites.Metadata_broad_sample, sites.Metadata_gene
    ):
        assert sample == pm[well] and g == gene[sample]
    assert (sites.Metadata_gene != "").sum() == 320 and len(set(sites.Metadata_gene) - {""}) == 160
    empty = sorted(w for w, s in pm.items() if not s)
    assert sorted(q["well"] for q in inputs.quarantine) == empty
    assert all("empty broad_sample and no solvent" in r for r in reasons_of(inputs))


def test_mixed_plate_types_each_plate_uses_its_own_map(tmp_path: Path) -> None:
    plates = [COMPOUND_PLATES[0], CRISPR_PLATE, ORF_PLATE, "BR99999999"]
    csv_path = write_loaddata(tmp_path / "ld.csv", plates, ["A01", "A02", "B03"])
    inputs = load_inputs(pilot_cfg(csv_path, label_column="Metadata_broad_sample"))
    by = {(r.Metadata_Plate, r.Metadata_Well): r for r in inputs.sites.itertuples()}
    assert by[(COMPOUND_PLATES[0], "A02")].Metadata_pert_iname == "DMSO"
    assert by[(COMPOUND_PLATES[0], "A01")].Metadata_gene == ""  # compound rows lack CRISPR columns
    assert by[(CRISPR_PLATE, "A01")].Metadata_gene == "HIF1A"
    assert by[(CRISPR_PLATE, "A01")].Metadata_pert_iname == ""  # not guessed from another plate
    assert len(inputs.sites) == 6
    q = pd.DataFrame(inputs.quarantine)
    orf = q[q.plate == ORF_PLATE]
    assert (
        len(orf) == 3 and orf.reason.str.contains("in none of the external metadata tables").all()
    )
    unknown = q[q.plate == "BR99999999"]
    assert len(unknown) == 3 and unknown.reason.str.contains("not in barcode_platemap").all()
    assert reason_kind(orf.reason.iloc[0])[1].startswith("--external-metadata")


def test_well_missing_from_map_and_missing_map_file(tmp_path: Path) -> None:
    csv_path = write_loaddata(tmp_path / "ld.csv", [COMPOUND_PLATES[0]], ["A01", "Q01", " a02 "])
    inputs = load_inputs(pilot_cfg(csv_path))
    assert reasons_of(inputs) == ["well Q01 is not in plate map JUMP-Target-1_compound_platemap"]
    assert list(inputs.sites.Metadata_pert_iname) == ["gabapentin-enacarbil", "DMSO"]
    (tmp_path / "maps").mkdir()
    with pytest.raises(CellmorphError, match=r"plate map not found: .*maps/JUMP-Target-1_compound_platemap.txt"):  # fmt: skip
        load_inputs(pilot_cfg(csv_path, platemap_dir=str(tmp_path / "maps")))


def _tiny_pilot(root: Path, *, platemap: str, metadata: str, barcodes: str) -> ConvertConfig:
    """A plate map, metadata table and barcode table written as given (separators vary)."""
    (root / "platemap").mkdir(parents=True, exist_ok=True)
    (root / "platemap" / "m1.txt").write_text(platemap)
    (root / "meta.csv").write_text(metadata)  # named .csv, content decides the separator
    (root / "bp.tsv").write_text(barcodes)
    csv_path = write_loaddata(root / "ld.csv", ["P1"], ["A01", "A02", "A03", "A04"])
    return ConvertConfig(
        load_data=str(csv_path), barcode_platemap=str(root / "bp.tsv"),
        external_metadata=[str(root / "meta.csv")], size=16,
    )  # fmt: skip


def test_na_is_a_name_and_separators_come_from_content(tmp_path: Path) -> None:
    cfg = _tiny_pilot(
        tmp_path,
        platemap="well_position,broad_sample,solvent\nA01,BRD-1,DMSO\nA02,,DMSO\nA03,BRD-2,DMSO\nA04,BRD-3,DMSO\n",
        metadata="broad_sample\tpert_iname\tcontrol_type\nBRD-1\tNA\tNA\nNA\tDMSO\tnegcon\nBRD-2\tNone\t\nBRD-3\tnull\tNA\n",
        barcodes="Assay_Plate_Barcode,Plate_Map_Name\nP1,m1\n",
    )  # fmt: skip
    sites = load_inputs(cfg).sites
    assert list(sites.Metadata_pert_iname) == ["NA", "DMSO", "None", "null"]
    assert list(sites.Metadata_broad_sample) == ["BRD-1", "DMSO", "BRD-2", "BRD-3"]
    assert list(sites.Metadata_control_type) == ["NA", "negcon", "", "NA"]


def test_ambiguous_sample_and_plate_with_two_maps(tmp_path: Path) -> None:
    cfg = _tiny_pilot(
        tmp_path,
        platemap="well_position\tbroad_sample\nA01\tBRD-1\nA02\tBRD-2\nA03\tBRD-2\nA04\t\n",
        metadata="broad_sample\tpert_iname\nBRD-1\tx\nBRD-1\tx\nBRD-2\ty\nBRD-2\tz\n",
        barcodes="Assay_Plate_Barcode\tPlate_Map_Name\nP1\tm1\n",
    )  # identical repeated rows collapse; different rows for one key are ambiguous
    inputs = load_inputs(cfg)
    assert list(inputs.sites.Metadata_pert_iname) == ["x"]
    reasons = reasons_of(inputs)
    assert (
        sum("broad_sample BRD-2 has several different rows in meta.csv" in r for r in reasons) == 2
    )
    assert any("well A04 of plate map m1: empty broad_sample and no solvent" in r for r in reasons)
    (tmp_path / "bp.tsv").write_text("Assay_Plate_Barcode,Plate_Map_Name\nP1,m1\nP1,m2\n")
    with pytest.raises(CellmorphError, match="plate P1 has several maps"):
        load_inputs(cfg)


# ------------------------------------------------------------ images: small TIFFs in tmp_path


def write_channels(folder: Path, plate: str, well: str, value: int, size: int = 20) -> dict:
    """Five single-channel TIFFs named like the pilot's (ch1..ch5 = Mito, AGP, RNA, ER, DNA)."""
    folder.mkdir(parents=True, exist_ok=True)
    row = {"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": 1}
    for k, ch in enumerate(["Mito", "AGP", "RNA", "ER", "DNA"]):
        name = f"{plate}_{well}_ch{k + 1}.tiff"
        tifffile.imwrite(folder / name, np.full((size, size), value + k, np.uint16))
        row[f"FileName_Orig{ch}"], row[f"PathName_Orig{ch}"] = name, str(folder)
    return row


def test_cpjump1_yaml_convert_section_works_as_shipped(tmp_path: Path) -> None:
    wells = ["A01", "A02", "A03", "P24"]
    rows = [write_channels(tmp_path / "img", "BR00116991", w, 100 * i) for i, w in enumerate(wells)]
    pd.DataFrame(rows).to_csv(tmp_path / "load_data_with_illum.csv", index=False)
    shipped = load_config("configs/cpjump1.yaml").convert
    assert Path(shipped.barcode_platemap).name == "barcode_platemap.csv"
    assert [Path(p).name for p in shipped.external_metadata] == [COMPOUNDS.name]
    # Only the locations change: every other convert key is the shipped one.
    cfg = load_config(
        "configs/cpjump1.yaml",
        [f"convert.load_data={tmp_path / 'load_data_with_illum.csv'}",
         f"convert.barcode_platemap={BARCODES}", f"convert.external_metadata=[{COMPOUNDS}]",
         "convert.size=16", "convert.workers=1"],
    ).convert  # fmt: skip
    summary = convert(cfg, tmp_path / "s.zarr")
    assert summary["images"] == 4 and summary["quarantined"] == 0
    st = open_store(tmp_path / "s.zarr")
    oracle = expected_compound_labels()
    assert list(st.metadata.Metadata_pert_iname) == [oracle[w] for w in wells]
    assert st.channels == CHANNELS and st.attrs["codec"] == "lz4"
    # channels by name: DNA is ch5 (value + 4), Mito ch1 (value + 0)
    assert int(st.images[1, 0].mean()) == 104 and int(st.images[1, 4].mean()) == 100


def test_cli_and_ray_job_take_the_plate_map_options(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)  # the Ray job registers exactly these
    args = parser.parse_args(
        ["--load-data", "x.csv", "--out", "s.zarr", "--barcode-platemap", str(BARCODES),
         "--external-metadata", str(COMPOUNDS), "--external-metadata", str(CRISPR),
         "--platemap-dir", "maps"]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert cfg.barcode_platemap == str(BARCODES) and cfg.platemap_dir == "maps"
    assert cfg.external_metadata == [str(COMPOUNDS), str(CRISPR)]
    from ray_jobs.convert import main as ray_main

    assert ray_main(["--out", str(tmp_path / "s"), "--channels", "DNA,DNA"]) == 2


# --------------------------------------------------------------------- the original study


def phenix(row: int, col: int, field: int) -> str:
    return f"r{row:02d}c{col:02d}f{field:02d}"


STUDY_WELLS = [(1, 1, "gabapentin-enacarbil"), (1, 2, "DMSO"), (2, 3, "NA"), (2, 4, "amlodipine")]


def make_study(
    root: Path, rgb: bool = False, size: int = 32, labels: bool = True, wells=STUDY_WELLS
) -> Path:
    """The study's plate folder: ``downsampled_data/<site>_median_aggregated.tiff`` (grey) and
    ``metadata_BR00116991.csv`` whose FileName_OrigRNA cells hold padded, upper-case Phenix names.
    Each site's pixels are ``1000 + 10 * sid``, so the store shows which file each row got."""
    data = root / "downsampled_data"
    data.mkdir(parents=True)
    rows, sid = [], 0
    for r, c, label in wells:
        for f in (1, 2, 3):
            ident = phenix(r, c, f)
            px = np.full((size, size), 1000 + 10 * sid, np.uint16)
            if rgb:
                tifffile.imwrite(data / f"{ident}_median_aggregated.tiff", np.stack([px.astype(np.uint8)] * 3, -1), photometric="rgb")  # fmt: skip
            else:
                tifffile.imwrite(data / f"{ident}_median_aggregated.tiff", px)
            name = f"{ident.upper()}P01-CH3SK1FK1FL1.TIFF"
            padded = [f" {name} ", name.lower(), f"  {name}"][f - 1]
            row = {"Metadata_Plate": "BR00116991", "Metadata_Well": f"{'ABCDEFGH'[r - 1]}{c:02d}",
                   "Metadata_Site": f, "FileName_OrigRNA": padded,
                   "PathName_OrigRNA": "/home/ubuntu/bucket/images", "sid": sid}  # fmt: skip
            if labels:
                row["Metadata_pert_iname"] = label
            rows.append(row)
            sid += 1
    tifffile.imwrite(data / "r09c09f09_median_aggregated.tiff", np.zeros((size, size), np.uint16))
    rows.append({**rows[0], "FileName_OrigRNA": " R07C07F07P01-CH3SK1FK1FL1.TIFF", "Metadata_Well": "G07", "sid": 99})  # fmt: skip
    meta = root / "metadata_BR00116991.csv"
    pd.DataFrame(rows).to_csv(meta, index=False)
    return meta


STUDY_ARGS = ["--images", "downsampled_data", "--metadata", "metadata_BR00116991.csv",
              "--id-pattern", r"(r\d{2}c\d{2}f\d{2})", "--id-column", "FileName_OrigRNA"]  # fmt: skip


def test_id_pattern_reads_ids_inside_file_names_in_the_id_column() -> None:
    import re

    pattern = re.compile(r"(r\d{2}c\d{2}f\d{2})", re.IGNORECASE)
    cells = pd.Series([" R08C20F01P01-CH3SK1FK1FL1.TIFF ", "r08c20f02", " img7 "])
    assert list(column_ids(cells, pattern)) == ["r08c20f01", "r08c20f02", "img7"]


def test_original_study_layout_command_from_the_issue(tmp_path: Path, capsys, monkeypatch) -> None:
    make_study(tmp_path)
    monkeypatch.chdir(tmp_path)
    rc = convert_main(["convert", *STUDY_ARGS, "--channels", "median", "--out", "s.zarr", "--size", "24", "--workers", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    st = open_store(tmp_path / "s.zarr")
    assert st.channels == ["median"] and st.shape == (12, 1, 24, 24)
    md = st.metadata
    for i, sid in enumerate(md.sid):
        assert int(st.images[i].mean()) == 1000 + 10 * int(sid)  # the right file under each row
        assert md.Metadata_pert_iname[i] == STUDY_WELLS[int(sid) // 3][2]  # and its row's label
    assert list(md.Metadata_Site) == [1, 2, 3] * 4 and md.Metadata_Site.dtype == np.int64
    reasons = " | ".join(st.quarantine.reason)
    assert "no metadata row for id 'r09c09f09'" in reasons
    assert "FileName_OrigRNA=R07C07F07P01-CH3SK1FK1FL1.TIFF (id 'r07c07f07'): no file" in reasons
    assert "quarantine reasons (most frequent first):" in out
    assert "1  image file without a metadata row" in out and "1  metadata row without an image file" in out  # fmt: skip


def test_study_rgb_files_with_default_channels_stop_with_the_fix(tmp_path: Path, capsys, monkeypatch) -> None:  # fmt: skip
    make_study(tmp_path, rgb=True)
    monkeypatch.chdir(tmp_path)
    rc = convert_main(["convert", *STUDY_ARGS, "--out", "s.zarr", "--size", "24"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    # 12 sites fail on the channels, the stray file and the row without a file for their own reason
    assert "file holds 3 channel(s), fewer than the names given (12)" in err
    assert "fix: --channels (or --file-channels, in file order) must name only" in err
    assert not (tmp_path / "s.zarr" / "zarr.json").exists()
    q = pd.read_csv(tmp_path / "s.zarr" / "quarantine.csv")
    assert len(q) == 14


def test_every_site_for_one_reason_stops_naming_reason_count_and_option(tmp_path: Path) -> None:
    meta = make_study(tmp_path, rgb=True)
    df = pd.read_csv(meta, keep_default_na=False)  # a compound named NA stays NA
    df.iloc[:12].to_csv(meta, index=False)  # only rows with files
    (tmp_path / "downsampled_data" / "r09c09f09_median_aggregated.tiff").unlink()
    cfg = ConvertConfig(images=str(tmp_path / "downsampled_data"), metadata=str(meta),
                        id_pattern=r"(r\d{2}c\d{2}f\d{2})", id_column="FileName_OrigRNA", size=24)  # fmt: skip
    with pytest.raises(CellmorphError) as e:
        convert(cfg, tmp_path / "s.zarr")
    msg = str(e.value)
    assert "all 12 inputs were quarantined for the same reason: file holds 3 channel(s)" in msg
    assert "fix: --channels (or --file-channels, in file order)" in msg


def test_study_layout_labelled_through_the_pilot_plate_map(tmp_path: Path) -> None:
    meta = make_study(tmp_path, labels=False)
    cfg = ConvertConfig(
        images=str(tmp_path / "downsampled_data"), metadata=str(meta), id_pattern=r"(r\d{2}c\d{2}f\d{2})",
        id_column="FileName_OrigRNA", channels=["median"], size=24, workers=1,
        barcode_platemap=str(BARCODES), external_metadata=[str(COMPOUNDS)],
    )  # fmt: skip
    convert(cfg, tmp_path / "s.zarr")
    md = open_store(tmp_path / "s.zarr").metadata
    oracle = expected_compound_labels()
    assert len(md) == 12 and list(md.Metadata_pert_iname) == [oracle[w] for w in md.Metadata_Well]
    assert set(md.Metadata_pert_iname) >= {"DMSO"}


@pytest.mark.slow
def test_one_channel_store_trains_reports_and_predicts(tmp_path: Path, monkeypatch) -> None:
    from cellmorph.cli import main

    wells = [(r, c, f"cmpd{c % 2}") for r in (1, 2) for c in range(1, 5)]  # 2 classes x 4 wells
    make_study(tmp_path, size=40, wells=wells)
    store = tmp_path / "s.zarr"
    monkeypatch.chdir(tmp_path)
    args = ["convert", *STUDY_ARGS, "--channels", "median", "--out", str(store), "--size", "32"]
    assert main([*args, "--workers", "1"]) == 0
    monkeypatch.chdir(Path(__file__).parent.parent)  # configs/ is read from the project root
    assert open_store(store).shape == (24, 1, 32, 32)
    run_root = tmp_path / "runs"
    overrides = [f"run_root={run_root}", f"data.store={store}", "name=grey", "train.epochs=1",
                 "train.min_steps=0", "data.test_fraction=0",
                 "data.val_fraction=0.5", "loader.batch_size=4", "loader.eval_batch_size=8",
                 "loader.image_size=24", "loader.num_workers=0", "model.width_mult=0.35",
                 "ray.num_workers=1", "eval.sample_grid_per_class=1", "eval.tsne_max_points=10"]  # fmt: skip
    assert main(["train", "--local", "--config", "configs/demo.yaml", *overrides]) == 0
    run_dir = run_root / "grey"
    assert main(["evaluate", str(run_dir)]) == 0
    assert (run_dir / "report.html").is_file()
    assert main(["predict", "--checkpoint", str(run_dir / "checkpoints" / "best.pt"),
                 "--store", str(store), "--out", str(tmp_path / "pred")]) == 0  # fmt: skip
    assert len(pd.read_parquet(tmp_path / "pred" / "predictions.parquet")) == 24


# ------------------------------------------------------------ strings, keys and pixel scale


def test_label_strings_stay_labels_and_empty_is_empty(tmp_path: Path) -> None:
    labels = ["NA", "None", "null", "nan", "N/A", "#N/A", "", "  "]
    rows = [{**write_channels(tmp_path / "img", "0001", f"A{i + 1:02d}", 100), "Metadata_pert_iname": lab,
             "Metadata_broad_sample": "NA"} for i, lab in enumerate(labels)]  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / "ld.csv", index=False)
    summary = convert(ConvertConfig(load_data=str(tmp_path / "ld.csv"), size=16, workers=1), tmp_path / "s.zarr")  # fmt: skip
    assert summary["images"] == 6 and summary["quarantined"] == 2
    md = open_store(tmp_path / "s.zarr").metadata
    assert list(md.Metadata_pert_iname) == labels[:6]
    assert list(md.Metadata_broad_sample) == ["NA"] * 6 and set(md.Metadata_Plate) == {"0001"}
    assert summary["quarantine_reasons"] == [
        {
            "reason": "no label in column Metadata_pert_iname",
            "count": 2,
            "fix": "--label-column, or --allow-unlabeled",
        }  # fmt: skip
    ]


def test_key_columns_are_validated(tmp_path: Path) -> None:
    rows = [write_channels(tmp_path / "img", "P1", f"A{i + 1:02d}", 100) for i in range(6)]
    sites = ["1", "", "x", "2.0", "3", "4"]
    for row, site in zip(rows, sites):
        row.update(Metadata_Site=site, Metadata_pert_iname="d")
    rows[4]["Metadata_Plate"], rows[5]["Metadata_Well"] = " ", ""
    pd.DataFrame(rows).to_csv(tmp_path / "ld.csv", index=False)
    convert(
        ConvertConfig(load_data=str(tmp_path / "ld.csv"), size=16, workers=1), tmp_path / "s.zarr"
    )
    st = open_store(tmp_path / "s.zarr")
    assert list(st.metadata.Metadata_Site) == [1, 2] and st.metadata.Metadata_Site.dtype == np.int64
    assert list(st.metadata.Metadata_Well) == ["A01", "A04"]
    assert sorted(st.quarantine.reason) == sorted(
        [
            "empty Metadata_Site",
            "Metadata_Site 'x' is not a whole number",
            "empty Metadata_Plate",
            "empty Metadata_Well",
        ]  # fmt: skip
    )


def test_8bit_site_among_16bit_sites_is_quarantined(tmp_path: Path) -> None:
    rows = [{**write_channels(tmp_path / "img", "P1", f"A{i + 1:02d}", 3000), "Metadata_pert_iname": "d"} for i in range(3)]  # fmt: skip
    for k in range(1, 6):  # every channel of site A03 saved as 8-bit
        path = tmp_path / "img" / f"P1_A03_ch{k}.tiff"
        tifffile.imwrite(path, np.full((20, 20), 14, np.uint8))
    pd.DataFrame(rows).to_csv(tmp_path / "ld.csv", index=False)
    summary = convert(ConvertConfig(load_data=str(tmp_path / "ld.csv"), size=16, workers=1), tmp_path / "s.zarr")  # fmt: skip
    assert summary["images"] == 2
    q = open_store(tmp_path / "s.zarr").quarantine
    assert list(q.well) == ["A03"]
    assert q.reason[0].startswith("uint8 TIFFs among uint16 sites (2 of 3 sites are uint16)")


def test_images_smaller_than_size_are_not_upsampled(tmp_path: Path) -> None:
    rows = [{**write_channels(tmp_path / "img", "P1", f"A{i + 1:02d}", 100, size=s), "Metadata_pert_iname": "d"} for i, s in enumerate([20, 4])]  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / "ld.csv", index=False)
    summary = convert(ConvertConfig(load_data=str(tmp_path / "ld.csv"), size=16, workers=1), tmp_path / "s.zarr")  # fmt: skip
    assert summary["images"] == 1
    assert open_store(tmp_path / "s.zarr").quarantine.reason[0].startswith("image 4x4 is smaller than --size 16")  # fmt: skip
    with pytest.raises(
        CellmorphError,
        match=r"all 2 inputs .* same reason: image smaller than --size 24; fix: a smaller --size",
    ):
        convert(ConvertConfig(load_data=str(tmp_path / "ld.csv"), size=24, workers=1), tmp_path / "t.zarr")  # fmt: skip


@pytest.mark.parametrize(
    ("value", "message"), [(0.0, "zero or negative"), (np.nan, "NaN or infinite")]
)
def test_broken_illumination_function_stops(tmp_path: Path, value: float, message: str) -> None:
    rows = [{**write_channels(tmp_path / "img", "P1", "A01", 100), "Metadata_pert_iname": "d"}]
    pd.DataFrame(rows).to_csv(tmp_path / "ld.csv", index=False)
    illum = tmp_path / "illum"
    illum.mkdir()
    for ch in CHANNELS:
        fn = np.ones((20, 20), np.float32)
        if ch == "RNA":
            fn[:5] = value
        np.save(illum / f"P1_Illum{ch}.npy", fn)
    cfg = ConvertConfig(
        load_data=str(tmp_path / "ld.csv"), size=16, workers=1, illum_dir=str(illum)
    )
    with pytest.raises(CellmorphError, match=f"P1_IllumRNA.npy has 100 {message}"):
        convert(cfg, tmp_path / "s.zarr")


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--channels", "DNA,DNA,ER"], "convert.channels (--channels): DNA named more than once"),
     (["--channels", ","], "convert.channels (--channels): empty channel name"),
     (["--channels", "DNA,,ER"], "empty channel name in 'DNA,,ER'"),
     (["--file-channels", "A,A"], "convert.file_channels (--file-channels): A named more than once"),
     (["--size", "100000"], "convert.size (--size) 100000 is larger than 2048")],
)  # fmt: skip
def test_impossible_settings_stop_before_any_work(tmp_path: Path, capsys, args, message) -> None:
    # The CSV does not exist: the settings message comes first, so nothing was read.
    rc = convert_main(["convert", "--load-data", str(tmp_path / "none.csv"), "--out", str(tmp_path / "s"), *args])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "s").exists()
