"""Ray Train wiring: config -> ScalingConfig/RunConfig/TorchTrainer, and the worker entry point.

The launchers in ``ray_jobs/``, the ``cellmorph train``/``demo`` commands and the sweep all go
through here, so a run looks the same whether it came from a workstation or ``ray job submit``.
This module imports no torch at module level: the Ray driver only plans and watches.

What the user sees: one line per epoch (and a progress bar on a terminal) from the run
directory's files, and one line for a mistake. Ray's own driver log and every rank's log stay in
``<run>/logs/``; worker output is not forwarded to the driver.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import traceback
from pathlib import Path
from typing import Any

from cellmorph import atomic, runlock
from cellmorph.config import (
    Config,
    RayConfig,
    config_from_dict,
    config_to_dict,
    resolve_from_store,
)
from cellmorph.errors import CellmorphError, fault_message, one_line
from cellmorph.rundir import RunDir
from cellmorph.store.files import check_outside_store
from cellmorph.urlpath import AnyPath, URLPath, as_path


def resolve_paths(cfg: Config) -> Config:
    """A copy of ``cfg`` with absolute paths: Ray workers do not share the driver's cwd."""
    raw = config_to_dict(cfg)
    raw["run_root"] = str(as_path(cfg.run_root).expanduser().resolve())  # URLs stay as given
    raw["data"]["store"] = str(as_path(cfg.data.store).expanduser().resolve())
    if cfg.model.pretrained:
        raw["model"]["pretrained"] = str(Path(cfg.model.pretrained).expanduser().resolve())
    return config_from_dict(raw)


def check_upload_paths(cfg: Config) -> None:
    """Refuse relative paths inside ``ray job submit --working-dir``'s copy of the working dir.

    The job runs in an unpacked copy of the upload, which leaves out what .gitignore lists
    (``data/``, ``runs/``) and goes away with the job's session, so a relative ``data.store``
    would not be found and a relative ``run_root`` would be lost. The client's shell can
    resolve them before the upload: ``data.store=$PWD/data/demo/store.zarr``.
    """
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    if not (job.get("runtime_env") or {}).get("working_dir"):
        return  # not a job with an uploaded working dir: relative means the cwd, as typed
    paths = {"data.store": cfg.data.store, "run_root": cfg.run_root}
    if cfg.model.pretrained:
        paths["model.pretrained"] = cfg.model.pretrained
    for key, value in paths.items():
        if not as_path(value).expanduser().is_absolute():
            raise CellmorphError(
                f"{key}: {value!r} is a relative path, and this job runs in Ray's copy of the "
                f"uploaded working dir ({Path.cwd()}), which leaves out data/ and runs/: pass an "
                f"absolute path on the submit line, e.g. {key}=$PWD/{value}"
            )


def check_run_root_outside_store(cfg: Config) -> None:
    """``run_root`` may not be the store or inside it (``convert --overwrite`` would delete the
    runs); opens no file. ``cellmorph.train.run_local`` makes the same check."""
    check_outside_store(cfg.run_root, cfg.data.store, "run_root")


def preflight(cfg: Config, *, warn: bool = True) -> None:
    """Fail in the driver, with a message naming the setting, before any worker starts."""
    from cellmorph.index import build_index, check_batch_size
    from cellmorph.store.read import open_store

    check_run_root_outside_store(cfg)
    cfg = resolve_from_store(cfg)  # the driver's callers did; a direct call may not have
    store = open_store(cfg.data.store, columns=[cfg.data.label_column])  # the workers' columns
    check_batch_size(cfg.loader.batch_size, build_index(store.metadata, cfg.data, warn=warn))
    if cfg.model.pretrained and not Path(cfg.model.pretrained).is_file():
        raise CellmorphError(f"model.pretrained: no such file {cfg.model.pretrained}")


