"""Ray Tune sweeps over the training config, with ASHA early stopping.

In Ray Train V2, Tune runs a *function* that builds and fits a TorchTrainer per trial
(``Tuner(TorchTrainer)`` is gone); ``TuneReportCallback`` forwards each epoch's report to Tune
so ASHA can stop weak trials. The search space is YAML, validated like every other config.

Before any trial starts, the sweep checks that one trial (its workers plus the share of a CPU
the trial itself holds) fits the cluster, and fits the number of trials at a time to it: a
worker group that cannot be placed would otherwise time out and retry forever.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from cellmorph import atomic, runlock
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
from cellmorph.sweep_fit import ClusterSize, TrialFit, fit_trials
from cellmorph.urlpath import AnyPath, as_path


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
    metric: str | None = Field(
        None, description="must be the base config's train.best_metric (None: that one): the "
        "score that picks a trial's best.pt also ranks the trials",
    )  # fmt: skip
    mode: Literal["max", "min"] | None = Field(None, description="None: the metric's own")
    max_concurrent: int = Field(0, ge=0, description="0 = as many as the cluster fits")
    grace_fraction: float = Field(
        0.25, ge=0.25, lt=1.0,
        description="ASHA compares trials at this fraction of their planned runs and at "
        "reduction_factor times it; never earlier than 0.25, the end of the longest warm-up",
    )  # fmt: skip
    reduction_factor: float = Field(2.0, gt=1.0)
    trial_cpus: float = Field(0.05, gt=0.0, description="for each trial's driver; keep it small")
    fit_workers: bool = Field(
        True, description="a trial too big for the cluster trains with fewer workers (else: stop)"
    )
    space: dict[str, Dimension] = {}


# What each epoch's report says about progress: epochs done / epochs planned (cellmorph/train.py).
RUN_FRACTION = "run_fraction"
# A trial whose worker group cannot be placed this many times in a row (Ray Train waits 60 s
# each time, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S) fails instead of retrying forever.
TRIAL_START_RETRIES = 5


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Command-line overrides split into the sweep file's keys and the base training config's.

    ``num_samples=8`` or ``max_concurrent=2`` set the sweep; ``data.store=...`` or
    ``run_root=...`` set the base config, after the sweep file's own ``overrides`` list.
    ``name`` is the sweep's (every trial is named after its trial id anyway).
    """
    sweep_keys, base_keys = set(SweepConfig.model_fields), set(Config.model_fields)
    mine: list[str] = []
    base: list[str] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        top = item.partition("=")[0].strip().split(".")[0]
        if top in sweep_keys:
            mine.append(item)
        elif top in base_keys:
            base.append(item)
        else:
            raise ConfigError(
                f"override {item.partition('=')[0]}: unknown key (neither a sweep setting: "
                f"{', '.join(SweepConfig.model_fields)}; nor a training config section: "
                f"{', '.join(k for k in Config.model_fields if k != 'name')})"
            )
    return mine, base


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepConfig, Config]:
    """The sweep settings and the base training config, with every searched key checked.

    ``overrides`` may mix the sweep file's keys and the base config's (see ``split_overrides``).
    """
    p = Path(path)
    mine, base_overrides = split_overrides(overrides or [])
    sweep = validate(SweepConfig, read_tree(p, mine), str(p))
    base = load_config(sweep.base, [*sweep.overrides, *base_overrides])
    check_metric(sweep, base, p)
    if not sweep.space:
        raise ConfigError(f"{p}: space is empty; name at least one setting to search")
    for key, dim in sweep.space.items():  # a typo in the space fails now, not in trial 7
        try:
            trial_config(base, {key: dim.example()}, "check")
        except ConfigError as e:
            raise ConfigError(f"{p}: space.{key}: {e}") from None
    return sweep, base


def check_metric(sweep: SweepConfig, base: Config, where: Path | str) -> None:
    """One metric decides: the sweep ranks trials by the score that chose their best.pt."""
    if sweep.metric is not None and sweep.metric != base.train.best_metric:
        raise ConfigError(
            f"{where}: metric {sweep.metric!r} differs from the base config's train.best_metric "
            f"{base.train.best_metric!r}, which picks each trial's best.pt; set "
            f"train.best_metric={sweep.metric} (in overrides or on the command line) or drop metric"
        )
    if sweep.mode is not None and sweep.mode != base.best_mode:
        raise ConfigError(
            f"{where}: mode {sweep.mode!r} contradicts train.best_metric "
            f"{base.train.best_metric!r}, for which {base.best_mode} is better; drop mode"
        )


def scheduler(sweep: SweepConfig) -> Any:
    """ASHA on the fraction of its own planned run each trial has trained (``run_fraction``):
    trials of different lengths (batch sizes, ``train.min_steps``) are compared at the same
    point of their schedules, never inside the warm-up (at most a quarter of a run). The top
    rung stays below 1 and a trial is never stopped for reaching the end, so every trial that
    survives the rungs finishes: its test fold is scored and its outputs written."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr=RUN_FRACTION,
        max_t=1.0 - 1e-6,
        grace_period=sweep.grace_fraction,
        reduction_factor=sweep.reduction_factor,
        stop_last_trials=False,
    )


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


def _trial(params: dict[str, Any], base: dict[str, Any]) -> None:
    """One Tune trial: build and fit a TorchTrainer for the sampled config."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cellmorph.launch import build_trainer

    name = f"trial-{tune.get_context().get_trial_id()}"
    cfg = trial_config(config_from_dict(base), params, name)
    trainer = build_trainer(
        cfg, callbacks=[TuneReportCallback()], controller_failure_limit=TRIAL_START_RETRIES
    )
    trainer.fit()


