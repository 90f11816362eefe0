"""Experiment tracking against a real ``mlflow server`` process (read back with MLflow's client)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
FAST = ("train.max_steps_per_epoch=2", "train.bn_calibration_images=16")


def test_a_run_logs_params_epochs_and_artifacts_and_resumes_into_the_same_run(
    mlflow_server, small_cfg
):
    from mlflow.tracking import MlflowClient

    from cellmorph.cli import publish_report
    from cellmorph.rundir import RunDir
    from cellmorph.train import run_local

    uri = ("tracking.mlflow_uri=" + mlflow_server, "tracking.experiment=cm-test", *FAST)
    run = run_local(small_cfg("tracked", "train.epochs=1", *uri))
    run = run_local(small_cfg("tracked", "train.epochs=2", *uri))  # resumed: same MLflow run
    publish_report(run)  # the report, then into the run's MLflow run
    known = RunDir(run.path).read_json(run.tracking)
    client = MlflowClient(tracking_uri=mlflow_server)
    got = client.get_run(known["mlflow_run_id"])
    assert got.info.status == "FINISHED" and got.info.run_name == "tracked"
    assert got.data.params["train.epochs"] == "1"  # the config it started with
    assert got.data.params["loader.batch_size"] == "8"
    steps = client.get_metric_history(got.info.run_id, "balanced_accuracy")
    assert sorted(m.step for m in steps) == [0, 1]  # every epoch once, across the resume
    names = {a.path for a in client.list_artifacts(got.info.run_id)}
    assert {"metrics.json", "best.pt", "report.html"} <= names
    exp = client.get_experiment_by_name("cm-test")
    assert len(client.search_runs([exp.experiment_id])) == 1


def test_a_trial_is_a_child_of_its_sweep(mlflow_server, small_cfg) -> None:
    from mlflow.tracking import MlflowClient

    from cellmorph import tracking
    from cellmorph.sweep import trial_config
    from cellmorph.train import run_local

    base = small_cfg("sweep-base", "train.epochs=1", f"tracking.mlflow_uri={mlflow_server}",
                     "tracking.experiment=cm-sweep", *FAST)  # fmt: skip
    parent = tracking.start_sweep(base, "sweep", {"optim.lr": {"choice": [0.01]}})
    trial = trial_config(base, {"tracking.parent_run_id": parent, "optim.lr": 0.01}, "trial-1")
    run = run_local(trial)
    tracking.finish_sweep(base, parent, {"balanced_accuracy": 0.5})
    client = MlflowClient(tracking_uri=mlflow_server)
    child = client.get_run(run.read_json(run.tracking)["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(parent).data.metrics["best.balanced_accuracy"] == 0.5


def test_off_by_default_and_mlflow_not_imported() -> None:
    code = (
        "import sys; from cellmorph.config import load_config; import cellmorph.train, "
        "cellmorph.report; from cellmorph import tracking; cfg = load_config('configs/demo.yaml');"
        "assert cfg.tracking.mlflow_uri is None and tracking.start(cfg, None) is None;"
        "print('mlflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_an_unreachable_server_is_one_line(small_cfg, monkeypatch) -> None:
    from cellmorph.errors import CellmorphError

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own setting
    from cellmorph.rundir import RunDir
    from cellmorph.tracking import Tracker

    cfg = small_cfg("nowhere", "tracking.mlflow_uri=http://127.0.0.1:9")
    with pytest.raises(CellmorphError, match=r"tracking.mlflow_uri http://127.0.0.1:9: cannot"):
        Tracker(cfg, RunDir(cfg.run_dir))
