"""The GPU check: one command on a lent GPU machine, one JSON object with everything measured.

Sections, in this order, each in its own process with its own time limit so that a crash or a
hang loses only that section, and each skipped when the overall budget (6 minutes by default)
cannot cover it:

- ``env``: GPU, driver, CUDA, Python and package versions;
- ``store``: a synthetic plate packed as an LZ4 store (what DALI inflates on the GPU), read
  once so that it is in the page cache;
- ``loaders``: img/s of the DALI loader (GPU inflate + augmentation) and the torch loader,
  batch 512 at 128 px, all augmentations on;
- ``train`` and ``train_compile``: img/s of a plain training step (forward, cross-entropy,
  backward, AdamW; bf16 autocast, channels_last) at batch 256, 128 px, model-only (batches
  already on the GPU) and end to end through each loader; without and with ``torch.compile``;
- ``tests``: the ``gpu``-marked tests;
- ``ray``: a 1-worker Ray Train run on the GPU (``cellmorph.launch.run_ray_training``).

``--quick`` leaves out DALI and Ray (what the machine runs with the kit's base group only);
``--cpu-smoke`` runs the same code on the CPU with a tiny store and tiny steps, so that a CPU
test proves the script works end to end.

    PYTHONPATH=/tmp/site:$PWD python3 bench/gpu_check.py --out $OUT/gpu_check.json
    .venv/bin/python bench/gpu_check.py --quick --cpu-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"dali_loader_img_s": 30_000, "train_end_to_end_img_s": 15_000, "end_to_end_ratio": 0.9}
ORDER = ("env", "store", "loaders", "train", "train_compile", "tests", "ray")
# Seconds a section may take at most, and the least worth starting it with.
CAPS = {
    "env": (60, 5),
    "store": (90, 10),
    "loaders": (90, 20),
    "train": (90, 20),
    "train_compile": (150, 45),
    "tests": (90, 20),
    "ray": (150, 45),
}
SMOKE_CAP_SCALE = 4


@dataclass(frozen=True)
class Plan:
    """Every size and count of one run; the child processes rebuild it from the same flags."""

    device: str
    quick: bool
    smoke: bool
    images: int  # sites in the synthetic store (4 per well)
    store_size: int
    image_size: int
    loader_batch: int
    train_batch: int
    warmup: int
    steps: int
    workers: int
    reader_threads: int
    dali_threads: int
    width_mult: float
    compile_backend: str
    ray_epochs: int

    @property
    def kinds(self) -> list[str]:
        return ["torch"] if self.quick else ["dali", "torch"]


def make_plan(args: argparse.Namespace) -> Plan:
    if args.cpu_smoke:
        return Plan(
            "cpu", args.quick, True, images=48, store_size=40, image_size=32, loader_batch=8,
            train_batch=8, warmup=1, steps=2, workers=1, reader_threads=1, dali_threads=1,
            width_mult=0.35, compile_backend="eager", ray_epochs=1,
        )  # fmt: skip
    cpus = os.cpu_count() or 8
    return Plan(
        "cuda", args.quick, False, images=args.images, store_size=160, image_size=128,
        loader_batch=512, train_batch=256, warmup=args.warmup, steps=args.steps,
        workers=args.workers or min(8, max(1, cpus // 2)), reader_threads=2,
        dali_threads=4, width_mult=1.0, compile_backend="inductor", ray_epochs=2,
    )  # fmt: skip


# --------------------------------------------------------------------------- sections


def section_env(plan: Plan, state: Path) -> dict[str, Any]:
    import importlib.metadata as md
    import platform

    import torch

    names = [
        "torch", "torchvision", "numpy", "pandas", "pyarrow", "scikit-learn", "pydantic",
        "typing-extensions", "zarr", "numcodecs", "imbalanced-learn", "nvidia-dali-cuda120",
        "nvidia-libnvcomp-cu12", "ray", "pytest",
    ]  # fmt: skip
    versions = {}
    for n in names:
        with suppress(md.PackageNotFoundError):
            versions[n] = md.version(n)
    out: dict[str, Any] = {
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cuda_available": torch.cuda.is_available(),
        "packages": versions,
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "memory_gib": round(p.total_memory / 2**30, 1),
            "multiprocessors": p.multi_processor_count,
            "bf16": torch.cuda.is_bf16_supported(),
        }
        out["nvidia_smi"] = _nvidia_smi()
    return out


def _cpu_model() -> str:
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def _nvidia_smi() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    q = "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit"
    res = subprocess.run([smi, q, "--format=csv,noheader"], capture_output=True, text=True)
    return res.stdout.strip() or res.stderr.strip()


def section_store(plan: Plan, state: Path) -> dict[str, Any]:
    from cellmorph.config import load_config
    from cellmorph.synth import generate_plate
    from conversion.pack import convert

    wells = -(-plan.images // 4)
    cols = min(24, wells)
    rows = -(-wells // cols)
    overrides = [
        f"synth.out={state / 'raw'}", "synth.plates=1", f"synth.rows={rows}",
        f"synth.cols={cols}", "synth.sites=4", f"synth.size={plan.store_size}",
        "convert.codec=lz4", f"convert.size={plan.store_size}", "convert.shard_size=256",
        f"convert.workers={min(8, os.cpu_count() or 1)}",
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    csv = generate_plate(cfg.synth, progress=False)
    t1 = time.perf_counter()
    store = state / "store.zarr"
    convert(load_config(None, [*overrides, f"convert.load_data={csv}"]).convert, store)
    t2 = time.perf_counter()
    shutil.rmtree(state / "raw", ignore_errors=True)
    size = _read_all(store)  # into the page cache
    return {
        "images": rows * cols * 4,
        "store_px": plan.store_size,
        "codec": "lz4",
        "bytes": size,
        "synth_s": round(t1 - t0, 1),
        "convert_s": round(t2 - t1, 1),
        "page_cache_read_s": round(time.perf_counter() - t2, 2),
    }


def _read_all(folder: Path) -> int:
    total = 0
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    total += len(chunk)
    return total


class Data:
    """The store, per-row labels and the loader settings of one plan."""

    def __init__(self, plan: Plan, state: Path):
        import numpy as np
        import pandas as pd
        import torch

        from cellmorph.config import load_config, resolve_from_store
        from cellmorph.store import open_store

        self.plan = plan
        self.store = open_store(state / "store.zarr")
        column = resolve_from_store(load_config(None, [f"data.store={state / 'store.zarr'}"]))
        column = column.data.label_column
        self.labels = pd.factorize(self.store.metadata[column].astype(str), sort=True)[0]
        self.classes = int(self.labels.max()) + 1
        # Loader settings go through load_config, so a renamed key fails with its name.
        self.overrides = [
            f"loader.image_size={plan.image_size}", f"loader.num_workers={plan.workers}",
            f"loader.reader_threads={plan.reader_threads}",
            f"loader.dali_threads={plan.dali_threads}",
        ]  # fmt: skip
        self.np = np
        self.device = torch.device(plan.device, 0) if plan.device == "cuda" else torch.device("cpu")

    def loader(self, kind: str, batch: int, batches: int) -> Any:
        """A training loader (augmentation on) whose epoch is exactly ``batches`` batches."""
        from cellmorph.config import load_config
        from cellmorph.loaders import build_loader

        extra = [f"loader.kind={kind}", f"loader.batch_size={batch}"]
        cfg = load_config(None, [*self.overrides, *extra]).loader
        rows = self.np.resize(self.np.arange(len(self.store)), batch * batches)
        return build_loader(
            self.store, rows, self.labels, cfg, train=True, device=self.device, seed=0
        )


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _epoch(loader: Any, epoch: int) -> Iterator[tuple[Any, Any]]:
    loader.set_epoch(epoch)
    for x, y, _rows in loader:
        yield x, y


def _close(loader: Any) -> None:
    close = getattr(loader, "close", None)
    if close is not None:
        with suppress(Exception):
            close()


def section_loaders(plan: Plan, state: Path) -> dict[str, Any]:
    """Loader alone: batches drawn and made ready on the device, nothing trained."""
    data = Data(plan, state)
    b, n = plan.loader_batch, plan.warmup + plan.steps
    out: dict[str, Any] = {
        "batch_size": b,
        "image_size": plan.image_size,
        "workers": plan.workers,
        "reader_threads": plan.reader_threads,
        "dali_threads": plan.dali_threads,
        "batches": {"warmup": plan.warmup, "timed": plan.steps},
        "img_s": {},
        "dali_gpu_inflate": None,
        "errors": {},
    }
    for kind in plan.kinds:
        try:
            rate, raw = _loader_rate(data, kind, b, n)
            out["img_s"][kind] = round(rate, 1)
            if kind == "dali":
                out["dali_gpu_inflate"] = raw
        except Exception as e:  # DALI missing or broken: report it and measure the rest
            out["errors"][kind] = f"{type(e).__name__}: {e}"
        save_partial(state, "loaders", out)
    return out


def save_partial(state: Path, name: str, result: dict[str, Any]) -> None:
    """What a section has measured so far: kept if the section is killed or fails later."""
    tmp = state / f"{name}.partial.tmp"
    tmp.write_text(json.dumps(result) + "\n")
    tmp.replace(state / f"{name}.partial.json")


def _loader_rate(data: Data, kind: str, batch: int, n: int) -> tuple[float, bool | None]:
    """(img/s, whether the loader inflates LZ4 on the GPU) over the timed batches."""
    loader = data.loader(kind, batch, n)
    try:
        t0, seen = 0.0, 0
        for i, (x, _y) in enumerate(_epoch(loader, 0)):
            if i == data.plan.warmup:
                _sync(data.device)
                t0 = time.perf_counter()
            if i >= data.plan.warmup:
                seen += len(x)
        _sync(data.device)
        return seen / (time.perf_counter() - t0), getattr(loader, "raw", None)
    finally:
        _close(loader)


class Step:
    """One plain training step: forward, cross-entropy, backward, AdamW (bf16, channels_last)."""

    def __init__(self, data: Data, compiled: bool):
        import torch

        from cellmorph.model import build_model

        cuda = data.device.type == "cuda"
        model_cfg = _model_cfg(data.plan.width_mult)
        model = build_model(model_cfg, len(data.store.channels), data.classes).to(data.device)
        self.channels_last = cuda
        if cuda:
            model = model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=cuda)
        self.model = model
        self.fn = torch.compile(model, backend=data.plan.compile_backend) if compiled else model
        self.amp = torch.bfloat16 if cuda else None
        self.device, self.loss_fn = data.device, torch.nn.CrossEntropyLoss()

    def __call__(self, x: Any, y: Any) -> Any:
        import torch

        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            loss = self.loss_fn(self.fn(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss


def _model_cfg(width_mult: float) -> Any:
    from cellmorph.config import load_config

    return load_config(None, [f"model.width_mult={width_mult}"]).model


def _train_rate(step: Step, batches: Iterator[tuple[Any, Any]], plan: Plan) -> dict[str, float]:
    """Images/s over ``plan.steps`` steps after ``plan.warmup`` steps (compilation included)."""
    t0 = time.perf_counter()
    loss = None
    for _ in range(plan.warmup):
        loss = step(*next(batches))
    _sync(step.device)
    warm_s = time.perf_counter() - t0
    t1, seen = time.perf_counter(), 0
    for _ in range(plan.steps):
        x, y = next(batches)
        loss = step(x, y)
        seen += len(y)
    value = float(loss.item())  # waits for the last step
    dt = time.perf_counter() - t1
    for _ in batches:  # let the loader end its epoch cleanly
        pass
    return {"img_s": round(seen / dt, 1), "warmup_s": round(warm_s, 1), "loss": round(value, 3)}


def _resident(data: Data, n: int) -> list[tuple[Any, Any]]:
    """Up to 16 augmented batches kept on the device (the model-only input), cycled."""
    k = min(n, 16)
    loader = data.loader("torch", data.plan.train_batch, k)
    try:
        return [(x.clone(), y.clone()) for x, y in _epoch(loader, 0)]
    finally:
        _close(loader)


def _cycle(items: list[tuple[Any, Any]], n: int) -> Iterator[tuple[Any, Any]]:
    for i in range(n):
        yield items[i % len(items)]


def train_section(plan: Plan, state: Path, compiled: bool) -> dict[str, Any]:
    name = "train_compile" if compiled else "train"
    data = Data(plan, state)
    n = plan.warmup + plan.steps
    step = Step(data, compiled)
    out: dict[str, Any] = {
        "batch_size": plan.train_batch,
        "image_size": plan.image_size,
        "amp": "bf16" if step.amp is not None else "off",
        "channels_last": step.channels_last,
        "compile": plan.compile_backend if compiled else False,
        "width_mult": plan.width_mult,
        "steps": {"warmup": plan.warmup, "timed": plan.steps},
        "model_only": _train_rate(step, _cycle(_resident(data, n), n), plan),
        "end_to_end": {},
        "ratio": {},
        "errors": {},
    }
    save_partial(state, name, out)
    for kind in plan.kinds:
        loader = None
        try:
            loader = data.loader(kind, plan.train_batch, n)
            r = out["end_to_end"][kind] = _train_rate(step, _epoch(loader, 0), plan)
            out["ratio"][kind] = round(r["img_s"] / out["model_only"]["img_s"], 3)
        except Exception as e:
            out["errors"][kind] = f"{type(e).__name__}: {e}"
        finally:
            if loader is not None:
                _close(loader)
        save_partial(state, name, out)
    return out


def section_train(plan: Plan, state: Path) -> dict[str, Any]:
    return train_section(plan, state, compiled=False)


def section_train_compile(plan: Plan, state: Path) -> dict[str, Any]:
    return train_section(plan, state, compiled=True)


def section_tests(plan: Plan, state: Path) -> dict[str, Any]:
    """The gpu-marked tests (without DALI in --quick), summarized from pytest's JUnit XML."""
    files = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").glob("test_*.py")
        if "mark.gpu" in p.read_text()
    )
    xml = state / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu"]
    cmd += ["--junitxml", str(xml), *(["-k", "not dali"] if plan.quick else []), *files]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    out = {"command": " ".join(cmd[1:]), "files": files, "exit_code": proc.returncode}
    out.update(_junit(xml) if xml.is_file() else {"output_tail": proc.stdout[-2000:]})
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _junit(xml: Path) -> dict[str, Any]:
    import xml.etree.ElementTree as ET

    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            counts["failed" if "failure" in kinds else "errors"] += 1
            bad = case.find("failure") if "failure" in kinds else case.find("error")
            failures.append({"test": name, "message": (bad.get("message") or "")[:500]})
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures}


