"""Shared fixtures: one local Ray cluster per test session, GPU skipping, small plates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
# One torch/OpenMP thread per process: the suite runs 2 pytest workers plus Ray's processes on
# 2 cores, and OpenMP's spinning threads on an oversubscribed CPU made a small training step
# 15-80x slower (measured: 0.06 s with one thread, 0.8-4.6 s with two). Subprocesses and the
# session's Ray nodes inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ray Train gives a worker group 60 s to start; the two Ray groups below share 2 cores with the
# other tests, and a start-up slowed past that would fail a test for the machine's load.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


# pytest-xdist (`make test` runs `-n 2 --dist loadgroup`): tests that share one expensive
# session or module fixture run on one worker, so that it is built once per run. Two groups
# hold the tests that start Ray, each on one worker, one test at a time:
# - "ray": the tests on the session's cluster (`ray_cluster`, and the scale bench's work
#   folder its training stage reuses);
# - "ray-own": the tests that start a Ray instance of their own in child processes (the
#   README's head and jobs, the bucket flow's jobs).
# A Ray test mostly waits (actor start-ups one after another, Ray Train's polls: 4 min of CPU
# in 12 min when all ran in turn), so the two groups run side by side (suite 14 min, was 15
# with one group). They used to be one group after CI saw a README head's dashboard gone while
# another Ray instance timed out; that was with two OpenMP threads per process (above), which
# made every process on the 2 cores many times slower.
# (pytest is pinned to 9.1.1: under pytest 9.2 pytest-xdist 3.8's loadgroup silently spreads a
# group over workers; pytest_configure below refuses such a pairing.)
SHARED = {"ray_cluster": "ray", "mlflow_server": "mlflow", "scale_work": "ray",
          "scored": "distributed_eval"}  # fmt: skip


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        group = next((g for f, g in SHARED.items() if f in item.fixturenames), None)
        group = group or ("ray-own" if "ray" in item.keywords else None)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    # Modules with Ray tests (the longest: tens of seconds each) first, each module's tests in
    # their order: under xdist they start early instead of being the run's long tail.
    first = {item.module.__name__ for item in items if "ray" in item.keywords and item.module}
    items.sort(key=lambda item: (item.module.__name__ if item.module else "") not in first)
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config: pytest.Config) -> None:
    """Under ``--dist loadgroup`` pytest-xdist 3.8 sends a group to one worker by assigning
    ``item._nodeid`` (a ``@group`` suffix); a pytest whose ids no longer come from that slot
    would run each group's shared cluster or server twice, side by side. Stop instead."""
    import _pytest.nodes

    if (
        config.getoption("dist", "no") == "loadgroup"
        and "_nodeid" not in _pytest.nodes.Node.__slots__
    ):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} ignores pytest-xdist's test groups: "
            "install the pinned versions (requirements.txt)"
        )


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


# --------------------------------------------------------------------------- servers as processes
# A real S3-compatible server (moto's standalone server) and an MLflow tracking server, from
# their own pinned venv (`make servers`, requirements-servers.txt), each started on a free port
# of 127.0.0.1 and ended by its process id.

ROOT = Path(__file__).resolve().parent.parent
SERVERS_BIN = Path(os.environ.get("CELLMORPH_SERVERS_VENV", ROOT / ".venv-servers")) / "bin"
# A secret no output may contain (tests/test_objectstore_e2e.py greps for it).
TEST_SECRET = "cellmorph-test-secret-7f3a9c1e5b"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_exe(name: str) -> Path:
    exe = SERVERS_BIN / name
    if not exe.exists():
        pytest.skip(f"{exe} is missing: run `make servers` (requirements-servers.txt)")
    return exe


class ServerProcess:
    """A server started in its own session; stopped by its process id (and its group's)."""

    def __init__(self, argv: list[str], url: str, log: Path, env: dict | None = None,
                 ready_path: str = "/", timeout: float = 90):  # fmt: skip
        import subprocess
        import time
        import urllib.error
        import urllib.request

        self.url, self.log = url, log
        self.proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **(env or {})})  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(url + ready_path, timeout=2)
                return
            except urllib.error.HTTPError:  # it answers (an error for an unsigned probe)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"{argv[0]} did not start: {log.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.2)

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the group this server leads
                self.proc.wait(timeout=20)
            except Exception:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)


class S3Server(ServerProcess):
    """moto's standalone S3 server; buckets made with a plain PUT (moto needs no signature)."""

    def make_bucket(self, name: str) -> str:
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{self.url}/{name}", method="PUT"))
        return f"s3://{name}"


def start_s3_server(tmp: Path, env: dict | None = None) -> S3Server:
    port = free_port()
    exe = server_exe("moto_server")
    return S3Server([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                    f"http://127.0.0.1:{port}", tmp / f"moto-{port}.log", env)  # fmt: skip


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """One S3 server for the session; the standard AWS variables point this process (and the
    processes it starts) at it, with a secret key that no output may contain."""
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    env = {
        "AWS_ENDPOINT_URL": server.url,
        "AWS_ACCESS_KEY_ID": "cellmorph-test-key",
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET,
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def bucket(s3_server, request: pytest.FixtureRequest) -> str:
    """A fresh bucket for one test: ``s3://<name>``."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    return s3_server.make_bucket(f"{name}-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """``mlflow server`` with a file-store backend on a free port of 127.0.0.1: its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    exe = server_exe("mlflow")
    argv = [str(exe), "server", "--backend-store-uri", str(root / "store"),
            "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1"]  # fmt: skip
    server = ServerProcess(argv, f"http://127.0.0.1:{port}", root / "server.log",
                           env={"MLFLOW_ALLOW_FILE_STORE": "true"}, ready_path="/health")  # fmt: skip
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def coded(tmp_path_factory: pytest.TempPathFactory):
    """A store whose flat images encode their row (helpers.coded_pixels), shared per module."""
    from helpers import coded_pixels, make_pixel_store

    return make_pixel_store(tmp_path_factory.mktemp("coded") / "s.zarr", coded_pixels())
