"""Sweep files, command-line overrides and the fit to the cluster are checked before any trial
starts (no Ray needed)."""

import json

import pytest

from cellmorph.config import ConfigError, RayConfig, load_config
from cellmorph.errors import CellmorphError
from cellmorph.launch import check_upload_paths
from cellmorph.sweep import ClusterSize, SweepConfig, fit_trials, load_sweep, trial_config


def test_repo_sweep_file_is_valid():
    sweep, base = load_sweep("configs/sweep.yaml")
    assert sweep.space and base.train.epochs == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("spaec: {}\n", "spaec: unknown key"),
        ("space:\n  optim.lrr: {choice: [1]}\n", "space.optim.lrr"),
        ("space:\n  optim.lr: {choice: [1], uniform: [0, 1]}\n", "exactly one"),
        ("space: {}\n", "space is empty"),
        ("space: [\n", "not valid YAML"),
    ],
)
def test_bad_sweep_files_name_the_key(tmp_path, text, message):
    p = tmp_path / "sweep.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_sweep(p)


def test_trial_config_applies_dotted_params():
    base = load_config("configs/demo.yaml")
    cfg = trial_config(base, {"optim.lr": 0.01, "loader.batch_size": 8}, "t1")
    assert (cfg.optim.lr, cfg.loader.batch_size, cfg.name) == (0.01, 8, "t1")


def test_command_line_sets_base_config_keys_next_to_sweep_keys():
    sweep, base = load_sweep(
        "configs/sweep.yaml",
        ["data.store=/abs/store.zarr", "run_root=/abs/runs", "num_samples=2", "name=s2",
         "train.epochs=1"],
    )  # fmt: skip
    assert (base.data.store, base.run_root) == ("/abs/store.zarr", "/abs/runs")
    assert base.train.epochs == 1  # typed after the sweep file's overrides: [train.epochs=4]
    assert (sweep.num_samples, sweep.name) == (2, "s2")
    assert base.name == "demo"  # `name` is the sweep's; trials are named by their ids


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dta.store=/x", "override dta.store: unknown key"),
        ("data.stor=/x", "data.stor: unknown key"),
        ("num_sample=3", "override num_sample: unknown key"),
        ("train.epochs=many", "train.epochs"),
        ("data.store", "not of the form key.path=value"),
    ],
)
def test_bad_command_line_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep("configs/sweep.yaml", [override])


DEMO_RAY = RayConfig(num_workers=2, cpus_per_worker=1)


def test_a_trial_too_big_for_a_two_cpu_head_trains_with_one_worker():
    fit = fit_trials(SweepConfig(trial_cpus=0.05), DEMO_RAY, ClusterSize(cpus=2))
    assert (fit.num_workers, fit.concurrency) == (1, 1)  # 1 worker + 0.05 for the trial
    assert "needs 2.05 CPUs, the cluster has 2 CPUs" in fit.note
    assert "ray.num_workers=1" in fit.note and "\n" not in fit.note


def test_trials_at_a_time_fit_the_cpus():
    sweep = SweepConfig(trial_cpus=0.05)
    fit = fit_trials(sweep, DEMO_RAY, ClusterSize(cpus=16, node_cpus=16))
    assert (fit.num_workers, fit.concurrency, fit.note) == (2, 7, "")  # 7 x 2.05 <= 16
    capped = fit_trials(SweepConfig(max_concurrent=2), DEMO_RAY, ClusterSize(cpus=16))
    assert capped.concurrency == 2
    gpus = RayConfig(num_workers=2, use_gpu=True, gpus_per_worker=1)
    assert fit_trials(sweep, gpus, ClusterSize(cpus=32, gpus=4)).concurrency == 2


@pytest.mark.parametrize(
    ("sweep", "ray", "size", "message"),
    [
        (SweepConfig(fit_workers=False), DEMO_RAY, ClusterSize(cpus=2),
         r"needs 2.05 CPUs, the cluster has 2 CPUs; set ray.num_workers=1 \(or fit_workers"),
        (SweepConfig(), RayConfig(cpus_per_worker=2), ClusterSize(cpus=2),
         r"1 worker x 2 CPU \+ trial_cpus 0.05 = 2.05 CPUs, the cluster has 2; lower "
         r"ray.cpus_per_worker or trial_cpus"),
        (SweepConfig(), RayConfig(cpus_per_worker=2), ClusterSize(cpus=4, node_cpus=1),
         "ray.cpus_per_worker: a worker needs 2 CPUs, the largest node has 1"),
        (SweepConfig(), RayConfig(use_gpu=True), ClusterSize(cpus=8, gpus=0),
         "ray.use_gpu: a worker needs 1 GPUs, the largest node has 0; set ray.use_gpu=false"),
    ],
)  # fmt: skip
def test_a_trial_that_cannot_fit_stops_naming_the_settings(sweep, ray, size, message):
    with pytest.raises(CellmorphError, match=message):
        fit_trials(sweep, ray, size)