def section_ray(plan: Plan, state: Path) -> dict[str, Any]:
    """One Ray Train run with one worker through ``cellmorph.launch.run_ray_training``."""
    try:
        import ray
    except ImportError as e:
        return {"skipped": f"ray not installed ({e})"}
    from cellmorph.config import load_config
    from cellmorph.launch import run_ray_training

    kind = "torch"
    with suppress(Exception):
        import nvidia.dali  # noqa: F401

        kind = "dali"
    gpu = plan.device == "cuda"
    overrides = [
        "name=gpu-check-ray", f"run_root={state / 'runs'}", f"data.store={state / 'store.zarr'}",
        # 2 folds and no test fold: the synthetic plate's rare classes have 2 wells; a timing
        # check runs the epochs it is given (no min_steps top-up)
        "data.val_fraction=0.5", "data.test_fraction=0", "train.min_steps=0",
        "ray.num_workers=1", f"ray.use_gpu={str(gpu).lower()}",
        f"ray.cpus_per_worker={max(1, plan.workers)}", f"train.epochs={plan.ray_epochs}",
        f"loader.kind={kind}", f"loader.batch_size={plan.train_batch}",
        f"loader.eval_batch_size={plan.loader_batch}", f"loader.image_size={plan.image_size}",
        f"loader.num_workers={plan.workers}", f"model.width_mult={plan.width_mult}",
    ]  # fmt: skip
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    t0 = time.perf_counter()
    try:
        epochs = run_ray_training(cfg).history()
    finally:
        with suppress(Exception):
            ray.shutdown()
    return {
        "loader": kind,
        "use_gpu": gpu,
        "seconds": round(time.perf_counter() - t0, 1),
        "epochs": len(epochs),
        "last_epoch": epochs[-1] if epochs else None,
        "overrides": overrides,
    }


