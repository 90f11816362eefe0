"""The whole flow with everything in a bucket of a real S3 server, as a user runs it: convert
with ``ray_jobs.convert`` -> train with 2 Ray workers and ``run_root=s3://...`` -> kill a
worker -> the run resumes from the bucket -> predict -> report; and no output holds the secret.

The jobs run as processes with the standard AWS variables set, each on its own local Ray
instance (workers inherit the variables from it, as on a cluster whose nodes have them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TEST_SECRET
from helpers import read_events

from cellmorph import remote
from cellmorph.rundir import RunDir

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    return {**env, "PYTHONPATH": os.getcwd(), "RAY_AUTH_MODE": "disabled"}


def _run(args: list[str], log: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_env(),
                       timeout=timeout)  # fmt: skip
    log.write_text(r.stdout + r.stderr)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _wait(condition, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_bucket_flow_convert_train_kill_resume_predict_report(bucket, tmp_path) -> None:
    from cellmorph.config import SynthConfig
    from cellmorph.synth import generate_plate

    csv = generate_plate(SynthConfig(out=str(tmp_path / "raw"), plates=2, rows=3, cols=4, sites=2,
                                     size=48), progress=False)  # fmt: skip
    store, root = f"{bucket}/plates.zarr", f"{bucket}/runs"
    _run(["-m", "ray_jobs.convert", "--address", "local", "--load-data", str(csv), "--out", store,
          "--size", "40", "--shard-size", "16"], tmp_path / "convert.log")  # fmt: skip
    assert remote.size(f"{store}/metadata.parquet")

    epochs = 6
    args = ["-m", "ray_jobs.train", "--config", "configs/demo.yaml", "name=e2e",
            f"run_root={root}", f"data.store={store}", "data.val_fraction=0.5",
            "data.test_fraction=0", "train.min_steps=0", f"train.epochs={epochs}",
            "train.max_steps_per_epoch=2", "loader.batch_size=8", "loader.eval_batch_size=32",
            "loader.image_size=32", "model.width_mult=0.35", "ray.num_workers=2",
            "ray.max_failures=1", f"loader.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    log = (tmp_path / "train.log").open("w")
    job = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                           env=_env(), start_new_session=True)  # fmt: skip
    run = RunDir(f"{root}/e2e")
    try:
        _wait(run.last_checkpoint.is_file, "epoch 0's checkpoint in the bucket")
        start = read_events(run)[0]
        assert start["event"] == "start" and [w["rank"] for w in start["workers"]] == [0, 1]
        assert len(run.history()) < epochs, "the run finished before the kill"
        os.kill(start["workers"][0]["pid"], signal.SIGKILL)  # rank 0: it writes the run
        assert job.wait(timeout=400) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        log.close()
    assert [r["epoch"] for r in run.history()] == list(range(epochs))  # each once, across it
    resumes = [e for e in read_events(run) if e["event"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["workers"][0]["pid"] != start["workers"][0]["pid"]
    names = {k for k, _ in remote.list_objects(str(run.path))}
    assert {"checkpoints/last.pt", "checkpoints/best.pt", "metrics.json", "config.yaml",
            "logs/ray-driver.log"} <= names  # fmt: skip
    assert not any(k.endswith("checkpoint.pt") for k in names)  # one checkpoint system: ours

    preds = f"{bucket}/predictions"
    _run(["-m", "cellmorph", "predict", "--checkpoint", str(run.best_checkpoint), "--store",
          store, "--out", preds], tmp_path / "predict.log")  # fmt: skip
    _run(["-m", "cellmorph", "evaluate", str(run.path), "--report-only"], tmp_path / "report.log")
    assert remote.size(f"{preds}/predictions.parquet") and run.report.is_file()

    # The secret key was in every process's environment; it is in no output.
    # (empty objects are folder markers pyarrow puts for Ray's storage_path)
    everything = [remote.read(f"{bucket}/{k}") for k, n in remote.list_objects(bucket) if n]
    everything += [p.read_bytes() for p in tmp_path.glob("*.log")]
    assert everything and not any(TEST_SECRET.encode() in b for b in everything)