def test_relative_paths_are_refused_inside_an_uploaded_working_dir(monkeypatch):
    cfg = load_config("configs/demo.yaml")  # data.store and run_root are relative there
    check_upload_paths(cfg)  # typed on this machine: relative to the cwd, as always
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))  # what `ray job` sets
    with pytest.raises(CellmorphError, match=r"data.store: 'data/demo/store.zarr' is a relative "
                       r"path.*e.g. data.store=\$PWD/data/demo/store.zarr"):  # fmt: skip
        check_upload_paths(cfg)
    cfg = load_config("configs/demo.yaml", ["data.store=/abs/store.zarr"])
    with pytest.raises(CellmorphError, match=r"run_root: 'runs'.*run_root=\$PWD/runs"):
        check_upload_paths(cfg)
    check_upload_paths(load_config("configs/demo.yaml", ["data.store=/s", "run_root=/r"]))


@pytest.mark.parametrize("entry", ["cli", "job"])
def test_tune_commands_stop_on_a_bad_key_with_one_line(entry, capsys):
    from cellmorph.cli import main as cli_main
    from ray_jobs.tune import main as job_main

    argv = ["--config", "configs/sweep.yaml", "data.stor=/x"]
    rc = cli_main(["tune", *argv]) if entry == "cli" else job_main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "data.stor: unknown key" in err
    assert len(err.splitlines()) == 1


def test_the_sweeps_metric_is_the_one_that_picks_best_pt(tmp_path):
    p = tmp_path / "sweep.yaml"
    p.write_text(
        "base: configs/demo.yaml\nmetric: accuracy\nspace:\n  optim.lr: {choice: [0.01]}\n"
    )
    with pytest.raises(ConfigError, match=r"metric 'accuracy' differs from the base config's "
                       r"train.best_metric 'balanced_accuracy'.*train.best_metric=accuracy"):  # fmt: skip
        load_sweep(p)
    sweep, base = load_sweep(p, ["train.best_metric=accuracy"])  # one metric decides
    assert base.train.best_metric == "accuracy"
    p.write_text("base: configs/demo.yaml\nmode: min\nspace:\n  optim.lr: {choice: [0.01]}\n")
    with pytest.raises(ConfigError, match="mode 'min' contradicts train.best_metric"):
        load_sweep(p)


def test_asha_ranks_trials_on_their_own_run_fraction_after_the_warm_up():
    from cellmorph.sweep import RUN_FRACTION, scheduler

    asha = scheduler(SweepConfig())
    rungs = [m for b in asha._brackets for m, _ in b._rungs]
    assert asha._time_attr == RUN_FRACTION and rungs
    assert min(rungs) >= 0.25 and max(rungs) < 1.0  # never inside the warm-up, never the end
    with pytest.raises(ConfigError, match="grace_fraction"):
        load_sweep("configs/sweep.yaml", ["grace_fraction=0.1"])


def test_a_trial_with_the_default_min_steps_reports_its_whole_planned_run(tiny_plate, tmp_path):
    """conftest's small configs set train.min_steps=0; this trial keeps the default, which adds
    epochs: its reports count the planned epochs (run_fraction reaches 1 at the last one), and
    the last report comes after the test fold was scored, so a sweep that stops a trial there
    loses nothing."""
    from cellmorph.distributed import Context
    from cellmorph.rundir import RunDir
    from cellmorph.train import train_loop

    cfg = load_config(None, [
        "name=trial", f"run_root={tmp_path}", f"data.store={tiny_plate}",
        "data.val_fraction=0.5", "data.test_fraction=0", "data.test_plates=[SYNP02]",
        "loader.batch_size=2", "loader.image_size=32", "loader.view_fraction=0.8",
        "model.width_mult=0.35", "train.epochs=2",
    ])  # fmt: skip
    assert cfg.train.min_steps == 300  # the built-in default, not overridden
    run, reports = RunDir(cfg.run_dir), []

    def report(metrics: dict) -> None:
        reports.append((metrics, (run.read_json(run.result, required=False) or {}).get("fold")))

    train_loop(cfg, Context(report=report, console=False))
    fractions = [m["run_fraction"] for m, _ in reports]
    planned = reports[0][0]["epochs"]
    assert planned > cfg.train.epochs and len(reports) == planned  # min_steps added epochs
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert reports[-1][1] == "test" and {f for _, f in reports[:-1]} == {"validation"}
