"""Shared fixtures: one local Ray cluster per test session, GPU skipping, small plates."""

from __future__ import annotations

import os
import tempfile
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
    """One local Ray instance for the whole test session (2 CPUs), in a fresh temp dir.

    Tests that need Ray take this fixture; starting Ray costs tens of seconds on 2 cores.
    """
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="cm-ray-"))
    ray.init(
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        _temp_dir=str(tmp),
        configure_logging=False,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()
