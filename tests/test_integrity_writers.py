"""One writer, no orphans, atomic replacement, refuse before writing.

A second convert on the same --out is refused; pool workers of a killed convert die with it;
a writer of an earlier run writes nothing; ``--overwrite`` builds beside the old store and
swaps it in, so a reader finishes on the store it opened; --out never holds an input; a refused
resume touches no run file.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import make_loaddata

from cellmorph import store as cstore
from cellmorph.config import ConvertConfig
from cellmorph.errors import CellmorphError
from cellmorph.loaders.reader import ShardReader
from cellmorph.store import StoreError, open_store, verify_store
from conversion import ownership
from conversion.pack import ShardTask, convert, pack_shard


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "conversion", "convert", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_loaddata(tmp_path_factory.mktemp("writers"), plates=2, wells=3, sites=2, size=24)


def _cfg(csv: Path, size: int = 16, **kw) -> ConvertConfig:
    return ConvertConfig(load_data=str(csv), size=size, shard_size=4, workers=1, **kw)


# --------------------------------------------------------------------------- one writer


def test_second_convert_is_refused_while_one_writes(csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    with ownership.hold(str(out)):  # this process is "the other convert"
        p = _cli("--load-data", str(csv), "--out", str(out), "--size", "16", "--workers", "1")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "is being written by another convert" in p.stderr
    assert f"pid {os.getpid()}" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()  # refused before writing anything
    p = _cli("--load-data", str(csv), "--out", str(out), "--size", "16", "--workers", "1")
    assert p.returncode == 0, p.stderr


def test_a_store_another_convert_is_creating_is_not_someone_elses_folder(
    csv: Path, tmp_path: Path
) -> None:
    """The race window CI hit once: the winner holds the lock and has made the folder, not yet
    a store; the loser must say that a convert writes it, not that it is a foreign folder."""
    out = tmp_path / "s.zarr"
    with ownership.hold(str(out)):  # this process is the convert that is creating it
        (out / "images").mkdir(parents=True)
        with pytest.raises(CellmorphError, match="is being written by another convert"):
            convert(_cfg(csv), out)
    with pytest.raises(CellmorphError, match="exists and is not a cellmorph store"):
        convert(_cfg(csv), out)  # nobody holds it now: it is a foreign folder, kept
    assert (out / "images").is_dir()


def test_racing_converts_of_different_inputs_leave_one_sound_store(
    csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "race.zarr"
    # No progress bars: the loser may have drawn one (a line of its own on stderr) before the
    # race was decided, and what is counted below is the error alone.
    quiet = {**os.environ, "TQDM_DISABLE": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "conversion",
                "convert",
                "--load-data",
                str(csv),
                "--out",
                str(out),
                "--size",
                str(size),
                "--shard-size",
                "4",
                "--workers",
                "1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=quiet,
        )  # fmt: skip
        for size in (16, 20)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "being written by another convert" in err or "different inputs" in err
    st = open_store(out)
    assert st.shape[-1] in (16, 20) and verify_store(st, progress=False) == []


def test_writer_of_an_earlier_run_writes_nothing(csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    convert(_cfg(csv), out)
    shard = out / "images" / "c" / "0" / "0" / "0" / "0"
    before = shard.read_bytes()
    with ownership.hold(str(out)) as owner:
        stale = ownership.Owner(owner.sidecar, "a-run-that-is-over")
        sites = [([(str(p), -1) for p in _site_files(csv, 0)], [])]
        task = ShardTask(str(out), 0, 0, "k", 16, sites, [cstore.group_key("P0", False)], stale)
        result = pack_shard(task)
    assert result.abandoned and result.count == 0
    assert shard.read_bytes() == before


def _site_files(csv: Path, row: int) -> list[Path]:
    import pandas as pd

    df = pd.read_csv(csv)
    chans = ["DNA", "ER", "RNA", "AGP", "Mito"]
    return [csv.parent / df.at[row, f"PathName_Orig{c}"] / df.at[row, f"FileName_Orig{c}"]
            for c in chans]  # fmt: skip


def test_new_run_waits_for_writers_of_an_earlier_run(tmp_path: Path) -> None:
    out = str(tmp_path / "s.zarr")
    with ownership.hold(out) as owner, ownership.writing(owner) as ours:
        assert ours  # a writer of this run, mid-shard
        with pytest.raises(CellmorphError, match="shard writers of an earlier convert"):
            ownership.wait_for_writers(owner, out, timeout=0.3)
    with ownership.hold(out) as owner:  # once it is done, a new run starts at once
        assert owner is not None


# --------------------------------------------------------------------------- orphans


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for child in _children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# The conversion's process pool (what `convert --workers 2` runs shards in), both workers busy
# in a task that would last a minute.
POOL_AT_WORK = """
import time
from conversion.pack import ProcessMapper

