"""Ray Train wiring: config → ScalingConfig/RunConfig/TorchTrainer, and the worker entry point.

The launchers in ``ray_jobs/`` and the ``cellmorph train``/``demo`` commands all go through
here, so a run looks the same whether it came from a workstation or ``ray job submit``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cellmorph.config import Config, RayConfig, config_from_dict, config_to_dict
from cellmorph.errors import CellmorphError


def resolve_paths(cfg: Config) -> Config:
    """A copy of ``cfg`` with absolute paths: Ray workers do not share the driver's cwd."""
    raw = config_to_dict(cfg)
    raw["run_root"] = str(Path(cfg.run_root).expanduser().resolve())
    raw["data"]["store"] = str(Path(cfg.data.store).expanduser().resolve())
    if cfg.model.pretrained:
        raw["model"]["pretrained"] = str(Path(cfg.model.pretrained).expanduser().resolve())
    return config_from_dict(raw)


def preflight(cfg: Config) -> None:
    """Fail in the driver, with a message naming the setting, before any worker starts."""
    from cellmorph.index import build_index
    from cellmorph.store import open_store
    from cellmorph.train import check_batch_size

    store = open_store(cfg.data.store)
    check_batch_size(cfg.loader, build_index(store.metadata, cfg.data))
    if cfg.model.pretrained and not Path(cfg.model.pretrained).is_file():
        raise CellmorphError(f"model.pretrained: no such file {cfg.model.pretrained}")


def init_ray(cfg: RayConfig) -> None:
    """Connect to ``ray.address`` (or start a local instance bound to 127.0.0.1)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if cfg.address:
        ray.init(address=cfg.address)
    elif os.environ.get("RAY_ADDRESS"):  # inside `ray job submit`: join that cluster
        ray.init()
    else:  # a fresh local instance, never a stale or unrelated cluster on this host
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")


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


PLACEMENT_GROUP_FILE = ".ray_placement_group"


def ray_worker(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` for TorchTrainer: builds a Context from Ray Train's."""
    import ray.train
    import ray.train.torch

    from cellmorph.train import Context, train_loop

    cfg = config_from_dict(config["cfg"])
    tctx = ray.train.get_context()
    if tctx.get_world_rank() == 0:
        _record_placement_group(cfg.run_dir)

    def report(metrics: dict[str, Any], ckpt: Path | None) -> None:
        if ckpt is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            shutil.copy2(ckpt, Path(d) / "checkpoint.pt")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    ctx = Context(
        rank=tctx.get_world_rank(),
        world_size=tctx.get_world_size(),
        device=ray.train.torch.get_device(),
        report=report,
        wrap_model=lambda m: ray.train.torch.prepare_model(m, move_to_device=False),
    )
    train_loop(cfg, ctx)


def _record_placement_group(run_dir: Path) -> None:
    """Note the worker group's placement group, so a Tune driver can release it.

    When Tune stops a trial (ASHA, or max_t), Train V2's placement group outlives the trial
    and holds its CPUs (ray-project/ray#54305); the sweep removes it from this record.
    """
    from ray.util import get_current_placement_group

    pg = get_current_placement_group()
    if pg is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / PLACEMENT_GROUP_FILE).write_text(pg.id.hex())


def build_trainer(cfg: Config, callbacks: list[Any] | None = None) -> Any:
    """The TorchTrainer for ``cfg`` (gloo on CPU, nccl on GPU)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
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
            name="ray",
            storage_path=str(cfg.run_dir),
            failure_config=FailureConfig(max_failures=r.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=callbacks,
        ),
    )


def run_ray_training(cfg: Config) -> Path:
    """Train ``cfg`` with Ray Train (local instance or ``ray.address``); returns the run dir."""
    cfg = resolve_paths(cfg)
    preflight(cfg)
    init_ray(cfg.ray)
    check_resources(cfg.ray)
    trainer = build_trainer(cfg)
    try:
        trainer.fit()
    except Exception as e:  # Ray wraps worker errors; keep the first line that says what failed
        raise CellmorphError(f"training run {cfg.name} failed: {_first_cause(e)}") from None
    # Outside Tune, Train released its placement group itself; the record is only for sweeps.
    (cfg.run_dir / PLACEMENT_GROUP_FILE).unlink(missing_ok=True)
    return cfg.run_dir


def _first_cause(e: BaseException) -> str:
    text = str(e)
    for line in text.splitlines():
        if "CellmorphError:" in line:
            return line.split("CellmorphError:", 1)[1].strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
