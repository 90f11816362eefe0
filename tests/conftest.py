"""Shared fixtures: one local Ray cluster per test session, GPU skipping, small plates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray cluster for the whole test session: two nodes of one CPU each, on this machine.

    Two nodes let the multi-node tests place one training worker per node; every Ray test
    shares it because starting Ray costs tens of seconds on 2 cores.
    """
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1, num_gpus=0)
    ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def tiny_plate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic plate converted to a store (48 sites at 40 px), shared read-only."""
    from cellmorph.config import ConvertConfig, SynthConfig
    from cellmorph.synth import generate_plate
    from conversion.pack import convert

    root = tmp_path_factory.mktemp("tiny")
    csv = generate_plate(
        SynthConfig(out=str(root / "raw"), plates=2, rows=3, cols=4, sites=2, size=48),
        progress=False,
    )
    store = root / "store.zarr"
    convert(ConvertConfig(load_data=str(csv), size=40, shard_size=16, workers=1), store)
    return store


@pytest.fixture
def small_cfg(tiny_plate: Path, tmp_path: Path):
    """``small_cfg(name, *overrides)``: the demo config shrunk to the tiny plate, runs in tmp."""
    from cellmorph.config import load_config

    def make(name: str, *extra: str):
        return load_config(
            "configs/demo.yaml",
            [
                f"name={name}",
                f"run_root={tmp_path / 'runs'}",
                f"data.store={tiny_plate}",
                "data.val_fraction=0.5",
                "data.test_fraction=0",  # 24 wells: too few for three folds; see test_train
                "train.min_steps=0",  # tests size their runs in epochs
                "loader.batch_size=8",
                "loader.eval_batch_size=32",
                "loader.image_size=32",
                "model.width_mult=0.35",
                "ray.num_workers=1",
                *extra,
            ],
        )

    return make


def logged_epochs(run_dir: Path) -> list[int]:
    """Epoch numbers in a run's metrics.jsonl, in file order."""
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines if line.strip()]


@pytest.fixture
def epochs_of():
    return logged_epochs
