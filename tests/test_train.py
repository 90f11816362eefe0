"""The training loop without Ray: schedule, AMP policy, resume, storage checks, errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from helpers import read_events

from cellmorph.checkpoint import load_checkpoint, update_best
from cellmorph.config import load_config, resolve_from_store
from cellmorph.distributed import Context
from cellmorph.errors import CellmorphError
from cellmorph.rundir import RunDir
from cellmorph.train import check_storage_shared, resolve_amp, run_local
from cellmorph.train_setup import lr_factor


def _cfg(small_cfg, name: str, *extra: str):
    return small_cfg(name, "train.max_steps_per_epoch=1", *extra)


def test_lr_schedule_warms_up_then_decays_to_floor():
    f = [lr_factor(s, 100, 10, 0.01) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))  # monotone after warmup
    assert f[100] == pytest.approx(0.01)
    assert lr_factor(0, 10, 0, 0.0) == pytest.approx(1.0)


def test_amp_policy():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) == (None, False)
    assert resolve_amp("off", cpu) == (None, False)
    assert resolve_amp("bf16", cpu) == (torch.bfloat16, False)
    with pytest.raises(CellmorphError, match="train.amp"):
        resolve_amp("fp16", cpu)


def test_resume_keeps_each_epoch_once(tmp_path, epochs_of):
    p = tmp_path / "metrics.jsonl"
    p.write_text(
        "".join(json.dumps({"epoch": e, "v": i}) + "\n" for i, e in enumerate([0, 1, 2, 1]))
    )
    run = RunDir(tmp_path)
    run.begin(2, [])
    assert epochs_of(tmp_path) == [0, 1]
    assert [r["v"] for r in run.history()] == [0, 3]  # the latest line of a rerun epoch
    assert read_events(run)[-1]["event"] == "resume"


def test_storage_not_shared_between_nodes_is_refused(tmp_path, monkeypatch):
    ctx = Context(rank=0, world_size=2)
    monkeypatch.setattr(Context, "distributed", property(lambda self: False))
    monkeypatch.setattr(Context, "gather", lambda self, obj: [obj, False])  # rank 1 sees nothing
    with pytest.raises(CellmorphError, match="run_root: .* is not shared between nodes"):
        check_storage_shared(RunDir(tmp_path / "run"), ctx)


def test_run_writes_every_artefact(small_cfg, epochs_of):
    cfg = _cfg(small_cfg, "one", "train.epochs=1")
    run_dir = run_local(cfg).path
    for name in ("config.yaml", "classes.json", "data_summary.json", "metrics.jsonl", "metrics.json",
                 "val_predictions.parquet", "val_embeddings.npy", "checkpoints/last.pt", "checkpoints/best.pt"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    # The run records the label column it used (the store's), the config left it unset.
    assert cfg.data.label_column is None
    assert load_config(run_dir / "config.yaml") == resolve_from_store(cfg)
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert set(ckpt) >= {
        "model",
        "optimizer",
        "scheduler",
        "epoch",
        "rng",
        "config",
        "classes",
        "channels",
        "norm",
    }
    summary = json.loads((run_dir / "data_summary.json").read_text())
    assert summary["split"] == "grouped" and summary["leaky"] is False


@pytest.mark.parametrize(
    ("override", "key"),
    [("loader.batch_size=4096", "loader.batch_size"), ("data.label_column=Nope", "Nope")],
)
def test_bad_settings_stop_with_the_key(small_cfg, override, key):
    with pytest.raises(CellmorphError, match=key):
        run_local(_cfg(small_cfg, "bad", override))


def test_gpu_requested_without_gpu(small_cfg, epochs_of):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(CellmorphError, match="ray.use_gpu"):
        run_local(_cfg(small_cfg, "gpu", "ray.use_gpu=true"))


def test_same_run_name_resumes_and_refuses_other_classes(small_cfg, epochs_of):
    cfg = _cfg(small_cfg, "again", "train.epochs=1")
    run_local(cfg)
    run_local(_cfg(small_cfg, "again", "train.epochs=2"))
    assert epochs_of(cfg.run_dir) == [0, 1]
    events = (cfg.run_dir / "events.jsonl").read_text()
    assert '"resume"' in events and '"epoch": 1' in events
    fewer = _cfg(small_cfg, "again", "train.epochs=3", "data.top_k=3")
    with pytest.raises(CellmorphError, match="classes"):
        run_local(fewer)


def test_update_best_keeps_top_k_and_reports_dropped():
    best, dropped = [], []
    for epoch, score in enumerate([0.2, 0.5, 0.3, 0.5, 0.9]):
        best, dropped = update_best(best, score, epoch, 2)
    assert best == [(0.9, 4), (0.5, 1)]  # ties keep the earlier epoch
    assert dropped == [3]
    assert update_best([(0.1, 0)], float("nan"), 1, 2) == ([(0.1, 0)], [])
    assert update_best([], 0.5, 0, 0) == ([], [])


def test_keeps_best_k_checkpoints(small_cfg):
    cfg = _cfg(small_cfg, "bestk", "train.epochs=3", "train.keep_best=2")
    run_local(cfg)
    kept = sorted(p.name for p in (cfg.run_dir / "checkpoints").glob("best-epoch*.pt"))
    assert len(kept) == 2
    ckpt = load_checkpoint(cfg.run_dir / "checkpoints" / "last.pt")
    assert sorted(f"best-epoch{e:03d}.pt" for _, e in ckpt["best_k"]) == kept
    best = load_checkpoint(cfg.run_dir / "checkpoints" / "best.pt")
    assert best["epoch"] == ckpt["best_k"][0][1]


def test_schedule_is_sized_in_optimizer_steps():
    from cellmorph.train_setup import plan_schedule

    small = load_config(None, ["train.epochs=12", "train.min_steps=400", "loader.batch_size=32"])
    s = plan_schedule(small, batches_per_epoch=4, world_size=2)
    assert (s.epochs, s.steps_per_epoch, s.total, s.added_epochs) == (100, 4, 400, 88)
    assert s.global_batch == 64 and s.lr == pytest.approx(small.optim.lr * 0.5)  # sqrt(64/256)
    assert s.warmup == 100 and "100 epochs (+88 for train.min_steps)" in s.describe()
    big = plan_schedule(small, batches_per_epoch=1000, world_size=2)
    assert (big.epochs, big.added_epochs, big.warmup) == (12, 0, 100)  # large data: as asked
    exact = load_config(
        None, ["train.min_steps=0", "optim.lr_scaling=linear", "optim.warmup_steps=50"]
    )
    s = plan_schedule(exact, batches_per_epoch=4, world_size=1)
    assert s.epochs == exact.train.epochs and s.warmup == 12  # a quarter of 48 steps at most
    assert "too few to learn" in s.describe() and "too few" not in big.describe()
    assert s.lr == pytest.approx(exact.optim.lr * exact.loader.batch_size / 256)


def test_progress_lines_count_the_planned_epochs_not_train_epochs():
    """train.min_steps can add epochs; the launcher's lines and ETA follow the planned run."""
    from cellmorph.progress import epoch_line

    record = {"epoch": 0, "epochs": 25, "train_loss": 2.2, "seconds": 20.0}
    line = epoch_line(record, epochs=12)  # 12: what the launcher's config says
    assert line.startswith("epoch 1/25") and "eta 8m00s" in line
    assert epoch_line({"epoch": 2}, epochs=12).startswith("epoch 3/12")  # older logs


