"""Resumability: SIGKILL mid-conversion, rerun, get the uninterrupted run's bytes; rerun = no-op."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_convert_fixtures import make_loaddata

from cellmorph.config import ConvertConfig
from cellmorph.store import StoreError, open_store
from conversion.pack import convert


def _cli(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "conversion", "convert", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
    )  # fmt: skip


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
    proc = _cli(args, CELLMORPH_CONVERT_PAUSE_S="0.4")
    first = out / ".convert" / "shard-000000.json"
    deadline = time.monotonic() + 60
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.exists() and proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)  # in the pause before shard 1's write
    proc.communicate()
    with pytest.raises(StoreError, match="has not finished"):
        open_store(out)

    rerun = _cli(args)
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    written = int(stdout.split("(")[1].split()[0])
    assert 0 < written < 12, stdout  # only the shards the killed run had not finished

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
