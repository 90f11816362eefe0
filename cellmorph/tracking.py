"""Experiment tracking with MLflow (``tracking.mlflow_uri``), off by default.

Rank 0 of a run logs the resolved config as params, every epoch's metrics (step = epoch), and
at the end ``metrics.json`` and the best checkpoint as artifacts; ``build_report`` adds the
report. A resumed run continues its MLflow run (its id is kept in the run directory,
``tracking.json``). A Tune sweep opens one run and each trial is a child run of it
(``tracking.parent_run_id``, set by the sweep).

Nothing is sent anywhere unless ``tracking.mlflow_uri`` is set, and mlflow (slow to import) is
imported only then. Credentials for the server come from MLflow's own variables
(``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN``), never from the config.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from cellmorph.config import Config, TrackingConfig, config_to_dict
from cellmorph.errors import CellmorphError
from cellmorph.rundir import RunDir
from cellmorph.urlpath import local_copy

MAX_PARAM = 500  # MLflow's limit on a param value's length


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train.epochs": "12", ...}``: the config's leaves as MLflow params."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:MAX_PARAM]
    return out


# A server that does not answer fails the run in seconds, not minutes (MLflow's own defaults
# retry for several minutes); the user's MLFLOW_HTTP_REQUEST_* settings win.
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}  # fmt: skip


def _client(uri: str) -> Any:
    import os

    for k, v in CLIENT_DEFAULTS.items():
        os.environ.setdefault(k, v)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment(client: Any, cfg: TrackingConfig) -> str:
    exp = client.get_experiment_by_name(cfg.experiment)
    return exp.experiment_id if exp is not None else client.create_experiment(cfg.experiment)


def _guard(uri: str, what: str, fn: Any) -> Any:
    try:
        return fn()
    except CellmorphError:
        raise
    except Exception as e:  # mlflow raises its own and requests' errors for a bad server
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CellmorphError(f"tracking.mlflow_uri {uri}: cannot {what} ({line})") from None


class Tracker:
    """Rank 0's MLflow run for one training run."""

    def __init__(self, cfg: Config, run: RunDir):
        self.uri = str(cfg.tracking.mlflow_uri)
        self.client = _guard(self.uri, "connect", lambda: _client(self.uri))
        self.run_dir = run
        known = run.read_json(run.tracking, required=False) or {}
        self.run_id = known.get("mlflow_run_id")
        if self.run_id is None:
            self.run_id = _guard(self.uri, "create a run", lambda: self._create(cfg))
            run.write_tracking({"mlflow_uri": self.uri, "mlflow_run_id": self.run_id})

    def _create(self, cfg: Config) -> str:
        tags = {"cellmorph.run_dir": str(self.run_dir.path)}
        if cfg.tracking.parent_run_id:
            tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
        exp = _experiment(self.client, cfg.tracking)
        run_id = self.client.create_run(exp, run_name=cfg.name, tags=tags).info.run_id
        self.log_params(run_id, flatten(config_to_dict(cfg)))
        return run_id

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_epoch(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(record["epoch"])
        metrics = [Metric(k, float(v), now, step) for k, v in record.items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and k != "epoch"
                   and math.isfinite(float(v))]  # fmt: skip
        _guard(self.uri, "log metrics", lambda: self.client.log_batch(self.run_id, metrics=metrics))

    def finish(self) -> None:
        """The result and the best checkpoint as artifacts; the run marked finished."""
        for path in (self.run_dir.result, self.run_dir.best_checkpoint):
            if path.is_file():
                log_artifact(self.client, self.run_id, path, self.uri)
        _guard(self.uri, "end the run", lambda: self.client.set_terminated(self.run_id, "FINISHED"))


def log_artifact(client: Any, run_id: str, path: Any, uri: str) -> None:
    with local_copy(path) as local:
        _guard(uri, f"upload {path.name}", lambda: client.log_artifact(run_id, str(local)))


def start(cfg: Config, run: RunDir) -> Tracker | None:
    """The run's tracker, or None when ``tracking.mlflow_uri`` is not set (nothing is sent)."""
    return Tracker(cfg, run) if cfg.tracking.mlflow_uri else None


def log_report(run: RunDir) -> None:
    """Add ``report.html`` to the run's MLflow run, if the run is tracked."""
    known = run.read_json(run.tracking, required=False)
    if not known or not run.report.is_file():
        return
    uri = known["mlflow_uri"]
    log_artifact(
        _guard(uri, "connect", lambda: _client(uri)), known["mlflow_run_id"], run.report, uri
    )


def start_sweep(cfg: Config, name: str, space: dict[str, Any]) -> str | None:
    """A sweep's parent run (its id, for the trials' ``tracking.parent_run_id``), or None."""
    if not cfg.tracking.mlflow_uri:
        return None
    uri = cfg.tracking.mlflow_uri
    client = _guard(uri, "connect", lambda: _client(uri))

    def create() -> str:
        exp = _experiment(client, cfg.tracking)
        run_id = client.create_run(exp, run_name=name, tags={"cellmorph.sweep": name}).info.run_id
        client.log_param(run_id, "space", json.dumps(space, default=str)[:MAX_PARAM])
        return run_id

    return _guard(uri, "create the sweep's run", create)


def finish_sweep(cfg: Config, run_id: str | None, best: dict[str, Any]) -> None:
    if run_id is None:
        return
    uri = str(cfg.tracking.mlflow_uri)
    client = _guard(uri, "connect", lambda: _client(uri))
    metrics = {k: float(v) for k, v in best.items() if isinstance(v, int | float)}

    def end() -> None:
        for k, v in metrics.items():
            client.log_metric(run_id, f"best.{k}", v)
        client.set_terminated(run_id, "FINISHED")

    _guard(uri, "end the sweep's run", end)
