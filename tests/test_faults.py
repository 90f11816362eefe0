"""Ordinary faults and mistakes end in one line and a non-zero exit, and leave nothing that looks
complete: a full disk (a small tmpfs, where this test may mount one, else a fault injected into
the write), a read-only file system, bad options, a truncated illumination function, and a
user mistake found inside a Ray Train worker.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_checkpoint, make_loaddata, make_store

from cellmorph import atomic
from cellmorph.checkpoint import save_checkpoint
from cellmorph.cli import main as cellmorph_main
from cellmorph.store import StoreError, open_store
from conversion.__main__ import main as conversion_main


def _one_line(err: str, *words: str) -> None:
    """stderr holds one message line (progress bars, redrawn with \r, aside)."""
    lines = [line for line in err.split("\n") if line and "\r" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


def _mount(path: Path, options: str) -> None:
    """Mount a tmpfs at ``path`` or skip: mounting needs root (and a kernel that allows it)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the fault-injection tests cover the logic")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                       capture_output=True, text=True)  # fmt: skip
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 192 KiB file system that fills up during the test."""
    disk = tmp_path / "disk"
    _mount(disk, "size=192k")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "ro"
    _mount(disk, "ro,size=64k")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def _leftovers(folder: Path) -> list[str]:
    """Temporary files of any writer (atomic's ``.*.tmp``, zarr's ``*.partial``)."""
    return [str(p) for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial"))]


# --------------------------------------------------------------------------- full disk


def test_convert_on_a_full_disk(small_disk: Path, tmp_path: Path, capsys) -> None:
    csv = make_loaddata(tmp_path / "in", plates=2, wells=3, sites=2, size=96)
    out = small_disk / "s.zarr"
    rc = conversion_main(["convert", "--load-data", str(csv), "--out", str(out), "--size", "96",
                          "--shard-size", "2", "--workers", "1"])  # fmt: skip
    _one_line(capsys.readouterr().err, "no space left on the device", "free space")
    assert rc == 2
    with pytest.raises(StoreError, match="has not finished"):
        open_store(out)
    assert _leftovers(small_disk) == []


def test_predict_on_a_full_disk_leaves_no_predictions(small_disk: Path, tmp_path: Path, capsys):
    store = make_store(tmp_path / "store.zarr", labels=False, plates=4, wells=6, sites=4)
    ckpt = make_checkpoint(tmp_path / "best.pt", str(store))
    out = small_disk / "preds"
    rc = cellmorph_main(["predict", "--checkpoint", str(ckpt), "--store", str(store),
                         "--out", str(out), "--num-workers", "0"])  # fmt: skip
    _one_line(capsys.readouterr().err, "no space left on the device", str(out))
    assert rc == 2
    assert sorted(p.name for p in out.iterdir()) == []  # nothing that reads as a result


@pytest.fixture
def one_mib_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "runs"
    _mount(disk, "size=1m")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def test_train_on_a_full_disk_is_one_line_without_a_checkpoint(one_mib_disk: Path,
                                                               tiny_plate: Path, capsys) -> None:  # fmt: skip
    rc = cellmorph_main(["train", "--local", "--config", "configs/demo.yaml", "name=full",
                         f"run_root={one_mib_disk}", f"data.store={tiny_plate}",
                         "data.val_fraction=0.5", "loader.batch_size=8", "loader.image_size=32",
                         "model.width_mult=0.35", "train.epochs=1", "data.test_fraction=0",
                         "train.max_steps_per_epoch=1"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines()[-1].startswith("error: no space left on the device")
    assert "last.pt" in err and "Traceback" not in err
    run = one_mib_disk / "full"
    assert not (run / "checkpoints" / "last.pt").exists() and _leftovers(run) == []


def test_torn_last_line_of_a_run_log_is_ignored(tmp_path: Path) -> None:
    from cellmorph.rundir import RunDir

    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0}\n{"epoch": 1, "lo')  # disk filled
    assert RunDir(tmp_path).history() == [{"epoch": 0}]


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(small_disk: Path) -> None:
    last = small_disk / "last.pt"
    save_checkpoint({"model": {"w": torch.zeros(10)}, "epoch": 0}, last)
    with pytest.raises(OSError) as info:
        save_checkpoint({"model": {"w": torch.zeros(100_000)}, "epoch": 1}, last)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(last)
    assert torch.load(last, weights_only=True)["epoch"] == 0
    assert _leftovers(small_disk) == []


def test_failed_write_removes_its_temporary_file_and_names_the_output(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def fills_the_disk(tmp: Path) -> None:
        Path(tmp).write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as info:
        atomic.write_with(target, fills_the_disk)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_text() == "old" and _leftovers(tmp_path) == []


def test_disk_full_becomes_one_line_not_a_traceback(capsys) -> None:
    from cellmorph.errors import run_main

    def body() -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/x.zarr/images/c/0")

    assert run_main(body) == 2
    _one_line(capsys.readouterr().err, "no space left", "/data/x.zarr/images/c/0")

    def bug() -> int:
        raise OSError(errno.EBADF, "Bad file descriptor")  # not a user's fault: a traceback

    with pytest.raises(OSError):
        run_main(bug)


# --------------------------------------------------------------------------- read-only


def test_read_only_outputs_are_one_line(read_only: Path, tmp_path: Path, capsys) -> None:
    csv = make_loaddata(tmp_path / "in", plates=1, wells=2, sites=1, size=16)
    rc = conversion_main(["convert", "--load-data", str(csv), "--out", str(read_only / "s.zarr"),
                          "--size", "16", "--workers", "1"])  # fmt: skip
    assert rc == 2
    _one_line(capsys.readouterr().err, "--out", "Read-only file system")
    store = make_store(tmp_path / "store.zarr", labels=False)
    ckpt = make_checkpoint(tmp_path / "best.pt", str(store))
    rc = cellmorph_main(["predict", "--checkpoint", str(ckpt), "--store", str(store),
                         "--out", str(read_only / "preds")])  # fmt: skip
    assert rc == 2
    _one_line(capsys.readouterr().err, "--out", "Read-only file system")


# --------------------------------------------------------------------------- options


@pytest.fixture(scope="module")
def predict_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("opts")
    store = make_store(root / "store.zarr", labels=False)
    return store, make_checkpoint(root / "best.pt", str(store))


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--batch-size", "0"], ["--batch-size", "0 is less than 1"]),
        (["--num-workers", "-2"], ["--num-workers"]),
        (["--batch-size", "x"], ["--batch-size", "not a whole number"]),
    ],
)
def test_bad_predict_numbers_are_refused_by_the_parser(predict_inputs, tmp_path, extra, words,
                                                       capsys) -> None:  # fmt: skip
    store, ckpt = predict_inputs
    argv = ["predict", "--checkpoint", str(ckpt), "--store", str(store), "--out",
            str(tmp_path / "o"), *extra]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        cellmorph_main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert all(w in err.splitlines()[-1] for w in words), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--device", "gpu0", ["--device gpu0", "not a device"]),
        ("--device", "meta", ["--device meta", "cpu or cuda"]),
        ("--out", "FILE", ["is a file"]),
        ("--out", "STORE", ["inside the store"]),
        ("--out", "FOLDER_NAMED_LIKE_AN_OUTPUT", ["predictions.parquet there is not a file"]),
    ],
)
def test_bad_predict_targets_are_one_line(predict_inputs, tmp_path, option, value, words,
                                          capsys) -> None:  # fmt: skip
    store, ckpt = predict_inputs
    if value == "FILE":
        value = str(tmp_path / "taken.csv")
        Path(value).write_text("x")
    elif value == "STORE":
        value = str(store / "preds")
    elif value == "FOLDER_NAMED_LIKE_AN_OUTPUT":
        value = str(tmp_path / "taken")
        (tmp_path / "taken" / "predictions.parquet").mkdir(parents=True)
    argv = ["predict", "--checkpoint", str(ckpt), "--store", str(store),
            "--out", str(tmp_path / "o"), option, value]  # fmt: skip
    assert cellmorph_main(argv) == 2
    _one_line(capsys.readouterr().err, *words)
    assert not (store / "preds").exists()


def test_cuda_device_without_gpu_is_one_line(predict_inputs, tmp_path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    store, ckpt = predict_inputs
    rc = cellmorph_main(["predict", "--checkpoint", str(ckpt), "--store", str(store),
                         "--out", str(tmp_path / "o"), "--device", "cuda:1"])  # fmt: skip
    assert rc == 2
    _one_line(capsys.readouterr().err, "--device cuda:1", "no CUDA GPU")


def test_truncated_illumination_function_is_one_line(tmp_path: Path, capsys) -> None:
    csv = make_loaddata(tmp_path, plates=1, wells=2, sites=1, size=16)
    illum = tmp_path / "illum"
    illum.mkdir()
    for ch in ("DNA", "ER", "RNA", "AGP", "Mito"):
        np.save(illum / f"P0_Illum{ch}.npy", np.ones((16, 16), np.float32))
    bad = illum / "P0_IllumRNA.npy"
    bad.write_bytes(bad.read_bytes()[:100])
    rc = conversion_main(["convert", "--load-data", str(csv), "--out", str(tmp_path / "s.zarr"),
                          "--illum-dir", str(illum), "--size", "16", "--workers", "1"])  # fmt: skip
    assert rc == 2
    _one_line(capsys.readouterr().err, str(bad), "not a readable .npy")
    assert not (tmp_path / "s.zarr").exists()


def test_a_fifo_or_folder_named_as_a_tiff_is_quarantined_not_a_hang(tmp_path: Path) -> None:
    import pandas as pd

    from cellmorph.config import ConvertConfig
    from conversion.pack import convert

    csv = make_loaddata(tmp_path, plates=1, wells=2, sites=2, size=16)
    df = pd.read_csv(csv)
    os.mkfifo(tmp_path / "pipe.tiff")  # opening it would block until a writer comes: never
    (tmp_path / "folder.tiff").mkdir()
    df.loc[0, ["FileName_OrigDNA", "PathName_OrigDNA"]] = ["pipe.tiff", "."]
    df.loc[1, ["FileName_OrigER", "PathName_OrigER"]] = ["folder.tiff", "."]
    df.to_csv(csv, index=False)
    summary = convert(ConvertConfig(load_data=str(csv), size=16, workers=1), tmp_path / "s.zarr")
    assert summary["images"] == 2 and summary["quarantined"] == 2
    reasons = open_store(tmp_path / "s.zarr").quarantine["reason"].tolist()
    assert all("is not a regular file" in r for r in reasons), reasons


# --------------------------------------------------------------------------- Ray


@pytest.mark.ray
@pytest.mark.slow
def test_user_mistake_inside_a_ray_worker_is_one_line(tiny_plate: Path, tmp_path: Path, capsys,
                                                      ray_cluster) -> None:  # fmt: skip
    """fp16 on a CPU passes the driver's checks and is refused inside the training worker: the
    command's stderr is that one line (the worker's traceback is in the run's logs). The
    command runs in this process, on the session's cluster (``ray.address``): a Ray Train run
    costs a minute to start on 2 cores, a fresh interpreter with torch more on top."""
    code = cellmorph_main(
        ["train", "--config", "configs/demo.yaml", "name=fp16", f"run_root={tmp_path / 'runs'}",
         f"data.store={tiny_plate}", "data.val_fraction=0.5", "loader.batch_size=8",
         "loader.image_size=32", "model.width_mult=0.35", "ray.num_workers=1", "train.amp=fp16",
         "train.epochs=1", "data.test_fraction=0", "train.min_steps=0",
         f"ray.address={ray_cluster.address}"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: training run fp16 failed: train.amp: fp16"), lines
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) <= 2, lines  # at most the index's own warning line before it
    logs = tmp_path / "runs" / "fp16" / "logs"
    assert "Traceback" in (logs / "rank0.log").read_text()
