"""One writer per run directory (``cellmorph/runlock.py``), with real processes: a local folder
(``flock``) and a bucket of the S3 test server (a lease object with conditional puts)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cellmorph import remote, runlock, urlpath
from cellmorph.errors import CellmorphError

ROOT = Path(__file__).resolve().parent.parent

# Holds the lock at argv[1] (lease and renewal seconds in argv[2:4]) until killed.
HOLD = """
import sys, time
from cellmorph import runlock
from cellmorph.errors import run_main
runlock.LEASE_S, runlock.RENEW_S = float(sys.argv[2]), float(sys.argv[3])
def body():
    with runlock.hold(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
sys.exit(run_main(body))
"""

# Takes the lock at argv[1] from the time argv[2] (a common start for racing processes), holds
# it argv[3] seconds; a refusal is the one-line error and exit 2 of every entry point.
TRY = """
import sys, time
from cellmorph import runlock
from cellmorph.errors import run_main
def body():
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
    with runlock.hold(sys.argv[1]):
        print("acquired", flush=True)
        time.sleep(float(sys.argv[3]))
sys.exit(run_main(body))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}  # AWS_* from the s3_server fixture


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _holder(path: str, lease: float = 60, renew: float = 15,
            background: bool = False) -> subprocess.Popen:  # fmt: skip
    """A process holding the lock at ``path``, once it says so; ``background``: SIGINT
    ignored, as in a job a shell starts with ``&``."""
    argv = [sys.executable, "-c", HOLD, path, str(lease), str(renew)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=ROOT,
                            preexec_fn=_ignore_sigint if background else None)  # fmt: skip
    line = proc.stdout.readline()
    if line.strip() != "held":
        proc.kill()
        pytest.fail(f"the holder did not take the lock: {line}{proc.stderr.read()}")
    return proc


def _try(path: str, at: float = 0.0, hold_s: float = 0.0) -> subprocess.Popen:
    argv = [sys.executable, "-c", TRY, path, str(at), str(hold_s)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=ROOT)  # fmt: skip


