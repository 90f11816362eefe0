"""What a person sees while a run trains: one line per epoch, a progress bar on a terminal.

Rank 0 of the training loop reports through :class:`StepProgress`: in a local run it draws the
bar and prints the epoch lines itself; under Ray it writes ``progress.json`` and
``metrics.jsonl`` in the run directory, and the launcher's :class:`RunWatcher` shows the same
bar and lines from those files. Ray's own output stays out of the terminal either way.
Everything is also appended to ``logs/train.log`` in the run directory.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from tqdm import tqdm

from cellmorph.config import DataConfig
from cellmorph.errors import CellmorphError
from cellmorph.rundir import RunDir


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """``epoch 3/20  loss 1.912  val balanced acc 0.412 (chance 0.111)  acc 0.450 ...  eta 1m05s``."""
    epochs = int(record.get("epochs", epochs))  # the planned run (train.min_steps adds epochs)
    parts = [f"epoch {int(record['epoch']) + 1}/{epochs}"]
    if "train_loss" in record:
        parts.append(f"loss {record['train_loss']:.3f}")
    if "balanced_accuracy" in record:
        parts.append(
            f"val balanced acc {record['balanced_accuracy']:.3f} "
            f"(chance {record.get('chance', float('nan')):.3f})"
        )
        parts.append(f"acc {record['accuracy']:.3f}  macro-F1 {record['macro_f1']:.3f}")
    if "train_images_per_s" in record:
        parts.append(f"{record['train_images_per_s']:.0f} img/s")
    if "seconds" in record:
        left = (epochs - int(record["epoch"]) - 1) * float(record["seconds"])
        parts.append(f"eta {_duration(left)}")
    return "  ".join(parts)


# The terminal shows at most this many epoch lines per run (every epoch goes to logs/train.log).
EPOCH_LINES = 10


def shown(record: dict[str, Any], epochs: int) -> bool:
    """Whether an epoch's line goes to the terminal: every ``ceil(epochs / EPOCH_LINES)``-th
    epoch and the last, so a run of any length stays readable."""
    epochs = int(record.get("epochs", epochs))
    every = max(1, -(-epochs // EPOCH_LINES))
    epoch = int(record["epoch"]) + 1
    return epoch % every == 0 or epoch == epochs


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def result_line(m: dict[str, Any], data: DataConfig) -> str:
    """The result in one line: the test fold's scores (nothing was tuned on them)."""
    split, group_by = data.split, data.group_by
    grouped = f"grouped by {group_by}" if split == "grouped" else f"{split} split"
    if data.test_plates:
        grouped += f", test plates {', '.join(data.test_plates)}"
    if m.get("unit") == "cell" and "well_balanced_accuracy" in m:
        return cell_result_line(m, grouped) + activity_line(m.get("profiling") or {})
    text = (
        f"{m['fold']} fold ({grouped}, {m.get('n_images', '?')} images, model of epoch "
        f"{int(m['epoch']) + 1}): balanced accuracy {m['balanced_accuracy']:.3f}, accuracy "
        f"{m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}; chance {m['chance']:.3f}"
    )
    if "well_balanced_accuracy" in m:
        text += f"; well-level balanced accuracy {m['well_balanced_accuracy']:.3f}"
    return text + activity_line(m.get("profiling") or {})


def cell_result_line(m: dict[str, Any], grouped: str) -> str:
    """A cell store's result: the wells' balanced accuracy first, then sites', then cells'."""
    levels = [
        (lvl, m.get(f"{lvl}_balanced_accuracy"), m.get(f"n_{lvl}s")) for lvl in ("well", "site")
    ]
    text = (f"{m['fold']} fold ({grouped}, {m.get('n_images', '?')} cells in "
            f"{m.get('n_wells', '?')} wells, model of epoch {int(m['epoch']) + 1}): ")  # fmt: skip
    text += "; ".join(f"{lvl}-level balanced accuracy {v:.3f} ({n} {lvl}s)"
                      for lvl, v, n in levels if v is not None)  # fmt: skip
    return text + (f"; cell-level balanced accuracy {m['balanced_accuracy']:.3f}, accuracy "
                   f"{m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}; chance {m['chance']:.3f}")  # fmt: skip


