"""Where a training process sits: rank, world, device, how it reports, and how it talks.

``train_loop`` takes a :class:`Context` and never asks Ray directly, so the same loop runs in
one process (``local_context``) and on every rank of a Ray Train worker group (the launcher
builds the context from Ray Train's).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cellmorph.errors import CellmorphError


@dataclass
class Context:
    """This process's place in the run.

    ``console``: print progress to this process's terminal (a local run); under Ray, progress
    goes to files in the run directory and the launcher shows it.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[dict[str, Any]], None] | None = None  # an epoch's scores, to Ray
    wrap_model: Callable[[nn.Module], nn.Module] | None = None
    console: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 only (None on the others): small objects (a few
        wells' sums), never a fold's outputs."""
        if not self.distributed:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def sum(self, vec: np.ndarray) -> np.ndarray:
        """The element-wise sum of every rank's float64 vector (on every rank), as one
        all-reduce of a tensor through the process group (on the GPU with nccl)."""
        if not self.distributed:
            return np.asarray(vec, dtype=np.float64)
        device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.as_tensor(np.asarray(vec, dtype=np.float64), device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().numpy()

    def broadcast(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def process(self) -> dict[str, Any]:
        """This rank's process, for the run's events (who to look at, who to signal)."""
        return {"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname()}


def local_context(use_gpu: bool = False) -> Context:
    """A single-process context; the GPU only when asked for and present."""
    if use_gpu and not torch.cuda.is_available():
        raise CellmorphError("ray.use_gpu is true but torch sees no CUDA GPU on this machine")
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    return Context(device=device, console=True)


def interactive() -> bool:
    """Whether a person watches this process's stderr (progress bars), not a log file."""
    return sys.stderr.isatty()