def local_log_dir(log_dir: AnyPath) -> Path:
    """Where a process writes a log file for ``log_dir``: itself, or for a run in an object
    store a local folder whose files :func:`upload_logs` puts there at the end."""
    if not isinstance(log_dir, URLPath):
        return Path(log_dir)
    import hashlib

    tag = hashlib.blake2b(log_dir.url.encode(), digest_size=6).hexdigest()
    return Path(tempfile.gettempdir()) / f"cellmorph-logs-{tag}"


def upload_logs(log_dir: AnyPath) -> None:
    """Put the local log files of a run in an object store into its ``logs/`` (best effort: a
    log must never fail the run it describes)."""
    local = local_log_dir(log_dir)
    if local == log_dir or not local.is_dir():
        return
    for f in local.iterdir():
        with contextlib.suppress(Exception):
            atomic.write_bytes(log_dir / f.name, f.read_bytes())


def log_ray_to(log_dir: AnyPath) -> Path:
    """Send Ray's driver-side log records to ``log_dir/ray-driver.log`` instead of the terminal."""
    log_dir = local_log_dir(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "ray-driver.log"
    logger = logging.getLogger("ray")
    for h in list(logger.handlers):  # Ray's own stderr handler, or the previous run's file
        if getattr(h, "_cellmorph", False) or isinstance(h, logging.StreamHandler):
            logger.removeHandler(h)
    handler = logging.FileHandler(path)
    handler._cellmorph = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return path


def init_ray(cfg: RayConfig, log_dir: AnyPath) -> None:
    """Connect to ``ray.address`` (or start a local instance bound to 127.0.0.1)."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Worker output stays in each rank's log file (the driver shows progress from the run
        # directory); while Ray starts, only its errors reach the terminal.
        quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
        if cfg.address:
            ray.init(address=cfg.address, **quiet)
        elif os.environ.get("RAY_ADDRESS"):  # inside `ray job submit`: join that cluster
            ray.init(**quiet)
        else:  # a fresh local instance, never a stale or unrelated cluster on this host
            ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                     **quiet)  # fmt: skip
    log_ray_to(log_dir)


def check_resources(cfg: RayConfig) -> None:
    """Refuse requests the cluster can never satisfy (Ray would wait for them forever)."""
    import ray

    total = ray.cluster_resources()
    if cfg.use_gpu:
        need = cfg.num_workers * cfg.gpus_per_worker
        if total.get("GPU", 0) < need:
            raise CellmorphError(
                f"ray.use_gpu: {cfg.num_workers} workers x {cfg.gpus_per_worker} GPU need {need:g} "
                f"GPUs, the cluster has {total.get('GPU', 0):g}"
            )
    need_cpu = cfg.num_workers * cfg.cpus_per_worker
    if total.get("CPU", 0) < need_cpu:
        raise CellmorphError(
            f"ray.num_workers: {cfg.num_workers} workers x {cfg.cpus_per_worker:g} CPU need "
            f"{need_cpu:g} CPUs, the cluster has {total.get('CPU', 0):g}"
        )


def ray_worker(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` for TorchTrainer: builds a Context from Ray Train's."""
    import ray.train
    import ray.train.torch

    from cellmorph.distributed import Context
    from cellmorph.train import train_loop

    cfg = config_from_dict(config["cfg"])
    run = RunDir(cfg.run_dir)
    tctx = ray.train.get_context()
    rank = tctx.get_world_rank()
    if rank == 0:
        _record_placement_group(run)

    # Only metrics go to Ray: the run directory's checkpoints are the one checkpoint system
    # (resume reads checkpoints/last.pt), so nothing is copied into Ray's storage.
    ctx = Context(
        rank=rank,
        world_size=tctx.get_world_size(),
        device=ray.train.torch.get_device(),
        report=ray.train.report,
        wrap_model=lambda m: ray.train.torch.prepare_model(m, move_to_device=False),
        console=False,
    )
    try:
        train_loop(cfg, ctx)
    except BaseException:
        run.logs.mkdir(parents=True, exist_ok=True)
        with (run.logs / f"rank{rank}.log").open("a") as f:
            f.write(traceback.format_exc())
        raise


def _record_placement_group(run: RunDir) -> None:
    """Note the worker group's placement group, so a Tune driver can release it.

    When Tune stops a trial (ASHA, or max_t), Train V2's placement group outlives the trial
    and holds its CPUs (ray-project/ray#54305); the sweep removes it from this record.
    """
    from ray.util import get_current_placement_group

    pg = get_current_placement_group()
    if pg is not None:
        atomic.write_text(run.placement_group, pg.id.hex())


def build_trainer(
    cfg: Config, callbacks: list[Any] | None = None, controller_failure_limit: int = -1
) -> Any:
    """The TorchTrainer for ``cfg`` (gloo on CPU, nccl on GPU).

    ``controller_failure_limit``: how often a worker group that cannot start is retried
    (-1: forever, Ray's default; a sweep's trials give up after a few).
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    r = cfg.ray
    resources = {"CPU": r.cpus_per_worker}
    if r.use_gpu:
        resources["GPU"] = r.gpus_per_worker
    return TorchTrainer(
        ray_worker,
        train_loop_config={"cfg": config_to_dict(cfg)},
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=RunDir(cfg.run_dir).ray_storage.name,
            # A URL (s3://) is written through pyarrow's filesystem, which reads the same
            # AWS_ENDPOINT_URL / AWS_* variables as cellmorph's own object-store client.
            storage_path=str(RunDir(cfg.run_dir).path),
            failure_config=FailureConfig(
                max_failures=r.max_failures, controller_failure_limit=controller_failure_limit
            ),
            callbacks=callbacks,
        ),
    )


def run_ray_training(cfg: Config, *, quiet: bool = False) -> RunDir:
    """Train ``cfg`` with Ray Train (local instance or ``ray.address``); returns the run.

    Prints one line per epoch (``quiet``: none) while the workers train.
    """
    from cellmorph.distributed import interactive
    from cellmorph.progress import RunWatcher

    check_upload_paths(cfg)
    cfg = resolve_from_store(resolve_paths(cfg))  # the workers get the column and size it records
    run = RunDir(cfg.run_dir)
    # This driver is the run's one writer (its workers write under it) until the run ends.
    with runlock.hold(run.path):
        preflight(cfg, warn=not quiet)  # quiet: e.g. the audit's leaky split, stated by it
        init_ray(cfg.ray, run.logs)
        check_resources(cfg.ray)
        trainer = build_trainer(cfg)
        with RunWatcher(run, cfg.train.epochs, bar=interactive(), quiet=quiet):
            try:
                trainer.fit()
            except Exception as e:
                raise_user_error(e, run)
                raise
            finally:
                upload_logs(run.logs)
        # Outside Tune, Train released its placement group itself; the record is for sweeps.
        run.placement_group.unlink(missing_ok=True)
    return run


def raise_user_error(e: BaseException, run: RunDir) -> None:
    """If Ray's error wraps a CellmorphError (or a full disk) from a worker, raise that as one
    line; any other error (a bug, an NCCL fault) is left to propagate with its traceback."""
    cause = user_error(e)
    if cause is not None:
        raise CellmorphError(
            f"training run {run.name} failed: {one_line(cause)} (logs: {run.logs})"
        ) from None


def user_error(e: BaseException) -> CellmorphError | None:
    """The CellmorphError inside a Ray Train failure (worker failures, causes), if any; an
    ordinary fault (full disk, read-only file system) counts as one."""
    seen: set[int] = set()
    todo: list[BaseException] = [e]
    while todo:
        err = todo.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, CellmorphError):
            return err
        if fault_message(err) is not None:
            return CellmorphError(fault_message(err))
        todo.extend(getattr(err, "worker_failures", {}).values())
        for nested in (getattr(err, "controller_failure", None), err.__cause__, err.__context__):
            if isinstance(nested, BaseException):
                todo.append(nested)
    return None
