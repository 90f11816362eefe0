"""Ray Tune sweeps over the training config, with ASHA early stopping.

In Ray Train V2, Tune runs a *function* that builds and fits a TorchTrainer per trial
(``Tuner(TorchTrainer)`` is gone); ``TuneReportCallback`` forwards each epoch's report to Tune
so ASHA can stop weak trials. The search space is YAML, validated like every other config.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from cellmorph import atomic
from cellmorph.config import (
    Config,
    ConfigError,
    Section,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    read_tree,
    validate,
)
from cellmorph.errors import CellmorphError
from cellmorph.rundir import RunDir


class Dimension(Section):
    """One searched setting: exactly one of the distributions."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Dimension:
        given = [k for k in ("loguniform", "uniform", "randint", "choice") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of loguniform, uniform, randint, choice")
        return self

    def to_tune(self) -> Any:
        from ray import tune

        if self.loguniform:
            return tune.loguniform(*self.loguniform)
        if self.uniform:
            return tune.uniform(*self.uniform)
        if self.randint:
            return tune.randint(*self.randint)
        return tune.choice(self.choice)

    def example(self) -> Any:
        if self.loguniform:
            return self.loguniform[0]
        if self.uniform:
            return self.uniform[0]
        if self.randint:
            return self.randint[0]
        return self.choice[0]  # type: ignore[index]


class SweepConfig(Section):
    name: str = "sweep"
    base: str = "configs/demo.yaml"
    overrides: list[str] = []
    num_samples: int = Field(4, ge=1)
    metric: str = "balanced_accuracy"
    mode: Literal["max", "min"] = "max"
    max_concurrent: int = Field(0, ge=0, description="0 = as many as the cluster fits")
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)
    trial_cpus: float = Field(0.05, gt=0.0, description="for each trial's driver; keep it small")
    space: dict[str, Dimension] = {}


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepConfig, Config]:
    """The sweep settings and the base training config, with every searched key checked."""
    p = Path(path)
    sweep = validate(SweepConfig, read_tree(p, overrides), str(p))
    base = load_config(sweep.base, sweep.overrides)
    if not sweep.space:
        raise ConfigError(f"{p}: space is empty; name at least one setting to search")
    for key, dim in sweep.space.items():  # a typo in the space fails now, not in trial 7
        try:
            trial_config(base, {key: dim.example()}, "check")
        except ConfigError as e:
            raise ConfigError(f"{p}: space.{key}: {e}") from None
    return sweep, base


def trial_config(base: Config, params: dict[str, Any], name: str) -> Config:
    """``base`` with the sampled ``params`` (dotted keys) applied, under run name ``name``."""
    raw = config_to_dict(base)
    for key, value in params.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{key}: no such section {part!r}")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"{key}: unknown key")
        node[leaf] = value
    raw["name"] = name
    return config_from_dict(raw)


def fitted_concurrency(sweep: SweepConfig, base: Config, cluster_cpus: float) -> int:
    """How many trials fit at once: each needs its workers' CPUs plus its own driver's share."""
    per_trial = base.ray.num_workers * base.ray.cpus_per_worker + sweep.trial_cpus
    fit = max(1, math.floor(cluster_cpus / per_trial))
    return min(fit, sweep.max_concurrent) if sweep.max_concurrent else fit


def _trial(params: dict[str, Any], base: dict[str, Any]) -> None:
    """One Tune trial: build and fit a TorchTrainer for the sampled config."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cellmorph.launch import build_trainer

    name = f"trial-{tune.get_context().get_trial_id()}"
    cfg = trial_config(config_from_dict(base), params, name)
    build_trainer(cfg, callbacks=[TuneReportCallback()]).fit()


def _release_callback(run_root: Path) -> Any:
    """A Tune callback that removes a finished trial's leftover Train placement group."""
    from ray.tune import Callback
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup

    class ReleaseTrainResources(Callback):
        def _release(self, trial: Any) -> None:
            record = RunDir(run_root / f"trial-{trial.trial_id}").placement_group
            if not record.is_file():
                return
            pg_id = record.read_text().strip()
            if placement_group_table().get(pg_id, {}).get("state") == "CREATED":
                from ray._raylet import PlacementGroupID

                remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
            record.unlink(missing_ok=True)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._release(trial)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._release(trial)

    return ReleaseTrainResources()


def run_sweep(sweep: SweepConfig, base: Config) -> Path:
    """Run the sweep; writes ``best_config.yaml``, ``best.pt`` and ``results.csv``; returns its dir."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from cellmorph.launch import check_resources, init_ray, preflight, resolve_paths

    out = Path(base.run_root).expanduser().resolve() / sweep.name
    base = resolve_paths(trial_config(base, {"run_root": str(out / "trials")}, base.name))
    preflight(base)
    init_ray(base.ray, out / "logs")
    check_resources(base.ray)
    concurrency = fitted_concurrency(sweep, base, ray.cluster_resources().get("CPU", 0))
    print(f"sweep {sweep.name}: {sweep.num_samples} trials, {concurrency} at a time")
    trainable = tune.with_parameters(_trial, base=config_to_dict(base))
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": sweep.trial_cpus}),
        param_space={k: d.to_tune() for k, d in sweep.space.items()},
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            num_samples=sweep.num_samples,
            max_concurrent_trials=concurrency,
            scheduler=ASHAScheduler(
                max_t=base.train.epochs,
                grace_period=sweep.grace_period,
                reduction_factor=sweep.reduction_factor,
            ),
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(out),
            callbacks=[_release_callback(Path(base.run_root))],
        ),
    )
    results = tuner.fit()
    errors = [r.error for r in results if r.error]
    if len(errors) == len(results):
        raise CellmorphError(f"sweep {sweep.name}: every trial failed; first error: {errors[0]}")
    best = results.get_best_result(metric=sweep.metric, mode=sweep.mode, scope="all")
    return _write_best(out, base, best, results.get_dataframe(), sweep.metric)


def _write_best(out: Path, base: Config, best: Any, table: Any, sweep_metric: str) -> Path:
    params = dict(best.config)
    cfg = trial_config(base, params, f"trial-{best.metrics['trial_id']}")
    run_dir = cfg.run_dir
    best_cfg = trial_config(base, params, f"{out.name}-best")
    dump_config(best_cfg, out / "best_config.yaml")
    src = RunDir(run_dir).best_checkpoint
    if src.is_file():
        atomic.link_or_copy(src, out / "best.pt")
    atomic.write_with(out / "results.csv", lambda p: table.to_csv(p, index=False))
    record = {"params": params, "metrics": best.metrics, "run_dir": str(run_dir)}
    atomic.write_text(out / "best.json", json.dumps(record, indent=2, default=str))
    metric = best.metrics.get(sweep_metric)
    print(f"best trial: {params} -> {sweep_metric} {metric}; written to {out}")
    return out
