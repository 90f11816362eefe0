"""GPU-side efficiency that can be checked without a GPU: loaders built once, workers kept across
epochs, pinned memory for CUDA, no per-step host synchronisation in the training loop."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from helpers import loader_cfg as _cfg
from helpers import row_labels as _labels

from cellmorph.loaders import build_loader

CPU = torch.device("cpu")
N = 50


def test_torch_loader_keeps_its_worker_processes_across_epochs(coded):  # noqa: F811
    loader = build_loader(coded, np.arange(N), _labels(), _cfg(num_workers=1), train=True,
                          device=CPU)  # fmt: skip
    dl = loader.dataloader
    assert dl.persistent_workers and dl.num_workers == 1
    # The same DataLoader object serves every epoch; its worker processes stay up.
    pids = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        list(loader)
        pids.append(sorted(w.pid for w in dl._iterator._workers))
    assert pids[0] == pids[1] == pids[2]
    assert loader.dataloader is dl
    # And epochs still differ: the sampler hands out (epoch, batch) pairs.
    loader.set_epoch(0)
    first = [r.numpy().tolist() for _, _, r in loader]
    loader.set_epoch(1)
    second = [r.numpy().tolist() for _, _, r in loader]
    assert first != second


def test_cuda_loader_pins_memory_and_copies_without_blocking(coded):  # noqa: F811
    # Built only (no iteration): the settings that make the copy overlap the step.
    loader = build_loader(coded, np.arange(N), _labels(), _cfg(num_workers=1), train=True,
                          device=torch.device("cuda", 0))  # fmt: skip
    assert loader.dataloader.pin_memory is True
    cpu = build_loader(coded, np.arange(N), _labels(), _cfg(num_workers=1), train=True, device=CPU)
    assert cpu.dataloader.pin_memory is False


def test_dali_pipeline_is_built_once_per_run(coded, monkeypatch):  # noqa: F811
    from cellmorph.loaders.dali_loader import DaliLoader

    builds = []
    real = DaliLoader._build
    monkeypatch.setattr(DaliLoader, "_build", lambda self, e: (builds.append(e), real(self, e)))
    loader = build_loader(coded, np.arange(N), _labels(), _cfg(kind="dali", num_workers=1),
                          train=True, device=CPU)  # fmt: skip
    for epoch in range(3):
        loader.set_epoch(epoch)
        assert len(list(loader)) == len(loader)
    assert builds == [0]  # one pipeline, fed epoch after epoch
    evaluation = build_loader(coded, np.arange(N), _labels(), _cfg(kind="dali", num_workers=1),
                              train=False, device=CPU)  # fmt: skip
    for _ in range(2):
        list(evaluation)
    assert builds == [0, 0]  # the evaluation loader too: built at its first use, then reused


def test_training_step_reads_the_loss_only_at_the_log_interval(small_cfg, monkeypatch):
    from cellmorph.distributed import local_context
    from cellmorph.progress import StepProgress
    from cellmorph.rundir import RunDir
    from cellmorph.train import train_one_epoch
    from cellmorph.train_setup import build_data, build_training, plan_schedule

    cfg = small_cfg("sync", "train.log_every=1000", "loader.batch_size=4")
    ctx = local_context()
    data = build_data(cfg, ctx)
    schedule = plan_schedule(cfg, len(data.train_loader), 1)
    t = build_training(cfg, data, schedule, ctx)
    reads = []
    real_item = torch.Tensor.item

    def item(self):  # count the loop's own reads (torch's optimizers read CPU step counters)
        if sys._getframe(1).f_code.co_filename.endswith(os.path.join("cellmorph", "train.py")):
            reads.append(1)
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", item)
    progress = StepProgress(RunDir(cfg.run_dir), 1, enabled=False, console=False, bar=False)
    steps = len(data.train_loader)
    assert steps >= 4
    stats = train_one_epoch(t, data.train_loader, 0, steps, cfg.train, 1.0, progress)
    # One read for the last step's log line and one for the epoch's summary: not one per step.
    assert len(reads) <= 2
    assert stats["train_images"] == steps * 4 and np.isfinite(stats["train_loss"])


@pytest.mark.parametrize("world_size", [1, 2])
def test_evaluation_loader_is_built_once_and_reused(small_cfg, world_size):
    from cellmorph.distributed import Context
    from cellmorph.train_setup import build_data

    cfg = small_cfg("evalonce")
    data = build_data(cfg, Context(rank=0, world_size=world_size))
    loader = data.val_loader
    first = [r.numpy().tolist() for _, _, r in loader]
    assert [r.numpy().tolist() for _, _, r in loader] == first  # same rows, same loader object
    assert data.val_loader is loader