SECTIONS: dict[str, Callable[[Plan, Path], dict[str, Any]]] = {
    "env": section_env,
    "store": section_store,
    "loaders": section_loaders,
    "train": section_train,
    "train_compile": section_train_compile,
    "tests": section_tests,
    "ray": section_ray,
}


# --------------------------------------------------------------------------- orchestration


def run_child(name: str, argv: list[str], state: Path, limit: float) -> dict[str, Any]:
    """Run one section in its own process group; kill the group at ``limit`` seconds."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--section", name]
    cmd += ["--state", str(state)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=limit)
        status = "ok" if proc.returncode == 0 else "error"
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        status = "timeout"
    meta: dict[str, Any] = {"status": status, "seconds": round(time.perf_counter() - t0, 1)}
    result_file = state / f"{name}.json"
    if status == "ok" and result_file.is_file():
        return {"meta": meta, "result": json.loads(result_file.read_text())}
    meta["status"] = status if status != "ok" else "error"
    meta["output_tail"] = (output or "")[-3000:]
    partial = state / f"{name}.partial.json"
    result = json.loads(partial.read_text()) if partial.is_file() else None
    if result is not None:
        result["partial"] = True  # measured before the section died
    return {"meta": meta, "result": result}


def wanted(plan: Plan) -> list[str]:
    return [s for s in ORDER if not (plan.quick and s == "ray")]


def orchestrate(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    plan = make_plan(args)
    state = Path(tempfile.mkdtemp(prefix="cm-gpu-check-"))
    t0 = time.perf_counter()
    deadline = t0 + args.budget
    report: dict[str, Any] = {
        "check": "bench/gpu_check.py",
        "mode": ("quick" if plan.quick else "full") + (" cpu-smoke" if plan.smoke else ""),
        "plan": asdict(plan),
        "goals": GOALS,
        "kit": _kit_report(args.kit_report),
        "sections": {},
    }
    try:
        for name in wanted(plan):
            cap, least = CAPS[name]
            # The caps are sized for the GPU machine; a --cpu-smoke run (a test on a shared
            # 2-core machine) is slower and only its overall --budget bounds it.
            cap *= SMOKE_CAP_SCALE if plan.smoke else 1
            left = deadline - time.perf_counter()
            needs_store = name not in ("env", "tests") and "store" in report["sections"]
            if needs_store and report["sections"]["store"]["status"] != "ok":
                report["sections"][name] = {"status": "skipped", "why": "no store"}
            elif left < least:
                report["sections"][name] = {"status": "skipped", "why": f"{left:.0f} s left"}
            else:
                got = run_child(name, argv, state, min(cap, left))
                report["sections"][name] = got["meta"]
                report[name] = got["result"]
            _write(report, args.out, t0)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    report["verdicts"] = verdicts(report)
    _write(report, args.out, t0)
    return report


def _kit_report(path: str | None) -> Any:
    if not path:
        return None
    p = Path(path)
    return json.loads(p.read_text()) if p.is_file() else f"{p}: not found"


def _write(report: dict[str, Any], out: str | None, t0: float) -> None:
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(out + ".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(out)


def verdicts(report: dict[str, Any]) -> dict[str, Any]:
    """Each goal: the measured figure and whether it is met (None where not measured)."""
    out: dict[str, Any] = {}
    dali = ((report.get("loaders") or {}).get("img_s") or {}).get("dali")
    out["dali_loader"] = _verdict(dali, GOALS["dali_loader_img_s"])
    best, best_ratio = None, None
    for name in ("train", "train_compile"):
        sec = report.get(name) or {}
        for kind, r in (sec.get("end_to_end") or {}).items():
            if best is None or r["img_s"] > best[0]:
                best = (r["img_s"], f"{name}/{kind}")
                best_ratio = sec["ratio"][kind]
    out["train_end_to_end"] = _verdict(best and best[0], GOALS["train_end_to_end_img_s"])
    out["train_end_to_end"]["variant"] = best and best[1]
    out["end_to_end_ratio"] = _verdict(best_ratio, GOALS["end_to_end_ratio"])
    return out


def _verdict(value: float | None, goal: float) -> dict[str, Any]:
    return {"measured": value, "goal": goal, "met": None if value is None else value >= goal}


def run_section(args: argparse.Namespace) -> None:
    """Child process: run one section and write its JSON into the state folder."""
    plan = make_plan(args)
    state = Path(args.state)
    result = SECTIONS[args.section](plan, state)
    (state / f"{args.section}.json").write_text(json.dumps(result) + "\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="leave out DALI and Ray")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny run on the CPU (a test)")
    ap.add_argument("--out", default=None, help="also write the JSON here (e.g. $OUT/...)")
    ap.add_argument("--budget", type=float, default=None, help="seconds in all (default 350)")
    ap.add_argument("--images", type=int, default=1024, help="sites in the synthetic store")
    ap.add_argument("--steps", type=int, default=60, help="timed steps/batches per figure")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps/batches first")
    ap.add_argument("--workers", type=int, default=None, help="loader workers (cpus/2, <= 8)")
    ap.add_argument("--kit-report", default=None, help="the kit's install.json, copied in")
    ap.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.budget is None:
        args.budget = 240.0 if args.cpu_smoke else 350.0
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be >= 1")
    return args


def child_argv(args: argparse.Namespace) -> list[str]:
    """The flags that decide the plan, for the section processes."""
    out = ["--quick"] if args.quick else []
    out += ["--cpu-smoke"] if args.cpu_smoke else []
    out += ["--images", str(args.images), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    return out + (["--workers", str(args.workers)] if args.workers else [])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.section:
        run_section(args)
        return 0
    if not args.cpu_smoke:
        import torch

        if not torch.cuda.is_available():
            print("error: torch sees no CUDA GPU here (use --cpu-smoke on a CPU)", file=sys.stderr)
            return 2
    report = orchestrate(args, child_argv(args))
    print(json.dumps(report, indent=1))
    failed = [k for k, v in report["sections"].items() if v["status"] in ("error", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
