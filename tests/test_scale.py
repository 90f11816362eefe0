"""What keeps memory bounded at millions of images: the metadata shared per node and read a row
group at a time, sampled profiles and figures, vectorized conversion planning."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import make_store

from cellmorph import store as cstore
from cellmorph.sampling import (
    PROFILE_MAX_WELLS,
    PROFILE_NEGCON_WELLS,
    PROFILE_PER_TREATMENT,
    sample_wells,
)


@pytest.fixture
def store_path(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setattr(cstore.write, "METADATA_ROW_GROUP", 7)  # many row groups in a small table
    (tmp_path / "node-tmp").mkdir()  # this test's own node-wide cache folder
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "node-tmp"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "node-tmp"))  # for the processes it starts
    return make_store(tmp_path / "store.zarr", plates=2, wells=4, sites=3)


def _cache_files(tmp: Path) -> list[Path]:
    return sorted((tmp / cstore.SHARED_CACHE).glob("*.arrow"))


def test_projected_metadata_equals_the_full_table_and_is_memory_mapped(store_path, tmp_path):
    full = cstore.open_store(store_path)
    shared = cstore.open_store(store_path, columns=["Metadata_pert_iname", "no_such_column"])
    wanted = [*cstore.KEYS, "Metadata_pert_iname", cstore.CHECKSUM, cstore.CHUNK_CRC]
    assert sorted(shared.metadata.columns) == sorted(wanted)
    pd.testing.assert_frame_equal(shared.metadata, full.metadata[list(shared.metadata.columns)])
    (cache,) = _cache_files(tmp_path / "node-tmp")
    maps = Path("/proc/self/maps").read_text()
    assert str(cache) in maps  # the columns live in the mapped file, not in this process


def test_processes_of_a_node_share_one_cache_file(store_path, tmp_path):
    cstore.open_store(store_path, columns=["Metadata_pert_iname"])
    (cache,) = _cache_files(tmp_path / "node-tmp")
    inode = cache.stat().st_ino
    code = ("import sys; from cellmorph.store import open_store; "
            "s = open_store(sys.argv[1], columns=['Metadata_pert_iname']); "
            "print(len(s.metadata))")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code, str(store_path)], env=env, text=True,
                         capture_output=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "24"
    assert _cache_files(tmp_path / "node-tmp") == [cache] and cache.stat().st_ino == inode


def test_an_unusable_temporary_folder_keeps_the_columns_in_memory(store_path, tmp_path,
                                                                   monkeypatch, caplog):  # fmt: skip
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "a-file"))  # cannot hold a folder
    store = cstore.open_store(store_path, columns=["Metadata_pert_iname"])
    assert len(store.metadata) == 24 and "metadata stays in this process" in caplog.text


def test_a_damaged_cache_is_never_trusted_over_the_store(store_path, tmp_path):
    """The cache is keyed by the store's metadata digest: a store converted again (another
    digest) gets its own file, never the old one's rows."""
    cstore.open_store(store_path, columns=[])
    md = cstore.open_store(store_path).metadata.copy()
    md["Metadata_Well"] = md["Metadata_Well"].str.replace("A", "B")
    cstore.write_metadata(store_path, md)
    again = cstore.open_store(store_path, columns=[])
    assert set(again.metadata["Metadata_Well"].str[0]) == {"B"}
    assert len(_cache_files(tmp_path / "node-tmp")) == 2


def test_metadata_rows_stream_across_row_groups(store_path):
    store = cstore.open_store(store_path, columns=[])
    full = cstore.open_store(store_path).metadata
    reader = store.metadata_rows(["Metadata_Well", "checksum"])
    assert reader.file.metadata.num_row_groups == 4  # 24 rows in groups of 7
    taken = [reader.take(rows) for rows in (np.array([0, 3, 6, 7]), np.array([13, 20, 23]))]
    got = pd.concat([t.to_pandas() for t in taken], ignore_index=True)
    expected = full.iloc[[0, 3, 6, 7, 13, 20, 23]][["Metadata_Well", "checksum"]]
    pd.testing.assert_frame_equal(got, expected.reset_index(drop=True), check_dtype=False)
    assert reader.take(np.zeros(0, np.int64)).num_rows == 0
    with pytest.raises(cstore.StoreError, match="outside"):
        reader.take(np.array([24]))


