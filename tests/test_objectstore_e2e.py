"""The whole flow with everything in a bucket of a real S3 server, as a user runs it: convert
with ``ray_jobs.convert`` -> train with 2 Ray workers and ``run_root=s3://...`` -> predict ->
report; and no output holds the secret. (A killed Ray worker's restart is
tests/test_ray_train.py's; resuming a run from a bucket's ``last.pt`` is tests/test_objectstore.py's:
each restart costs a Ray worker group's start-up, about a minute on 2 cores.)

The jobs run as processes with the standard AWS variables set, each on its own local Ray
instance (workers inherit the variables from it, as on a cluster whose nodes have them)."""

from __future__ import annotations

import os
import subprocess
import sys
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


def test_bucket_flow_convert_train_predict_report(bucket, tmp_path) -> None:
    from cellmorph.config import SynthConfig
    from cellmorph.synth import generate_plate

    csv = generate_plate(SynthConfig(out=str(tmp_path / "raw"), plates=2, rows=3, cols=4, sites=2,
                                     size=48), progress=False)  # fmt: skip
    store, root = f"{bucket}/plates.zarr", f"{bucket}/runs"
    _run(["-m", "ray_jobs.convert", "--address", "local", "--load-data", str(csv), "--out", store,
          "--size", "40", "--shard-size", "16"], tmp_path / "convert.log")  # fmt: skip
    assert remote.size(f"{store}/metadata.parquet")

    epochs = 2
    args = ["-m", "ray_jobs.train", "--config", "configs/demo.yaml", "name=e2e",
            f"run_root={root}", f"data.store={store}", "data.val_fraction=0.5",
            "data.test_fraction=0", "train.min_steps=0", f"train.epochs={epochs}",
            "train.max_steps_per_epoch=2", "loader.batch_size=8", "loader.eval_batch_size=32",
            "loader.image_size=32", "model.width_mult=0.35", "ray.num_workers=2",
            f"loader.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    _run(args, tmp_path / "train.log", timeout=400)
    run = RunDir(f"{root}/e2e")
    assert [r["epoch"] for r in run.history()] == list(range(epochs))
    (start,) = read_events(run)
    assert start["event"] == "start" and [w["rank"] for w in start["workers"]] == [0, 1]
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