for _ in ProcessMapper(2)(time.sleep, [60, 60]):
    pass
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_pool_workers_die_with_a_killed_convert() -> None:
    """SIGKILL the convert process while both pool workers are busy: every process it started
    (forkserver, workers) must be gone within seconds, none left to write."""
    proc = subprocess.Popen([sys.executable, "-c", POOL_AT_WORK])
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        workers: list[int] = []
        while len(workers) < 2 and time.monotonic() < deadline:  # the forkserver's children
            started |= _descendants(proc.pid)
            workers = [w for c in _children(proc.pid) for w in _children(c)]
            time.sleep(0.1)
        assert len(workers) == 2, started
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while any(_running(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in started if _running(p)], "processes outlived the killed convert"
    finally:
        for p in started:  # only what this test started, by id
            if _running(p):
                os.kill(p, signal.SIGKILL)


# --------------------------------------------------------------------------- replacement


def test_overwrite_swaps_and_a_reader_finishes_on_the_old_store(csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    convert(_cfg(csv, 16), out)
    old = open_store(out)
    reader = ShardReader(old)
    first = reader.read(np.arange(4))  # shard 0 open; shards 1, 2 not yet
    expected = old.images[:]
    summary = convert(_cfg(csv, 20), out, overwrite=True)
    assert "has readers; kept at" in summary["replaced"]
    np.testing.assert_array_equal(reader.read(np.arange(12)), expected)  # all old, no mix
    np.testing.assert_array_equal(first, expected[:4])
    new = open_store(out)
    assert new.shape[-1] == 20 and verify_store(new, progress=False) == []
    kept = list(ownership.sidecar(out).glob("old-*"))
    assert len(kept) == 1
    del reader, old, first
    gc.collect()
    assert convert(_cfg(csv, 20), out)["nothing_to_do"]
    assert not list(ownership.sidecar(out).glob("old-*"))  # its readers are gone: removed


def test_overwrite_without_readers_removes_the_old_store(csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    convert(_cfg(csv, 16), out)
    summary = convert(_cfg(csv, 20), out, overwrite=True)
    assert summary["replaced"] == "the replaced store was removed"
    assert sorted(p.name for p in ownership.sidecar(out).iterdir()) == ["lock", "writers"]
    assert open_store(out).shape[-1] == 20


def test_reader_of_a_deleted_store_stops_with_a_message(csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    convert(_cfg(csv, 16), out)
    reader = ShardReader(open_store(out))
    shutil.rmtree(out)
    convert(_cfg(csv, 20), out)  # a new store at the same path
    with pytest.raises(StoreError, match="was replaced or deleted while this process"):
        reader.read(np.arange(12))


KILLED_OVERWRITE = """
import os, signal, sys
from cellmorph.config import ConvertConfig
from conversion.pack import convert

def killing_map(fn, tasks):
    for i, task in enumerate(tasks):
        if fn.__name__ == "pack_shard" and i == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        yield fn(task)

cfg = ConvertConfig(load_data=sys.argv[1], size=20, shard_size=4, workers=1)
convert(cfg, sys.argv[2], overwrite=True, mapper=killing_map)
"""


def test_killed_overwrite_keeps_the_old_store_and_rerun_finishes(csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    convert(_cfg(csv, 16), out)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_OVERWRITE, str(csv), str(out)], capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    again = convert(_cfg(csv, 16), out)  # the old job: nothing to do, and a note
    assert again["nothing_to_do"] and again["unfinished_overwrite"] == str(ownership.staging(out))
    st = open_store(out)  # the old store is whole and readable
    assert st.shape[-1] == 16 and verify_store(st, progress=False) == []
    assert (ownership.staging(out) / ".convert" / "shard-000000.json").is_file()
    p = _cli("--load-data", str(csv), "--out", str(out), "--size", "20", "--shard-size", "4",
             "--workers", "1", "--overwrite")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "(8 written in this run)" in p.stdout  # shard 0 was kept from the killed run
    new = open_store(out)
    assert new.shape[-1] == 20 and verify_store(new, progress=False) == []
    assert not ownership.staging(out).exists()


# --------------------------------------------------------------------------- --out


def test_out_holding_the_inputs_is_refused_and_inputs_survive(csv: Path, tmp_path: Path) -> None:
    before = sorted(p.name for p in csv.parent.rglob("*"))
    for extra in ([], ["--overwrite"]):
        p = _cli("--load-data", str(csv), "--out", str(csv.parent), "--size", "16", *extra)
        assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
        assert "is not a cellmorph store; cellmorph never deletes it" in p.stderr
    out = tmp_path / "s.zarr"
    convert(_cfg(csv), out)
    inside = out / "load_data.csv"
    shutil.copy(csv, inside)
    with pytest.raises(CellmorphError, match="holds the input"):
        convert(ConvertConfig(load_data=str(inside), size=20, workers=1), out, overwrite=True)
    assert inside.is_file()
    inside.unlink()
    shutil.copytree(csv.parent / "images", out / "tiffs")  # the TIFFs inside the store
    moved = tmp_path / "moved.csv"
    moved.write_text(csv.read_text().replace(",images,", f",{out / 'tiffs'},"))
    with pytest.raises(CellmorphError, match=r"holds the input .*tiffs"):
        convert(ConvertConfig(load_data=str(moved), size=20, workers=1), out, overwrite=True)
    assert len(list((out / "tiffs").iterdir())) == len(list((csv.parent / "images").iterdir()))
    assert sorted(p.name for p in csv.parent.rglob("*")) == before


def test_out_that_is_a_file_is_refused(csv: Path, tmp_path: Path) -> None:
    target = tmp_path / "store.zarr"
    target.write_text("mine")
    for extra in ([], ["--overwrite"]):
        p = _cli("--load-data", str(csv), "--out", str(target), *extra)
        assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
        assert "is a file" in p.stderr
    assert target.read_text() == "mine"


# --------------------------------------------------------------------------- resume


def _run_files(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    names = ("config.yaml", "classes.json", "data_summary.json", "metrics.jsonl", "events.jsonl")
    return {n: ((run_dir / n).read_bytes(), (run_dir / n).stat().st_mtime_ns) for n in names}


def test_refused_resume_touches_no_run_file(small_cfg, tiny_plate: Path, tmp_path: Path) -> None:
    from cellmorph.train import run_local

    base = ("train.epochs=1", "train.max_steps_per_epoch=1")
    cfg = small_cfg("keep", *base)
    run_local(cfg)
    before = _run_files(cfg.run_dir)
    raw = str(tiny_plate.parent / "raw" / "load_data.csv")
    four, other = tmp_path / "four.zarr", tmp_path / "other.zarr"
    convert(ConvertConfig(load_data=raw, size=40, shard_size=16, workers=1,
                          channels=["DNA", "ER", "RNA", "AGP"]), four)  # fmt: skip
    convert(ConvertConfig(load_data=raw, size=36, shard_size=16, workers=1), other)
    for change, message in [
        ("data.top_k=3", "classes"),
        ("model.width_mult=0.5", "model.width_mult 0.35 -> 0.5"),
        (f"data.store={four}", "channels"),
        (f"data.store={other}", "changed since this checkpoint was trained"),  # same classes
    ]:
        with pytest.raises(CellmorphError, match=message):
            run_local(small_cfg("keep", "train.epochs=2", "train.max_steps_per_epoch=1", change))
        assert _run_files(cfg.run_dir) == before, change


def test_swap_without_rename_exchange_falls_back_to_two_renames(
    csv: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "s.zarr"
    convert(_cfg(csv, 16), out)
    monkeypatch.setattr(ownership, "_exchange", lambda a, b: False)  # e.g. an NFS mount
    summary = convert(_cfg(csv, 20), out, overwrite=True)
    assert summary["replaced"] == "the replaced store was removed"
    assert open_store(out).shape[-1] == 20
    assert sorted(p.name for p in ownership.sidecar(out).iterdir()) == ["lock", "writers"]


def test_evaluate_refuses_a_store_converted_again(small_cfg, tiny_plate: Path, tmp_path: Path,
                                                 capsys) -> None:  # fmt: skip
    from cellmorph.cli import main as cellmorph_main
    from cellmorph.train import run_local

    raw = str(tiny_plate.parent / "raw" / "load_data.csv")
    store = tmp_path / "mine.zarr"
    convert(ConvertConfig(load_data=raw, size=40, shard_size=16, workers=1), store)
    cfg = small_cfg("ev", "train.epochs=1", "train.max_steps_per_epoch=1", f"data.store={store}")
    run_local(cfg)
    convert(ConvertConfig(load_data=raw, size=36, shard_size=16, workers=1), store, overwrite=True)
    report = cfg.run_dir / "metrics.json"
    before = report.read_bytes()
    assert cellmorph_main(["evaluate", str(cfg.run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and "changed since" in err
    assert report.read_bytes() == before  # nothing rewritten about the wrong store


def test_store_of_an_older_format_is_rebuilt_only_when_asked(csv: Path, tmp_path: Path) -> None:
    import json

    from conversion.pack import older_format

    out = tmp_path / "s.zarr"
    convert(_cfg(csv), out)
    meta = json.loads((out / "zarr.json").read_text())  # what a format-1 store looks like
    meta["attributes"]["cellmorph_format"] = 1
    (out / "zarr.json").write_text(json.dumps(meta))
    (out / ".convert" / "header.json").write_text('{"fingerprint": "of cellmorph 1"}')
    assert older_format(out)
    with pytest.raises(CellmorphError, match="older cellmorph format.*--overwrite"):
        convert(_cfg(csv), out)
    convert(_cfg(csv), out, overwrite=True)
    assert not older_format(out) and verify_store(open_store(out), progress=False) == []
