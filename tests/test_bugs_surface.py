"""A bug inside a site that turns a library's bad-input errors into one line keeps its
traceback: each such site catches only what the library raises for bad input (errors.py)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from cellmorph.errors import CellmorphError, run_main


def _bug(*args, **kwargs):
    raise TypeError("a bug, not bad input")


def test_a_bug_in_loading_a_checkpoint_keeps_its_traceback(tmp_path, monkeypatch):
    from cellmorph import checkpoint

    path = tmp_path / "last.pt"
    torch.save({"model": {}}, path)
    monkeypatch.setattr(checkpoint.torch, "load", _bug)
    with pytest.raises(TypeError, match="a bug"):
        checkpoint.load_checkpoint(path)
    # run_main answers it with the traceback, never ``error: ...`` and exit 2
    with pytest.raises(TypeError):
        run_main(lambda: checkpoint.load_checkpoint(path))


def test_a_corrupt_checkpoint_is_still_one_line(tmp_path):
    from cellmorph.checkpoint import load_checkpoint

    path = tmp_path / "last.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CellmorphError, match="not a readable cellmorph checkpoint"):
        load_checkpoint(path)


def test_a_bug_in_reading_a_tiff_keeps_its_traceback(tmp_path, monkeypatch):
    from conversion import tiffs

    path = tmp_path / "a.tif"
    tifffile.imwrite(path, np.zeros((8, 8), np.uint16))
    monkeypatch.setattr(tiffs, "_site_series", _bug)
    with pytest.raises(TypeError, match="a bug"):
        tiffs.read_file(str(path))
    with pytest.raises(TypeError, match="a bug"):
        tiffs.probe_file(str(path))


def test_a_bug_in_decoding_a_chunk_keeps_its_traceback():
    from cellmorph.shardfile import StoreDamage, decode_into

    class Buggy:
        def decode(self, payload, out=None):
            raise TypeError("a bug, not bad input")

    class Refusing:
        def decode(self, payload, out=None):
            raise RuntimeError("error during decompression")  # what numcodecs raises

    out = np.zeros(4, np.uint16)
    with pytest.raises(TypeError, match="a bug"):
        decode_into(Buggy(), "zstd", memoryview(b"xx"), out, "images/c/0")
    with pytest.raises(StoreDamage, match="does not decode"):
        decode_into(Refusing(), "zstd", memoryview(b"xx"), out, "images/c/0")


def test_a_bug_in_reading_the_metadata_keeps_its_traceback(tiny_plate, monkeypatch):
    from cellmorph.store import read

    monkeypatch.setattr(read, "shared_columns", _bug)
    with pytest.raises(TypeError, match="a bug"):
        read.open_store(tiny_plate, columns=["Metadata_pert_iname"])


def test_a_bug_in_opening_the_zarr_group_keeps_its_traceback(tiny_plate, monkeypatch):
    from cellmorph.store import read

    monkeypatch.setattr(read.zarr, "open_group", lambda *a, **k: _raise(AttributeError("bug")))
    with pytest.raises(AttributeError, match="bug"):
        read.open_store(tiny_plate, columns=[])


def test_a_bug_in_watching_a_run_is_not_swallowed(tmp_path, monkeypatch):
    from cellmorph.progress import RunWatcher
    from cellmorph.rundir import RunDir

    run = RunDir(tmp_path / "run")
    watcher = RunWatcher(run, 2, bar=False, quiet=True)
    watcher._poll()  # nothing written yet: nothing to show
    monkeypatch.setattr(RunDir, "history", _bug)
    with pytest.raises(TypeError, match="a bug"):
        watcher._poll()


def _raise(e: BaseException):
    raise e
