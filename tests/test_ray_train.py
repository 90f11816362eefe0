"""Ray Train on the shared two-node local cluster (one CPU per node): two workers, one per
node, one of them killed mid-run.

A two-trial Tune sweep runs to its end (results.csv, best_config.yaml, best.pt) in
tests/test_readme.py (``ray job submit ... ray_jobs.tune``), which checks what it wrote."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from helpers import read_events

from cellmorph.checkpoint import load_checkpoint
from cellmorph.rundir import RunDir

pytestmark = [pytest.mark.ray, pytest.mark.slow]


TWO = ("ray.num_workers=2", "ray.cpus_per_worker=1")


def _wait_for(condition, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_two_workers_on_two_nodes_and_a_killed_worker_resumes(ray_cluster, small_cfg,
                                                                epochs_of):  # fmt: skip
    """One run proves both: the workers land one per node (each needs its node's one CPU)
    and train as one world of 2; rank 0 is killed after epoch 0's checkpoint and the run
    resumes from it, logging every epoch once."""
    import ray

    from cellmorph.launch import run_ray_training

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2 and all(n["Resources"]["CPU"] == 1 for n in nodes)

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
    records = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert {r["world_size"] for r in records} == {2}
    ckpt = load_checkpoint(run.last_checkpoint)
    assert ckpt["epoch"] == epochs - 1 and ckpt["channels"] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert (run.path / "config.yaml").is_file() and (run.path / "metrics.json").is_file()
    assert not list(run.path.rglob("*.tmp"))  # the killed writer's temporary files are gone