def _outcome(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _assert_refused(outcome: tuple[int, str, str], path: str, pid: int) -> None:
    rc, out, err = outcome
    assert rc == 2 and "acquired" not in out, (rc, out, err)
    line = err.strip()
    assert line.startswith(f"error: run {Path(path).name} ({path}) is being written by pid {pid} ")
    assert "choose another name=" in line and "\n" not in line


# --------------------------------------------------------------------------- local folder


def test_local_second_writer_refused_and_killed_holder_blocks_nothing(tmp_path: Path) -> None:
    run = str(tmp_path / "runs" / "X")
    holder = _holder(run)
    try:
        _assert_refused(_outcome(_try(run)), run, holder.pid)
        refused = rf"pid {holder.pid} \(user .+\) on host .+ since"
        with pytest.raises(CellmorphError, match=refused), runlock.hold(run):
            pass
    finally:
        _kill(holder)  # SIGKILL: no clean-up ran, the kernel released the flock
    assert (Path(run) / runlock.LOCK_NAME).is_file()
    rc, out, err = _outcome(_try(run))
    assert rc == 0 and out.strip() == "acquired", err
    assert not (Path(run) / runlock.LOCK_NAME).exists()  # a clean release removes it


def test_local_lock_leaves_nothing_behind(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "X"
    with runlock.hold(run):
        info = json.loads((run / runlock.LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] and info["started"]
        with runlock.hold(run):  # the same process again (nested): not a second writer
            pass
        assert (run / runlock.LOCK_NAME).is_file()
    assert not (tmp_path / "runs").exists()  # refused or failed before writing: no folder
    with runlock.hold(run):
        (run / "metrics.jsonl").write_text("{}\n")
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_local_lock_on_a_full_disk_or_without_flock(tmp_path: Path, monkeypatch, capsys) -> None:
    import errno

    run = tmp_path / "runs" / "X"

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(runlock.os, "pwrite", full)
        with pytest.raises(OSError, match="No space"), runlock.hold(run):
            pass
    assert not (tmp_path / "runs").exists()  # nothing kept, nothing held
    with runlock.hold(run):
        pass

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock.fcntl, "flock", no_locks)  # e.g. Lustre without -o flock
    with runlock.hold(run):
        assert json.loads((run / runlock.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "this filesystem has no file locks" in capsys.readouterr().err


# --------------------------------------------------------------------------- object store


def _lease_body(url: str) -> dict | None:
    try:
        return json.loads(remote.read(f"{url}/{runlock.LOCK_NAME}"))
    except remote.RemoteMissing:
        return None


def test_s3_refused_while_holder_renews_then_expired_lease_taken_over(bucket: str) -> None:
    run = f"{bucket}/runs/X"
    lease = 6.0  # long enough for a process to start on a busy machine, short for a test
    holder = _holder(run, lease=lease, renew=0.5)
    try:
        time.sleep(lease + 1)  # past one lease: only the renewals keep it
        assert _lease_body(run)["pid"] == holder.pid
        _assert_refused(_outcome(_try(run)), run, holder.pid)
    finally:
        _kill(holder)
        killed = time.monotonic()
    _assert_refused(_outcome(_try(run)), run, holder.pid)  # its lease still runs
    # The lease runs out (by the server's clock, to the second) without its renewals.
    time.sleep(max(0.0, killed + lease + 1.5 - time.monotonic()))
    rc, out, err = _outcome(_try(run))
    assert rc == 0 and out.strip() == "acquired", err
    assert f"took over the lock of pid {holder.pid} " in err
    assert _lease_body(run) is None  # released: deleted
    rc, out, err = _outcome(_try(run))  # the same name again (a resume): created afresh
    assert rc == 0 and out.strip() == "acquired" and "took over" not in err, err


def test_s3_two_takers_of_a_stale_lease_one_wins(bucket: str) -> None:
    run = f"{bucket}/runs/Y"
    _kill(_holder(run, lease=1, renew=0.5))
    time.sleep(2.5)
    start = time.time() + 5  # both processes ready (imports done), then the same instant
    takers = [_try(run, at=start, hold_s=6) for _ in range(2)]
    outcomes = [_outcome(p) for p in takers]
    won = [i for i, (rc, out, _) in enumerate(outcomes) if rc == 0 and out.strip() == "acquired"]
    assert len(won) == 1, outcomes
    _assert_refused(outcomes[1 - won[0]], run, takers[won[0]].pid)


def test_s3_conditional_update_refuses_a_stale_version(bucket: str) -> None:
    """The takeover step itself: a taker that read the stale lease after another took it over
    cannot overwrite the new holder's lease."""
    folder = urlpath.URLPath(f"{bucket}/runs/Z")
    _kill(_holder(str(folder), lease=1, renew=0.5))
    time.sleep(2.5)
    first, second = runlock.Lease(folder), runlock.Lease(folder)
    stale = second._read()
    first.acquire()
    try:
        second._read = lambda: stale  # type: ignore[method-assign]
        assert second._take_over_stale() is False  # If-Match on the stale e_tag: 412
        assert _lease_body(str(folder))["token"] == first.info["token"]
    finally:
        first.release()


def test_s3_holder_whose_lease_was_taken_stops(bucket: str) -> None:
    """Also when the holder ignores SIGINT (a background job): the renewing thread wakes the
    main thread with a signal of its own."""
    run = f"{bucket}/runs/W"
    holder = _holder(run, lease=2, renew=0.3, background=True)
    try:
        other = {"pid": 999999, "host": "elsewhere", "user": "u", "started": "t",
                 "command": "cellmorph train", "lease_s": 60}  # fmt: skip
        remote.write(f"{run}/{runlock.LOCK_NAME}", json.dumps(other).encode())
        out, err = holder.communicate(timeout=60)
    finally:
        _kill(holder)
    assert holder.returncode == 2 and "lost its lock to pid 999999" in err, err
    assert f"error: run W ({run}): stopped, its lock was taken over by pid 999999 " in err
    assert _lease_body(run)["pid"] == 999999  # the new holder's lease is left alone


# --------------------------------------------------------------------------- the commands


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_commands_refuse_a_run_another_process_writes(small_cfg, tmp_path: Path,
                                                     monkeypatch) -> None:  # fmt: skip
    """``cellmorph train --local`` (exit 2, one line, no run file touched), Ray training,
    ``evaluate`` and a sweep all refuse a run (or sweep folder) another process holds."""
    from cellmorph.config import dump_config
    from cellmorph.launch import run_ray_training
    from cellmorph.rundir import RunDir
    from cellmorph.sweep import load_sweep, run_sweep
    from cellmorph.train import evaluate_run, run_local

    cfg = small_cfg("busy", "train.epochs=1", "train.max_steps_per_epoch=1")
    dump_config(cfg, tmp_path / "busy.yaml")
    run = Path(cfg.run_dir)
    holder = _holder(str(run))
    try:
        before = _files(run)
        argv = [sys.executable, "-m", "cellmorph", "train", "--local", "--config",
                str(tmp_path / "busy.yaml")]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, env=_env(), cwd=ROOT,
                              timeout=300)  # fmt: skip
        _assert_refused((done.returncode, done.stdout, done.stderr), str(run), holder.pid)
        import cellmorph.launch

        def no_ray(*_a, **_k):  # Ray is never started for a refused run
            raise AssertionError("init_ray was called for a run another process holds")

        monkeypatch.setattr(cellmorph.launch, "init_ray", no_ray)
        for call in (lambda: run_ray_training(cfg), lambda: evaluate_run(RunDir(run))):
            with pytest.raises(CellmorphError, match=f"run busy .* by pid {holder.pid} "):
                call()
        assert _files(run) == before and list(before) == [runlock.LOCK_NAME]
    finally:
        _kill(holder)
    # The holder was killed (SIGKILL): the same name trains at once, and leaves no lock.
    assert [r["epoch"] for r in run_local(cfg).history()] == [0]
    assert not (run / runlock.LOCK_NAME).exists()
    sweep, base = load_sweep("configs/sweep.yaml", [f"run_root={run.parent}"])
    holder = _holder(str(run.parent / sweep.name))
    try:
        with pytest.raises(CellmorphError, match=f"sweep {sweep.name} .* by pid {holder.pid} "):
            run_sweep(sweep, base)
    finally:
        _kill(holder)