def activity_line(profiling: dict[str, Any]) -> str:
    """Phenotypic activity in one line, saying which wells and how many treatments it rests on."""
    prof = profiling.get("embeddings") or {}
    if "mean_map" not in prof:
        return ""
    scored, total = profiling.get("treatments_scorable"), profiling.get("treatments_total")
    where = f" ({profiling['fold']})" if profiling.get("fold") else ""
    of = f"{scored} of {total} treatments scorable, " if total is not None else ""
    retrieved = round(prof["fraction_retrieved"] * prof.get("treatments", 0))
    base = (profiling.get("intensity_baseline") or {}).get("mean_map")
    text = (f"\nphenotypic activity{where}: {of}{retrieved} retrieved, mean mAP "
            f"{prof['mean_map']:.3f}")  # fmt: skip
    return text + (f" (intensity statistics: mAP {base:.3f})" if base is not None else "")


def _log(run: RunDir, line: str) -> None:
    run.logs.mkdir(parents=True, exist_ok=True)
    with (run.logs / "train.log").open("a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


class StepProgress:
    """Rank 0's progress within and across epochs (a no-op on other ranks)."""

    def __init__(self, run: RunDir, epochs: int, *, enabled: bool, console: bool, bar: bool):
        self.run, self.epochs, self.enabled = run, epochs, enabled
        self.console, self.show_bar = console and enabled, bar and console and enabled
        self._bar: tqdm | None = None

    def start_epoch(self, epoch: int, steps: int) -> None:
        if self.show_bar:
            self._bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{self.epochs}", unit="step",
                             leave=False, dynamic_ncols=True)  # fmt: skip

    def step(self, epoch: int, step: int, steps: int, loss: float, images_per_s: float) -> None:
        """Called at the log interval (it costs a host synchronisation for ``loss``)."""
        if not self.enabled:
            return
        info = {"epoch": epoch, "epochs": self.epochs, "step": step, "steps": steps, "loss": loss,
                "images_per_s": images_per_s, "time": time.time()}  # fmt: skip
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{images_per_s:.0f}")
        elif not self.console:
            self.run.write_progress(info)
        _log(self.run, f"epoch {epoch + 1} step {step}/{steps} loss {loss:.4f} "
                       f"{images_per_s:.1f} img/s")  # fmt: skip

    def end_epoch(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        line = epoch_line(record, self.epochs)
        _log(self.run, line)
        if self.console and shown(record, self.epochs):
            print(line, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        _log(self.run, text)
        if self.console:
            print(text, flush=True)


class RunWatcher:
    """The launcher's view of a run trained elsewhere (Ray workers): a thread that prints each
    new ``metrics.jsonl`` line once and, on a terminal, a bar from ``progress.json``."""

    def __init__(self, run: RunDir, epochs: int, *, bar: bool, quiet: bool = False,
                 interval: float = 0.5):  # fmt: skip
        self.run, self.epochs, self.bar, self.quiet, self.interval = (
            run,
            epochs,
            bar,
            quiet,
            interval,
        )
        self._seen = {int(r.get("epoch", -1)) for r in run.history()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="run-watcher", daemon=True)
        self._tqdm: tqdm | None = None

    def __enter__(self) -> RunWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()  # the last epoch's line, if it landed after the last poll
        self._close_bar()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def _poll(self) -> None:
        try:
            history = self.run.history()
        except (CellmorphError, OSError):  # a line being written, a bucket away: next time
            history = []
        for record in history:
            epoch = int(record.get("epoch", -1))
            if epoch not in self._seen:
                self._seen.add(epoch)
                self._close_bar()
                if not self.quiet and shown(record, self.epochs):
                    print(epoch_line(record, self.epochs), flush=True)
        if self.bar and not self.quiet:
            self._draw(self.run.read_progress())

    def _draw(self, p: dict[str, Any] | None) -> None:
        if not p or int(p["epoch"]) in self._seen:
            return
        desc = f"epoch {int(p['epoch']) + 1}/{int(p.get('epochs', self.epochs))}"
        if self._tqdm is None or self._tqdm.desc != desc:
            self._close_bar()
            self._tqdm = tqdm(total=int(p["steps"]), desc=desc, unit="step", leave=False,
                              dynamic_ncols=True)  # fmt: skip
        self._tqdm.n = int(p["step"])
        self._tqdm.set_postfix(loss=f"{p['loss']:.3f}", img_s=f"{p['images_per_s']:.0f}")

    def _close_bar(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
