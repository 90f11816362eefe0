"""The shell blocks of README.md and docs/*.md: each one runs in a test or is marked.

Every ```bash block follows a marker line, ``<!-- shell: KIND [ID] -->``:

- ``run ID``: a test here runs the block as written; ``RUN_BY`` names it. What it changes is
  named where it happens: free ports instead of Ray's defaults, a private HOME and temp dir,
  a smaller plate and one epoch (overrides appended to each job line).
- ``example``: for another machine (your data, a cluster address, a bucket, a GPU); its first
  line says ``# Example ...``. Its cellmorph, ray_jobs and conversion commands are parsed here
  with the real parsers and config loaders, so a renamed option or key fails here.
- ``make``: ``make`` targets (``make test`` cannot run inside the suite); each must exist.
- ``bench``: benchmark scripts (minutes each; ``make bench``); each script and option must exist.

A new block without a marker, or a command this file does not know, fails the first test.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
KINDS = ("run", "example", "make", "bench")
RUN_BY = {"ray-cluster": "test_ray_cluster_commands_run_as_written"}
FENCE = re.compile(r"^```(\w*)\s*$")
MARK = re.compile(r"^<!-- shell: (\w+)(?: ([\w-]+))? -->$")
# Programs a block may call besides the project's commands (checked by what they are for).
OTHER_PROGRAMS = {"source", "export", "ray", "aws", "nvidia-smi", "nproc", "cat", "bash"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    kind: str | None
    ident: str | None
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def shell_blocks(path: Path) -> list[Block]:
    """The ```bash blocks of a markdown file, each with the marker on the line before it."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        if m.group(1) in ("bash", "sh", "shell", "console"):
            mark = MARK.match(lines[i - 1].strip()) if i else None
            kind, ident = (mark.group(1), mark.group(2)) if mark else (None, None)
            out.append(Block(path, i + 1, kind, ident, "\n".join(lines[i + 1 : end])))
        i = end + 1
    return out


def commands(text: str) -> list[str]:
    """The block's command lines: continuations joined, comment-only lines left out."""
    joined = re.sub(r"\\\n\s*", "", text)
    return [c.strip() for c in joined.splitlines() if c.strip() and not c.strip().startswith("#")]


def all_blocks() -> list[Block]:
    return [b for path in DOCS for b in shell_blocks(path)]


def run_block(ident: str) -> Block:
    (block,) = [b for b in all_blocks() if b.kind == "run" and b.ident == ident]
    return block


# --------------------------------------------------------------------------- markers


def test_every_shell_block_is_marked_and_every_run_block_has_its_test():
    blocks = all_blocks()
    assert any(b.kind == "run" for b in blocks)
    for b in blocks:
        assert b.kind in KINDS, f"{b.where}: a shell block needs <!-- shell: {'|'.join(KINDS)} -->"
        if b.kind == "example":
            assert b.text.startswith("# Example"), f"{b.where}: an example's first line says so"
    runs = sorted(b.ident for b in blocks if b.kind == "run")
    assert runs == sorted(RUN_BY), "each run block is run by exactly one test in this file"
    assert all(name in globals() for name in RUN_BY.values())


# --------------------------------------------------------------------------- commands parse


def _expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), text)


def _check_cellmorph(argv: list[str], where: str) -> None:
    """Parse with the real ``cellmorph`` parser, then load the config it names."""
    from cellmorph.cli import build_parser
    from cellmorph.config import load_config
    from cellmorph.sweep import load_sweep
    from conversion.cli import config_from_args

    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: cellmorph {shlex.join(argv)}: the parser refuses it")
    if args.command in ("train", "audit", "demo"):
        load_config(args.config, args.overrides)
    elif args.command == "tune":
        load_sweep(args.config, args.overrides)
    elif args.command == "convert":
        config_from_args(args)


def _check_module(argv: list[str], where: str) -> None:
    """``python -m MODULE ...``: the same arguments as the command it launches."""
    from cellmorph.config import load_config
    from cellmorph.sweep import load_sweep

    module, rest = argv[0], argv[1:]
    if module in ("conversion", "ray_jobs.convert"):
        _check_cellmorph(rest if module == "conversion" else ["convert", *rest], where)
        return
    assert module in ("ray_jobs.train", "ray_jobs.tune"), f"{where}: unknown module {module}"
    assert rest[0] == "--config", f"{where}: {module} takes --config first"
    (load_sweep if module == "ray_jobs.tune" else load_config)(rest[1], rest[2:])


def _check_bench(argv: list[str], where: str) -> None:
    script = REPO / argv[1]
    assert script.is_file(), f"{where}: no such script {argv[1]}"
    source = script.read_text()
    for opt in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
        assert f'"{opt}"' in source, f"{where}: {argv[1]} has no option {opt}"


def _check_command(tokens: list[str], env: dict[str, str], where: str) -> None:
    prog = tokens[0]
    if re.fullmatch(r"\w+=.*", prog) and len(tokens) == 1:
        env[prog.split("=")[0]] = prog.split("=", 1)[1]
    elif prog == "cellmorph":
        _check_cellmorph(tokens[1:], where)
    elif prog.endswith("python") and tokens[1] == "-m":
        _check_module(tokens[2:], where)
    elif prog.endswith("python"):
        _check_bench(tokens, where)
    elif prog == "make":
        for target in tokens[1:]:
            made = subprocess.run(["make", "-n", "-C", str(REPO), target], capture_output=True)
            assert made.returncode == 0, f"{where}: make has no target {target}"
    elif tokens[:3] == ["ray", "job", "submit"]:
        _check_command(tokens[tokens.index("--") + 1 :], env, where)
    else:
        assert prog in OTHER_PROGRAMS, f"{where}: this test does not know the program {prog}"


def test_every_command_in_the_docs_parses(monkeypatch):
    from cellmorph.errors import CellmorphError

    monkeypatch.chdir(REPO)  # the docs' relative paths (configs/...) are the repository's
    for block in all_blocks():
        env = {"PWD": str(REPO)}
        for cmd in commands(block.text):
            tokens = shlex.split(_expand(cmd, env), comments=True)
            where = f"{block.where} ({cmd[:60]})"
            try:
                if tokens:
                    _check_command(tokens, env, where)
            except CellmorphError as e:  # a config key or value the loaders refuse
                pytest.fail(f"{where}: {e}")


# --------------------------------------------------------------------------- the cluster block


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_clone(dest: Path, store: Path) -> Path:
    """The repository as a fresh clone has it (no .venv, data or runs), plus `make demo`'s
    store, for which the small test plate stands in."""
    patterns = [line.strip().rstrip("/") for line in (REPO / ".gitignore").read_text().splitlines()]
    ignore = shutil.ignore_patterns(".git", *[p for p in patterns if p and not p.startswith("#")])
    shutil.copytree(REPO, dest, ignore=ignore)
    (dest / "data" / "demo").mkdir(parents=True)
    (dest / "data" / "demo" / "store.zarr").symlink_to(store)
    return dest


@contextlib.contextmanager
def ray_head(tokens: list[str], dash: int, env: dict[str, str], log: Path) -> Iterator[None]:
    """The README's ``ray start --head`` as a child process, ended by its process id.

    Changed: ``--block`` (so the test owns the process), free ports (the session's test
    cluster may hold Ray's defaults), 2 CPUs and no GPU (the issue's machine), a private temp dir.
    """
    assert sum(t.startswith("--port=") for t in tokens) == 1
    tokens = [f"--port={_free_port()}" if t.startswith("--port=") else t for t in tokens]
    temp = tempfile.mkdtemp(prefix="cmr-")  # short: Ray's socket paths must stay < 108 bytes
    ports = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port", "ray-client-server-port")  # fmt: skip
    extra = ["--block", "--num-cpus=2", "--num-gpus=0", f"--dashboard-port={dash}",
             *[f"--{p}={_free_port()}" for p in ports], f"--temp-dir={temp}"]  # fmt: skip
    # Nothing to drain at the end (no Serve): without this, SIGTERM waits 30 s for a drain.
    env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    with log.open("w") as out:
        head = subprocess.Popen([*tokens, *extra], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        _wait_for_dashboard(dash, head, log)
        yield
    finally:
        head.terminate()  # `ray start --block` ends the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # its own session: only what it started
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_dashboard(dash: int, head: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
            return
        except urllib.error.HTTPError as e:
            if e.code == 401:
                return  # up, and asking for the token
            # Anything else answering there is not this head's dashboard (yet): a server that
            # took the port between _free_port() and `ray start` would fail the jobs obscurely.
            assert head.poll() is None, f"ray head exited: {log.read_text()[-2000:]}"
            time.sleep(1)
        except OSError:
            assert head.poll() is None, f"ray head exited: {log.read_text()[-2000:]}"
            time.sleep(1)
    pytest.fail("ray head's dashboard did not come up within 120 s")


# Appended to each job line: the small plate's sizes and one epoch (the README's lines train
# the demo for 20 epochs); the sweep keeps its 5 searched settings and runs 1 trial.
SMALL = ["train.epochs=1", "train.max_steps_per_epoch=2", "data.val_fraction=0.5",
         "data.test_fraction=0",
         "loader.batch_size=8", "loader.image_size=32", "model.width_mult=0.35"]  # fmt: skip
SMALLER = {
    "ray_jobs.train": ["name=readme-train", *SMALL],
    "ray_jobs.tune": ["num_samples=1", *SMALL],
}


def submit(cmd: str, dash: int, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """A ``ray job submit`` line through bash (so ``$PWD`` is the shell's), on the test's port."""
    assert "127.0.0.1:8265" in cmd
    line = cmd.replace("127.0.0.1:8265", f"127.0.0.1:{dash}")
    for _ in range(30):  # the job agent starts a little after the dashboard answers
        out = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True,
                             text=True, timeout=480)  # fmt: skip
        if "No available agent to submit job" not in out.stdout + out.stderr:
            return out
        time.sleep(2)
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_ray_cluster_commands_run_as_written(tiny_plate, tmp_path):
    block = run_block("ray-cluster")
    clone = fresh_clone(tmp_path / "clone", tiny_plate)
    home = tmp_path / "home"  # ~/.ray/auth_token lands here, not in the real home
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # never the session's test cluster
    dash, jobs = _free_port(), {}
    # What the user typed: the sweep without paths is refused with one line. It asks
    # the cluster for nothing, so it runs beside the README's jobs, not after them (13 s alone).
    bare = ("ray job submit --address http://127.0.0.1:8265 --working-dir . -- "
            "python -m ray_jobs.tune --config configs/sweep.yaml")  # fmt: skip
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1))
        refused = None
        for cmd in commands(block.text):
            tokens = shlex.split(cmd, comments=True)
            if tokens == ["source", ".venv/bin/activate"]:
                env["PATH"] = f"{BIN}:{env['PATH']}"  # this test's venv is that .venv
            elif tokens[0] == "export":
                key, value = tokens[1].split("=", 1)
                env[key] = value
            elif tokens[:2] == ["ray", "get-auth-token"]:
                done = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True)
                assert done.returncode == 0, done.stderr
            elif tokens[:3] == ["ray", "start", "--head"]:
                stack.enter_context(ray_head(tokens, dash, env, tmp_path / "head.log"))
            elif tokens[:3] == ["ray", "job", "submit"]:
                refused = refused or pool.submit(submit, bare, dash, dict(env), clone)
                module = tokens[tokens.index("-m") + 1]
                jobs[module] = submit(f"{cmd} {shlex.join(SMALLER[module])}", dash, env, clone)
            else:
                pytest.fail(f"{block.where}: this test does not know how to run {cmd!r}")
        assert refused is not None, f"{block.where}: no `ray job submit` line"
        refused = refused.result()
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=5)
    assert (home / ".ray" / "auth_token").is_file()  # the head ran with token authentication
    _check_jobs(jobs, refused, clone)


# configs/sweep.yaml's searched keys
SPACE = ["optim.lr", "optim.weight_decay", "loader.batch_size", "optim.label_smoothing",
         "model.dropout"]  # fmt: skip


def _best_params(sweep: Path) -> dict:
    import json

    return json.loads((sweep / "best.json").read_text())["params"]


def _check_jobs(jobs: dict, refused: subprocess.CompletedProcess, clone: Path) -> None:
    import pandas as pd

    assert sorted(jobs) == ["ray_jobs.train", "ray_jobs.tune"]
    for module, out in jobs.items():
        text = out.stdout + out.stderr
        assert out.returncode == 0 and "succeeded" in text, f"{module}: {text[-3000:]}"
    assert (clone / "runs" / "readme-train" / "metrics.jsonl").read_text().count("\n") == 1
    tune = jobs["ray_jobs.tune"].stdout
    assert (
        "needs 2.05 CPUs, the cluster has 2 CPUs: each trial trains with ray.num_workers=1" in tune
    )
    assert (
        "sweep sweep: 1 trial, 1 at a time" in tune and "WorkerGroupStartupTimeoutError" not in tune
    )
    sweep = clone / "runs" / "sweep"
    assert len(pd.read_csv(sweep / "results.csv")) == 1
    assert (sweep / "best_config.yaml").is_file() and (sweep / "best.pt").is_file()
    # The best trial's config is a config the loader takes, with settings drawn from the space.
    from cellmorph.config import load_config

    best, params = load_config(sweep / "best_config.yaml"), _best_params(sweep)
    assert sorted(params) == sorted(SPACE) and best.train.epochs == 1
    for key, value in params.items():
        section, name = key.split(".")
        assert getattr(getattr(best, section), name) == value, key
    assert 1e-3 <= best.optim.lr <= 3e-2 and best.optim.weight_decay in (0.0, 0.05, 0.2)
    text = refused.stdout + refused.stderr
    assert refused.returncode != 0, text[-2000:]
    # One message (Ray prints the job's log twice: as it runs, and in the failure status).
    (error,) = {line for line in text.splitlines() if line.startswith("error: ")}
    assert "data.store: 'data/demo/store.zarr' is a relative path" in error
    assert "data.store=$PWD/data/demo/store.zarr" in error and "Traceback" not in text
