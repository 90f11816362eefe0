"""The Ray job (one task per shard) writes the same bytes as the local process pool."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from helpers import make_loaddata

from cellmorph.config import ConvertConfig
from cellmorph.store import open_store
from conversion.pack import convert
from ray_jobs.convert import main


@pytest.mark.ray
def test_ray_job_matches_local_bytes(ray_cluster, tmp_path: Path, capsys) -> None:
    csv = make_loaddata(tmp_path, plates=2, wells=2, sites=2, size=32)
    convert(
        ConvertConfig(load_data=str(csv), size=16, shard_size=3, workers=2), tmp_path / "local.zarr"
    )
    out = tmp_path / "ray.zarr"
    rc = main(
        ["--load-data", str(csv), "--size", "16", "--shard-size", "3", "--out", f"file://{out}"]
    )
    assert rc == 0, capsys.readouterr().err
    assert "converted 8 images" in capsys.readouterr().out
    local = {
        p.relative_to(tmp_path / "local.zarr"): p.read_bytes()
        for p in (tmp_path / "local.zarr/images").rglob("*")
        if p.is_file()
    }
    assert len(local) == 4  # zarr.json + 3 shards
    for rel, data in local.items():
        assert (out / rel).read_bytes() == data, rel
    pd.testing.assert_frame_equal(
        open_store(out).metadata, open_store(tmp_path / "local.zarr").metadata
    )