def _release_callback(run_root: AnyPath) -> Any:
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


def prepare_sweep(sweep: SweepConfig, base: Config) -> tuple[AnyPath, Config, TrialFit]:
    """Check paths and data, connect to Ray and fit the trials to the cluster.

    Returns the sweep's folder, the base config every trial starts from (absolute paths, trial
    runs under ``<sweep>/trials``, workers per trial as fitted) and the fit.
    """
    from cellmorph.config import resolve_from_store
    from cellmorph.launch import check_upload_paths, init_ray, preflight, resolve_paths

    check_upload_paths(base)
    out = as_path(base.run_root).expanduser().resolve() / sweep.name
    base = resolve_paths(trial_config(base, {"run_root": str(out / "trials")}, base.name))
    base = resolve_from_store(base)  # every trial trains on, and records, the same column
    preflight(base)
    init_ray(base.ray, out / "logs")
    fit = fit_trials(sweep, base.ray, ClusterSize.from_ray())
    if fit.note:
        print(fit.note)
    base = trial_config(base, {"ray.num_workers": fit.num_workers}, base.name)
    r = base.ray
    print(
        f"sweep {sweep.name}: {sweep.num_samples} trial{'s' * (sweep.num_samples != 1)}, "
        f"{min(fit.concurrency, sweep.num_samples)} at a time, "
        f"{r.num_workers} worker(s) x {r.cpus_per_worker:g} CPU each"
    )
    return out, base, fit


def run_sweep(sweep: SweepConfig, base: Config) -> AnyPath:
    """Run the sweep; writes ``best_config.yaml``, ``best.pt`` and ``results.csv``; returns its dir."""
    # One driver per sweep folder (its trials' runs live in it), before Ray is started.
    with runlock.hold(as_path(base.run_root).expanduser().resolve() / sweep.name, "sweep"):
        return _run_sweep(sweep, base)


def _run_sweep(sweep: SweepConfig, base: Config) -> AnyPath:
    from ray import tune

    from cellmorph import tracking

    out, base, fit = prepare_sweep(sweep, base)
    metric, mode = base.train.best_metric, base.best_mode
    parent = tracking.start_sweep(
        base, sweep.name, {k: d.model_dump() for k, d in sweep.space.items()}
    )
    if parent is not None:  # each trial's run is a child of the sweep's
        base = trial_config(base, {"tracking.parent_run_id": parent}, base.name)
    trainable = tune.with_parameters(_trial, base=config_to_dict(base))
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": sweep.trial_cpus}),
        param_space={k: d.to_tune() for k, d in sweep.space.items()},
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            num_samples=sweep.num_samples,
            max_concurrent_trials=fit.concurrency,
            scheduler=scheduler(sweep),
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(out),
            callbacks=[_release_callback(as_path(base.run_root))],
        ),
    )
    results = tuner.fit()
    errors = [r.error for r in results if r.error]
    if errors:
        first = _one_line(errors[0])
        if len(errors) == len(results):
            raise CellmorphError(f"sweep {sweep.name}: every trial failed; first error: {first}")
        print(f"sweep {sweep.name}: {len(errors)} of {len(results)} trials failed: {first}")
    best = best_trial(results, base, metric, mode)
    written = _write_best(out, base, best, results.get_dataframe(), metric)
    tracking.finish_sweep(base, parent, {metric: best["validation"].get(metric)})
    return written


def _one_line(error: BaseException) -> str:
    """A trial's error as one line: the CellmorphError inside it, else its first line."""
    from cellmorph.launch import user_error

    cause = user_error(error)
    text = str(cause if cause is not None else error).strip()
    return (text.splitlines() or [type(error).__name__])[0]


def best_trial(results: Any, base: Config, metric: str, mode: str) -> dict[str, Any]:
    """The finished trial whose chosen model (its best.pt) has the best validation ``metric``.

    Only trials that ran to their end count: their test fold was scored and their outputs
    written. A trial ASHA stopped was behind at a rung, and scored nothing."""
    finished = []
    for r in results:
        trial_id = (r.metrics or {}).get("trial_id")
        if not r.config or not trial_id:  # never reported: failed at start
            continue
        run = RunDir(trial_config(base, dict(r.config), f"trial-{trial_id}").run_dir)
        result = run.read_json(run.result, required=False) or {}
        if "selected_by" in result and (result.get("validation") or {}).get(metric) is not None:
            finished.append({**result, "params": dict(r.config), "run_dir": str(run.path)})
    if not finished:
        raise CellmorphError(
            "sweep: no trial ran to its end (every trial failed or was stopped by ASHA); "
            "raise num_samples or grace_fraction"
        )
    sign = 1 if mode == "max" else -1
    return max(finished, key=lambda r: sign * r["validation"][metric])


def _write_best(out: AnyPath, base: Config, best: dict[str, Any], table: Any,
                metric: str) -> AnyPath:  # fmt: skip
    params = best["params"]
    dump_config(trial_config(base, params, f"{out.name}-best"), out / "best_config.yaml")
    src = RunDir(best["run_dir"]).best_checkpoint
    if src.is_file():
        atomic.link_or_copy(src, out / "best.pt")
    atomic.write_with(out / "results.csv", lambda p: table.to_csv(p, index=False))
    record = {"params": params, "run_dir": best["run_dir"], "metric": metric,
              "validation": best["validation"].get(metric),
              "test": (best.get("test") or {}).get(metric)}  # fmt: skip
    atomic.write_text(out / "best.json", json.dumps(record, indent=2, default=str))
    test = f", test {record['test']:.3f}" if record["test"] is not None else ""
    print(f"best trial: {params} -> validation {metric} {record['validation']:.3f}{test}; "
          f"written to {out}")  # fmt: skip
    return out