def test_precise_bn_recomputes_statistics_with_current_weights():
    from torch import nn

    from cellmorph.distributed import Context
    from cellmorph.train import recalibrate_bn

    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    batches = [(torch.randn(8, 2, 4, 4) * 3 + 5, None, None) for _ in range(4)]
    net.eval()
    recalibrate_bn(net, batches, Context())
    with torch.no_grad():
        feats = torch.cat([net[0](x) for x, _, _ in batches])
    bn = net[1]
    torch.testing.assert_close(bn.running_mean, feats.mean(dim=(0, 2, 3)), atol=1e-4, rtol=1e-4)
    per_batch_var = torch.stack([net[0](x).var(dim=(0, 2, 3)) for x, _, _ in batches]).mean(0)
    torch.testing.assert_close(bn.running_var, per_batch_var.detach(), atol=1e-3, rtol=1e-3)
    assert bn.momentum == 0.1  # restored


def test_test_fold_scores_the_chosen_model_once(small_cfg, tiny_plate):
    from cellmorph.store import open_store

    cfg = _cfg(small_cfg, "heldout", "train.epochs=2", "data.test_plates=[SYNP02]",
               "train.bn_calibration_images=16")  # fmt: skip
    run = run_local(cfg)
    result = run.read_result()
    assert result["fold"] == "test" and result["epoch"] in (0, 1)
    assert result["test"]["balanced_accuracy"] == result["balanced_accuracy"]
    assert set(result["validation"]) >= {"balanced_accuracy", "accuracy", "macro_f1"}
    assert result["selected_by"] == "validation balanced_accuracy"
    test = pd.read_parquet(run.predictions("test"))
    plates = open_store(tiny_plate).metadata["Metadata_Plate"].to_numpy()
    assert set(plates[test["store_row"]]) == {"SYNP02"}  # the held-out plate, nothing else
    val = pd.read_parquet(run.predictions("val"))
    assert set(plates[val["store_row"]]) == {"SYNP01"}
    assert "profiling" in result and "embeddings" in result["profiling"]
    assert len(run.history()) == 2  # the test fold is not scored per epoch
    assert not any("test" in k for r in run.history() for k in r)
    # Phenotypic activity is scored on every held-out well (validation + test), and says so.
    prof = result["profiling"]
    assert prof["fold"] == "validation + test wells"
    assert {"treatments_scorable", "treatments_total"} <= set(prof)


