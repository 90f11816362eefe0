"""Ray Train and Tune on the shared two-node local cluster (one CPU per node)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from cellmorph.checkpoint import load_checkpoint
from cellmorph.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


TWO = ("ray.num_workers=2", "ray.cpus_per_worker=1")


def test_two_workers_on_two_nodes(ray_cluster, small_cfg, epochs_of):
    import ray

    from cellmorph.launch import run_ray_training

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2 and all(n["Resources"]["CPU"] == 1 for n in nodes)
    # Each worker needs the one CPU a node has: Ray must put one worker on each node.
    cfg = small_cfg("ddp", *TWO, "train.epochs=1", "train.max_steps_per_epoch=2")
    run_dir = run_ray_training(cfg)
    assert epochs_of(run_dir) == [0]
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert record["world_size"] == 2
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 0 and ckpt["channels"] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.json").is_file()


def _train_workers(since: float) -> list:
    """This run's Ray Train worker processes (started after ``since``: earlier tests' workers
    may still be exiting)."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "RayTrainWorker" in cmd and p.info["create_time"] >= since:
            procs.append(p)
    return procs


def test_killed_worker_resumes_from_last_checkpoint(ray_cluster, small_cfg, epochs_of):
    from cellmorph.launch import run_ray_training

    cfg = small_cfg("chaos", *TWO, "train.epochs=3", "ray.max_failures=2")
    run_dir = cfg.run_dir
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["run_dir"] = run_ray_training(cfg)
        except Exception as e:  # reported by the assertion below
            outcome["error"] = e

    thread = threading.Thread(target=train)
    started = time.time() - 1.0  # process create_time has coarse resolution
    thread.start()
    killed = None
    deadline = time.time() + 240
    while thread.is_alive() and time.time() < deadline and killed is None:
        jsonl = run_dir / "metrics.jsonl"
        if jsonl.is_file() and jsonl.read_text().strip():
            workers = _train_workers(started)
            if workers:
                killed = workers[-1].pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.1)
    thread.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    assert killed is not None, "training finished before a worker could be killed"
    assert epochs_of(run_dir) == [0, 1, 2]  # every epoch exactly once, across the restart
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "resume" and e["epoch"] >= 1 for e in events)
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 2


def test_tune_two_trial_sweep_runs_to_the_end(ray_cluster, tiny_plate, tmp_path):
    from cellmorph.sweep import load_sweep, run_sweep

    sweep_yaml = tmp_path / "sweep.yaml"
    sweep_yaml.write_text(
        f"""
name: s
base: configs/demo.yaml
overrides: [run_root={tmp_path / "runs"}, data.store={tiny_plate}, data.val_fraction=0.5,
            loader.batch_size=8, loader.image_size=32, model.width_mult=0.35,
            train.epochs=2, train.max_steps_per_epoch=2, ray.num_workers=1]
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
