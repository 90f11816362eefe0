"""Resumability: SIGKILL mid-conversion, rerun, get the uninterrupted run's bytes; rerun = no-op."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import KILLED_AT_SHARD_2, make_loaddata

from cellmorph.config import ConvertConfig
from cellmorph.store import StoreError, open_store
from conversion.pack import convert


def _cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "conversion", "convert", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


# A conversion that SIGKILLs itself when its third shard is about to be packed: the kill lands
# at a point the test chooses, with no hook in the product (the mapper is the public way to run
# conversion tasks: the Ray job passes one too).


def _files(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def test_sigkill_then_rerun_equals_uninterrupted_and_finished_is_noop(tmp_path: Path) -> None:
    csv = make_loaddata(tmp_path, plates=2, wells=3, sites=2, size=40)
    convert(
        ConvertConfig(load_data=str(csv), size=16, shard_size=2, workers=1), tmp_path / "ref.zarr"
    )
    out = tmp_path / "s.zarr"
    args = [
        "--load-data",
        str(csv),
        "--size",
        "16",
        "--shard-size",
        "2",
        "--workers",
        "1",
        "--out",
        str(out),
    ]
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AT_SHARD_2, str(csv), str(out)], capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    recorded = sorted(p.name for p in (out / ".convert").glob("shard-*.json"))
    assert recorded == ["shard-000000.json", "shard-000001.json"]
    with pytest.raises(StoreError, match="has not finished"):
        open_store(out)
    # A torn write of the shard being packed at the kill: garbage where shard 2 goes.
    (out / "images" / "c" / "2" / "0" / "0" / "0").parent.mkdir(parents=True, exist_ok=True)
    (out / "images" / "c" / "2" / "0" / "0" / "0").write_bytes(b"torn")

    rerun = _cli(args)
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    written = int(stdout.split("(")[1].split()[0])
    assert written == 8, stdout  # shards 2..5: only what the killed run had not finished

    ref, got = open_store(tmp_path / "ref.zarr"), open_store(out)
    assert np.array_equal(ref.images[:], got.images[:])
    pd.testing.assert_frame_equal(ref.metadata, got.metadata)
    assert ref.attrs["stats"] == got.attrs["stats"]
    ref_files = {k: v[0] for k, v in _files(tmp_path / "ref.zarr/images").items()}
    assert len(ref_files) == 7  # zarr.json + 6 shards
    assert {k: v[0] for k, v in _files(out / "images").items()} == ref_files

    before = _files(out)
    again = _cli(args)
    stdout, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and stdout.startswith("nothing to do")
    assert _files(out) == before


def test_pool_workers_see_the_environment_as_it_is_when_the_pool_starts(monkeypatch) -> None:
    """The forkserver keeps the environment it started with; credentials or an endpoint set
    after it started (a notebook, a test fixture) must still reach the workers."""
    import os

    from conversion.pack import ProcessMapper

    first = ProcessMapper(1)  # starts the forkserver, if this process has none yet
    assert list(first(os.getenv, ["CELLMORPH_TEST_LATE_VAR"])) == [None]
    first.close()
    monkeypatch.setenv("CELLMORPH_TEST_LATE_VAR", "set-after-the-forkserver")
    later = ProcessMapper(2)
    try:
        assert set(later(os.getenv, ["CELLMORPH_TEST_LATE_VAR"] * 2)) == {
            "set-after-the-forkserver"
        }
    finally:
        later.close()