def test_evaluate_prints_the_test_folds_scores_under_its_name(small_cfg, capsys):
    from cellmorph.cli import main

    run = run_local(_cfg(small_cfg, "named", "data.test_plates=[SYNP02]"))
    capsys.readouterr()
    assert main(["evaluate", str(run.path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("test fold (") and "validation" not in out.splitlines()[0]
    assert f"balanced accuracy {run.read_result()['balanced_accuracy']:.3f}" in out


class _AutocastSpy(torch.nn.Module):
    """Records whether each forward pass ran under CPU autocast, and in which dtype."""

    def __init__(self, k: int = 2):
        super().__init__()
        self.k, self.seen = k, []

    def forward_with_embedding(self, x):
        self.seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        n = len(x)
        return torch.zeros(n, self.k), torch.zeros(n, 3)


@pytest.mark.parametrize(("amp", "expected"), [("bf16", torch.bfloat16), ("off", False)])
def test_evaluation_runs_under_the_autocast_training_uses(coded, amp, expected):
    import numpy as np
    from helpers import loader_cfg

    from cellmorph.config import Config
    from cellmorph.evaluation import Fold
    from cellmorph.loaders import build_loader
    from cellmorph.train import evaluate

    n = len(coded)
    labels, rows = np.arange(n) % 2, np.arange(n)
    loader = build_loader(
        coded, rows, labels, loader_cfg(), train=False, device=torch.device("cpu")
    )
    data = type("D", (), {"fold": Fold(["a", "b"], labels, np.arange(n) // 5)})()
    spy = _AutocastSpy()
    cfg = Config(train={"amp": amp}, eval={"top_k": 1})
    result = evaluate(spy, loader, rows, data, Context(), cfg)
    assert spy.seen and set(spy.seen) == {expected}
    assert result.metrics["n_images"] == n


@pytest.mark.parametrize("epochs", [1, 4, 38, 600])
def test_the_terminal_shows_at_most_ten_epoch_lines_and_the_last(epochs):
    from cellmorph.progress import EPOCH_LINES, shown

    lines = [e for e in range(epochs) if shown({"epoch": e, "epochs": epochs}, epochs)]
    assert len(lines) <= EPOCH_LINES and lines[-1] == epochs - 1
    assert len(lines) == min(epochs, EPOCH_LINES) or epochs % EPOCH_LINES


def test_the_result_line_says_what_phenotypic_activity_rests_on():
    from cellmorph.progress import activity_line

    prof = {"fold": "validation + test wells", "treatments_scorable": 2, "treatments_total": 9,
            "embeddings": {"mean_map": 1.0, "fraction_retrieved": 1.0, "treatments": 2},
            "intensity_baseline": {"mean_map": 0.5}}  # fmt: skip
    line = activity_line(prof)
    assert "(validation + test wells): 2 of 9 treatments scorable, 2 retrieved" in line
    assert "100%" not in line


def test_evaluate_refuses_a_run_without_best_pt(small_cfg, capsys):
    from cellmorph.cli import main

    run = run_local(_cfg(small_cfg, "nobest"))
    run.best_checkpoint.unlink()  # last.pt is still there
    before = run.result.read_bytes()
    assert main(["evaluate", str(run.path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "best.pt is missing" in err and "last.pt is not the chosen model" in err
    assert run.result.read_bytes() == before  # nothing rescored with the wrong model


@pytest.fixture(scope="module")
def sample_store(tiny_plate, tmp_path_factory):
    """The tiny plate converted with ``label_column=Metadata_broad_sample``."""
    from cellmorph.config import ConvertConfig
    from cellmorph.synth import CSV_NAME
    from conversion.pack import convert

    store = tmp_path_factory.mktemp("by_sample") / "store.zarr"
    csv = tiny_plate.parent / "raw" / CSV_NAME  # the plate conftest's tiny_plate generated
    convert(ConvertConfig(load_data=str(csv), size=40, shard_size=16,
                          workers=1, label_column="Metadata_broad_sample"), store)  # fmt: skip
    return store


def test_training_uses_the_label_column_the_store_recorded(small_cfg, sample_store):
    run = run_local(_cfg(small_cfg, "recorded", "train.epochs=1", f"data.store={sample_store}"))
    assert load_config(run.path / "config.yaml").data.label_column == "Metadata_broad_sample"
    assert json.loads(run.classes.read_text())["label_column"] == "Metadata_broad_sample"
    assert load_checkpoint(run.path / "checkpoints" / "last.pt")["config"]["data"][
        "label_column"] == "Metadata_broad_sample"  # fmt: skip


def test_an_explicit_label_column_wins_over_the_stores(small_cfg, sample_store):
    cfg = _cfg(small_cfg, "explicit", "train.epochs=1", f"data.store={sample_store}",
               "data.label_column=Metadata_pert_iname")  # fmt: skip
    run = run_local(cfg)
    assert load_config(run.path / "config.yaml").data.label_column == "Metadata_pert_iname"
    assert json.loads(run.classes.read_text())["label_column"] == "Metadata_pert_iname"
