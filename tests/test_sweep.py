"""Sweep files are validated before any trial starts (no Ray needed)."""

import pytest

from cellmorph.config import ConfigError, load_config
from cellmorph.sweep import SweepConfig, fitted_concurrency, load_sweep, trial_config


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


def test_trial_config_applies_dotted_params_and_concurrency_fits_cpus():
    base = load_config("configs/demo.yaml")
    cfg = trial_config(base, {"optim.lr": 0.01, "loader.batch_size": 8}, "t1")
    assert (cfg.optim.lr, cfg.loader.batch_size, cfg.name) == (0.01, 8, "t1")
    sweep = SweepConfig(trial_cpus=0.05)
    assert fitted_concurrency(sweep, base, 2.0) == 1  # 2 workers x 1 CPU + driver share
    assert fitted_concurrency(sweep, base, 16.0) == 7
    assert fitted_concurrency(SweepConfig(max_concurrent=2), base, 16.0) == 2
