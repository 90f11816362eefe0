"""`ray job submit` against a local head bound to 127.0.0.1, as the README shows."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """``ray start --head --block`` as a child process, ended by its process id (not ray stop)."""
    dash = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)  # never the session's shared test cluster
    log = (tmp_path / "head.log").open("w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={_free_port()}",
         "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         # Another Ray instance (the session's test cluster) already holds the default ports.
         f"--dashboard-agent-listen-port={_free_port()}",
         f"--dashboard-agent-grpc-port={_free_port()}",
         f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
         f"--ray-client-server-port={_free_port()}",
         f"--temp-dir={tempfile.mkdtemp(prefix='cmh-')}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except OSError:
            if head.poll() is not None:
                pytest.fail(f"ray head exited: {(tmp_path / 'head.log').read_text()[-2000:]}")
            time.sleep(1)
    else:
        pytest.fail("ray head's job server did not come up within 120 s")
    yield url, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


def test_job_submit_trains_on_the_cluster(ray_head, tiny_plate, tmp_path):
    url, env = ray_head
    runs = tmp_path / "runs"
    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(REPO), "--",
        "python", "-m", "ray_jobs.train", "--config", "configs/demo.yaml", "name=job",
        f"run_root={runs}", f"data.store={tiny_plate}", "data.val_fraction=0.5",
        "loader.batch_size=8", "loader.image_size=32", "model.width_mult=0.35",
        "train.epochs=1", "train.max_steps_per_epoch=2",
    ]  # fmt: skip
    for _ in range(30):  # the job agent starts a little after the dashboard answers
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=REPO)
        text = out.stdout + out.stderr
        if "No available agent to submit job" not in text:
            break
        time.sleep(2)
    assert out.returncode == 0, text[-3000:]
    assert "succeeded" in text
    lines = (runs / "job" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0]
    # .gitignore keeps the venv, data and runs out of the upload (Ray refuses packages > 512 MiB,
    # and the venv alone is several GB): a successful submit from this checkout shows it.