def test_profile_sample_caps_treatments_controls_and_wells():
    rng = np.random.default_rng(0)
    treatment = np.array([f"t{i}" for i in rng.integers(0, 400, 20_000)], dtype=object)
    treatment[:3000] = "DMSO"
    treatment[3000:6000] = "poscon"  # a control in thousands of wells
    negcon = treatment == "DMSO"
    picked = sample_wells(treatment, negcon, seed=1)
    assert len(picked) <= PROFILE_MAX_WELLS and (np.diff(picked) > 0).all()
    counts = pd.Series(treatment[picked]).value_counts()
    assert (
        counts["DMSO"] <= PROFILE_NEGCON_WELLS
        and counts.drop("DMSO").max() <= PROFILE_PER_TREATMENT
    )
    assert (counts.drop("DMSO") >= 2).mean() > 0.9  # treatments keep replicates to compare
    np.testing.assert_array_equal(picked, sample_wells(treatment, negcon, seed=1))
    small = np.array(["a", "a", "b", "b", "DMSO", "DMSO"])  # a small fold: every well
    assert list(sample_wells(small, small == "DMSO", seed=1)) == list(range(6))


def test_site_keys_match_the_row_by_row_keys():
    from helpers import site_key

    from conversion.pack import site_keys

    sites = pd.DataFrame({"Metadata_Plate": ["P1", "0001", "NA"], "Metadata_Well": ["A01"] * 3,
                          "Metadata_Site": ["1", "2", "10"], "other": [1, 2, 3]})  # fmt: skip
    assert list(site_keys(sites)) == [site_key(r) for _, r in sites.iterrows()]


# ---------------------------------------------------------------- conversion planning at scale


def test_sites_hold_their_files_as_compact_columns_and_blocks_read_the_same(tmp_path, monkeypatch):
    """No Python object per site: each channel's file is a folder category and an Arrow name;
    a LoadData CSV read a few rows at a time gives the same sites, and the same store."""
    from helpers import make_loaddata

    from cellmorph.config import ConvertConfig
    from conversion import tables
    from conversion.layouts import load_inputs
    from conversion.pack import convert

    csv = make_loaddata(tmp_path / "in", plates=2, wells=3, sites=2, size=40)
    cfg = ConvertConfig(load_data=str(csv), size=32, shard_size=4, workers=1)
    whole = load_inputs(cfg).sites
    assert not any(whole[c].dtype == object for c in whole.columns)
    for ch in cfg.channels:
        assert isinstance(whole[tables.DIR + ch].dtype, pd.CategoricalDtype)
        assert len(whole[tables.DIR + ch].cat.categories) == 1  # one folder: one category
    convert(cfg, tmp_path / "one.zarr")

    monkeypatch.setattr(tables, "BLOCK_ROWS", 5)  # 12 rows: blocks of 5, 5 and 2
    blocks = load_inputs(cfg).sites
    pd.testing.assert_frame_equal(blocks, whole)
    convert(cfg, tmp_path / "blocks.zarr")
    one, many = (cstore.open_store(tmp_path / n).metadata for n in ("one.zarr", "blocks.zarr"))
    pd.testing.assert_frame_equal(many, one)
    assert one["source_DNA"].str.startswith(str(csv.parent)).all()
    label = cfg.label_column  # repeats in every site of a treatment: codes while planning,
    assert isinstance(whole[label].dtype, pd.CategoricalDtype)  # text in the store
    assert not any(isinstance(t, pd.CategoricalDtype) for t in one.dtypes)
    assert pd.api.types.is_string_dtype(one[label])


def test_loaddata_paths_follow_path_semantics_for_odd_names(tmp_path):
    """Plain names are joined to their resolved folder without a Path per row; names holding
    folders, absolute names and empty folders get exactly what ``Path`` gives."""
    from cellmorph.config import ConvertConfig
    from conversion.layouts import _loaddata_paths, _site_path
    from conversion.tables import set_sources, site_paths

    folders = ["/data/P1/", "rel/dir", ".", "", "/old/P2", "/data/P1/", "/"]
    names = ["a.tif", "b.tif", "c.tif", "d.tif", "sub/e.tif", "/abs/f.tif", "g.tif"]
    df = pd.DataFrame({"PathName_OrigDNA": pd.Categorical(folders), "FileName_OrigDNA": names})
    cfg = ConvertConfig(load_data="x.csv", channels=["DNA"], path_replace=["/old=/new"])
    base = tmp_path / "csvdir"
    set_sources(df, ["DNA"], _loaddata_paths(df, cfg, base))
    expected = [_site_path(f, n, cfg, base) for f, n in zip(folders, names)]
    assert list(site_paths(df, ["DNA"])[0]) == expected
    assert expected[4] == "/new/P2/sub/e.tif" and expected[5] == "/abs/f.tif"


