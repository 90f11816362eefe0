"""Ray Train and Tune on the shared two-node local cluster (one CPU per node)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from helpers import read_events

from cellmorph.checkpoint import load_checkpoint
from cellmorph.config import load_config
from cellmorph.rundir import RunDir

pytestmark = [pytest.mark.ray, pytest.mark.slow]


TWO = ("ray.num_workers=2", "ray.cpus_per_worker=1")


def test_two_workers_on_two_nodes(ray_cluster, small_cfg, epochs_of):
    import ray

    from cellmorph.launch import run_ray_training

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2 and all(n["Resources"]["CPU"] == 1 for n in nodes)
    # Each worker needs the one CPU a node has: Ray must put one worker on each node.
    cfg = small_cfg("ddp", *TWO, "train.epochs=1", "train.max_steps_per_epoch=2")
    run_dir = run_ray_training(cfg).path
    assert epochs_of(run_dir) == [0]
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert record["world_size"] == 2
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 0 and ckpt["channels"] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.json").is_file()


def _wait_for(condition, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_killed_worker_resumes_from_last_checkpoint(ray_cluster, small_cfg, epochs_of):
    from cellmorph.launch import run_ray_training

    epochs = 8
    cfg = small_cfg("chaos", *TWO, f"train.epochs={epochs}", "ray.max_failures=2",
                    "train.max_steps_per_epoch=2")  # fmt: skip
    run = RunDir(cfg.run_dir)
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["run"] = run_ray_training(cfg, quiet=True)
        except Exception as e:  # reported by the assertion below
            outcome["error"] = e

    thread = threading.Thread(target=train)
    thread.start()
    # The run names its worker processes in its start event; kill rank 0 (the one that writes
    # the run's files) once epoch 0 is checkpointed.
    _wait_for(lambda: run.last_checkpoint.is_file(), "epoch 0's checkpoint")
    start = read_events(run)[0]
    assert start["event"] == "start" and [w["rank"] for w in start["workers"]] == [0, 1]
    logged = epochs_of(run.path)
    assert len(logged) < epochs, "the run finished before the kill"
    os.kill(start["workers"][0]["pid"], signal.SIGKILL)
    thread.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    assert epochs_of(run.path) == list(range(epochs))  # every epoch once, across the restart
    resumes = [e for e in read_events(run) if e["event"] == "resume"]
    assert len(resumes) == 1 and 1 <= resumes[0]["epoch"] <= len(logged)
    assert resumes[0]["workers"][0]["pid"] != start["workers"][0]["pid"]
    assert load_checkpoint(run.last_checkpoint)["epoch"] == epochs - 1
    assert not list(run.path.rglob("*.tmp"))  # the killed writer's temporary files are gone


def test_tune_two_trial_sweep_runs_to_the_end(ray_cluster, tiny_plate, tmp_path):
    from cellmorph.sweep import load_sweep, run_sweep

    sweep_yaml = tmp_path / "sweep.yaml"
    sweep_yaml.write_text(
        f"""
name: s
base: configs/demo.yaml
overrides: [run_root={tmp_path / "runs"}, data.store={tiny_plate}, data.val_fraction=0.5,
            loader.batch_size=8, loader.image_size=32, model.width_mult=0.35,
            train.epochs=2, train.max_steps_per_epoch=2, ray.num_workers=1, data.test_fraction=0]
num_samples: 2
space:
  optim.lr: {{choice: [0.001, 0.01]}}
"""
    )
    sweep, base = load_sweep(sweep_yaml)
    out = run_sweep(sweep, base)
    assert (out / "best_config.yaml").is_file()
    assert (out / "best.pt").is_file()
    best = load_config(out / "best_config.yaml")
    assert best.optim.lr in (0.001, 0.01)
    import pandas as pd

    assert len(pd.read_csv(out / "results.csv")) == 2
