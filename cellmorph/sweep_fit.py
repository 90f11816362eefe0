"""How many workers a sweep's trial gets and how many trials run at once, on this cluster.

A trial holds ``trial_cpus`` itself and starts ``ray.num_workers`` workers of
``ray.cpus_per_worker`` CPUs (and GPUs) each; a worker group that cannot be placed would time
out and retry forever, so the sweep fits both numbers to the cluster before the first trial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cellmorph.config import RayConfig
from cellmorph.errors import CellmorphError

if TYPE_CHECKING:
    from cellmorph.sweep import SweepConfig


@dataclass(frozen=True)
class ClusterSize:
    """What the cluster has: totals, and the largest node (one worker must fit on one node)."""

    cpus: float
    gpus: float = 0.0
    node_cpus: float | None = None  # None: one node, the totals
    node_gpus: float | None = None

    @classmethod
    def from_ray(cls) -> ClusterSize:
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        total = ray.cluster_resources()
        return cls(
            cpus=total.get("CPU", 0.0),
            gpus=total.get("GPU", 0.0),
            node_cpus=max((n.get("CPU", 0.0) for n in nodes), default=0.0),
            node_gpus=max((n.get("GPU", 0.0) for n in nodes), default=0.0),
        )


@dataclass(frozen=True)
class TrialFit:
    """How the sweep runs on this cluster: workers per trial, trials at a time, and why."""

    num_workers: int
    concurrency: int
    note: str = ""  # one line when the workers per trial were lowered to fit


def _floor(x: float) -> int:
    return math.floor(x + 1e-9)  # 2.0 - 0.05 - 0.95 must not come out as 0.9999...


def _fitting_workers(sweep: SweepConfig, r: RayConfig, size: ClusterSize) -> int:
    """The most workers one trial can have next to its own share of a CPU (>= 1, or raise)."""
    node_cpus = size.cpus if size.node_cpus is None else size.node_cpus
    node_gpus = size.gpus if size.node_gpus is None else size.node_gpus
    if r.cpus_per_worker > node_cpus + 1e-9:
        raise CellmorphError(
            f"ray.cpus_per_worker: a worker needs {r.cpus_per_worker:g} CPUs, the largest node "
            f"has {node_cpus:g}; lower ray.cpus_per_worker"
        )
    fit = _floor((size.cpus - sweep.trial_cpus) / r.cpus_per_worker)
    if r.use_gpu and r.gpus_per_worker > 0:
        if r.gpus_per_worker > node_gpus + 1e-9:
            raise CellmorphError(
                f"ray.use_gpu: a worker needs {r.gpus_per_worker:g} GPUs, the largest node has "
                f"{node_gpus:g}; set ray.use_gpu=false or lower ray.gpus_per_worker"
            )
        fit = min(fit, _floor(size.gpus / r.gpus_per_worker))
    if fit < 1:
        raise CellmorphError(
            f"sweep: one trial needs at least 1 worker x {r.cpus_per_worker:g} CPU + trial_cpus "
            f"{sweep.trial_cpus:g} = {r.cpus_per_worker + sweep.trial_cpus:g} CPUs, the cluster "
            f"has {size.cpus:g}; lower ray.cpus_per_worker or trial_cpus, or add nodes"
        )
    return fit


def _trial_need(sweep: SweepConfig, r: RayConfig) -> str:
    cpus = r.num_workers * r.cpus_per_worker + sweep.trial_cpus
    gpus = f" and {r.num_workers * r.gpus_per_worker:g} GPUs" if r.use_gpu else ""
    return (
        f"one trial of ray.num_workers={r.num_workers} x ray.cpus_per_worker="
        f"{r.cpus_per_worker:g} + trial_cpus={sweep.trial_cpus:g} needs {cpus:g} CPUs{gpus}"
    )


def _have(r: RayConfig, size: ClusterSize) -> str:
    return f"{size.cpus:g} CPUs" + (f" and {size.gpus:g} GPUs" if r.use_gpu else "")


def fit_trials(sweep: SweepConfig, r: RayConfig, size: ClusterSize) -> TrialFit:
    """Workers per trial and trials at a time such that every running trial can be placed.

    A trial holds ``trial_cpus`` itself and starts ``ray.num_workers`` workers of
    ``ray.cpus_per_worker`` CPUs (and ``ray.gpus_per_worker`` GPUs) each. Too many workers are
    lowered to what fits (``fit_workers``), or the sweep stops naming the settings to change.
    """
    fit = _fitting_workers(sweep, r, size)
    workers, note = r.num_workers, ""
    if workers > fit:
        what = f"{_trial_need(sweep, r)}, the cluster has {_have(r, size)}"
        if not sweep.fit_workers:
            raise CellmorphError(
                f"sweep {sweep.name}: {what}; set ray.num_workers={fit} (or fit_workers=true), "
                "lower ray.cpus_per_worker, or add nodes"
            )
        workers = fit
        note = f"sweep {sweep.name}: {what}: each trial trains with ray.num_workers={fit}"
    per_trial = workers * r.cpus_per_worker + sweep.trial_cpus
    concurrency = _floor(size.cpus / per_trial)
    if r.use_gpu and r.gpus_per_worker > 0:
        concurrency = min(concurrency, _floor(size.gpus / (workers * r.gpus_per_worker)))
    concurrency = max(1, concurrency)
    if sweep.max_concurrent:
        concurrency = min(concurrency, sweep.max_concurrent)
    return TrialFit(workers, concurrency, note)