def test_process_pool_keeps_only_a_few_tasks_in_flight():
    """Tasks are drawn from their iterator as workers free up, not all submitted at once (each
    carries its sites' paths)."""
    from conversion.pack import ProcessMapper

    drawn: list[int] = []

    def tasks():
        for i in range(200):
            drawn.append(i)
            yield i

    mapper = ProcessMapper(1)
    try:
        results = mapper(abs, tasks())
        first = next(results)
        assert len(drawn) <= mapper.window + 1
        assert sorted([first, *results]) == list(range(200)) and len(drawn) == 200
    finally:
        mapper.close()


def test_metadata_written_in_parts_equals_one_table(tmp_path):
    store = make_store(tmp_path / "s.zarr", plates=2, wells=4, sites=3)
    table = cstore.open_store(store).metadata
    cstore.write_metadata(store, [table.iloc[i : i + 5] for i in range(0, len(table), 5)])
    pd.testing.assert_frame_equal(cstore.open_store(store).metadata, table)
    with pytest.raises(cstore.StoreError, match="23 metadata rows for 24 images"):
        cstore.write_metadata(store, [table.iloc[:10], table.iloc[10:23]])


def test_blocks_that_compact_a_column_differently_still_concatenate(tmp_path, monkeypatch):
    from conversion import tables

    csv = tmp_path / "t.csv"
    pd.DataFrame({"Metadata_x": ["a"] * 4 + ["u", "v", "w", "z"], "n": range(8)}).to_csv(
        csv, index=False
    )
    monkeypatch.setattr(tables, "BLOCK_ROWS", 4)  # block 1 repeats "a", block 2 is all distinct

    def block(df: pd.DataFrame) -> pd.DataFrame:
        tables.compact_text(df, ["Metadata_x"])
        return df

    got = tables.read_csv(csv, "table", block=block)
    assert isinstance(got["Metadata_x"].dtype, pd.CategoricalDtype)
    assert list(got["Metadata_x"]) == ["a"] * 4 + ["u", "v", "w", "z"]
    assert list(got["n"]) == list(range(8))


def _cache_read_whole(path: Path, names: list[str], out: Path) -> bytes:
    """The cache file as it was built before it was gathered a row group at a time."""
    import pyarrow.ipc as paipc
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=names).combine_chunks()
    with paipc.new_file(str(out), table.schema) as w:
        w.write_table(table)
    return out.read_bytes()


def test_the_cache_file_gathered_by_row_group_is_the_table_read_whole(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cellmorph.store.shared import _write_cache

    n = 53
    rng = np.random.default_rng(0)
    text = [None if i % 7 == 3 else "" if i % 11 == 5 else f"w{i % 5}" * (i % 4) for i in range(n)]
    columns = {
        "large": pa.array(text, pa.large_string()),
        "small": pa.array(text, pa.string()),
        "dense": pa.array([f"{x:016x}" for x in rng.integers(0, 2**62, n)], pa.large_string()),
        "empty": pa.array([""] * n, pa.large_string()),
        "site": pa.array([None if i % 9 == 0 else i for i in range(n)], pa.int64()),
        "crc": pa.array(rng.integers(0, 2**32, n), pa.uint32()),
        "x": pa.array(rng.random(n)),
        "flag": pa.array([i % 3 == 0 for i in range(n)]),  # read whole: bits, not bytes
        "cat": pa.array([f"c{i % 3}" for i in range(n)]).dictionary_encode(),
    }
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table(columns), path, row_group_size=8)
    names = ["large", "small", "dense", "empty", "site", "crc", "x", "flag", "cat"]
    with open(path, "rb") as f:
        made = _write_cache(tmp_path, "k", f, names)
    assert made.read_bytes() == _cache_read_whole(path, names, tmp_path / "whole.arrow")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no scratch
