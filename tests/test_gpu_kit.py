"""The GPU check kit (tools/gpu_kit.py) on tiny local wheels, and bench/gpu_check.py on the CPU.

Nothing here downloads: the resolver gets a fake fetcher over wheels built in tmp_path, and
``make gpu-kit`` itself exercises the pip download.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cellmorph.errors import CellmorphError

ROOT = Path(__file__).resolve().parents[1]


def _load_kit():
    """tools/gpu_kit.py by path: tools/ is not an installed package."""
    spec = importlib.util.spec_from_file_location("gpu_kit", ROOT / "tools" / "gpu_kit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_kit"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


kit = _load_kit()


def make_wheel(
    folder: Path,
    name: str,
    version: str,
    files: dict[str, bytes],
    requires: tuple[str, ...] = (),
) -> Path:
    """A valid py3-none-any wheel (METADATA, WHEEL, RECORD with hashes) holding ``files``."""
    dist = f"{name.replace('-', '_')}-{version}"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    entries = {
        **files,
        f"{dist}.dist-info/METADATA": meta.encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in entries.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    entries[f"{dist}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for path, data in entries.items():
            z.writestr(path, data)
    return wheel


def fake_fetch(wheels: dict[str, Path]):
    """A fetcher over local wheels that records what was asked for."""
    asked: list[tuple[str, str]] = []

    def fetch(name: str, spec: str) -> Path:
        asked.append((name, spec))
        return wheels[name]

    fetch.asked = asked  # type: ignore[attr-defined]
    return fetch


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, Path]:
    """Three wheels: alpha (needs beta and, on the machine, numpy), beta, and gamma-tool."""
    src = tmp_path / "src"
    noise = os.urandom(3000)  # incompressible: the stream spans several small parts
    return {
        "alpha": make_wheel(
            src,
            "alpha",
            "1.0",
            {
                "alpha/__init__.py": b"VALUE = 42\n",
                "alpha/noise.bin": noise,
                "alpha/_ext.cpython-311-x86_64-linux-gnu.so": b"x" * 500,
                "alpha/_ext.cpython-312-x86_64-linux-gnu.so": b"y" * 500,
                "alpha/_ext.abi3.so": b"z" * 100,
            },
            requires=(
                "beta>=2",
                "numpy>=1",
                'win-only; sys_platform == "win32"',
                'old-py; python_version < "3.12"',
                'extra-dep; extra == "fast"',
            ),
        ),  # fmt: skip
        "beta": make_wheel(src, "beta", "2.5", {"beta.py": b"NAME = 'beta'\n"}),
        "gamma-tool": make_wheel(
            src, "gamma-tool", "0.3", {"gamma_tool/__init__.py": b"", "gamma_tool/x.py": b"A = 1\n"}
        ),
        "extra-dep": make_wheel(src, "extra-dep", "1.0", {"extra_dep.py": b""}),
    }


GROUPS = (
    kit.Group("base", ("alpha",), "first"),
    kit.Group("more", ("gamma-tool",), "second"),
)


def build_kit(tmp_path: Path, tiny: dict[str, Path], part_bytes: int = 1500) -> dict:
    res = kit.resolve(GROUPS, {"alpha": "1.0"}, {"numpy": "2.0"}, fake_fetch(tiny))
    out = tmp_path / "kit-src"
    manifest = kit.pack(res, out, part_bytes, "6", log=lambda _m: None)
    manifest["repo_bytes"] = 1000
    (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest


# --------------------------------------------------------------------------- resolution


def test_resolve_ships_what_the_machine_lacks_with_markers_and_pins(tiny):
    fetch = fake_fetch(tiny)
    res = kit.resolve(GROUPS, {"alpha": "1.0"}, {"numpy": None, "beta": None}, fetch)
    assert [r.name for r in res.wheels] == ["alpha", "gamma-tool"]  # beta is on the machine
    assert res.from_machine["numpy"] == ["numpy>=1 (alpha==1.0)"]
    assert res.from_machine["beta"] == ["beta>=2 (alpha==1.0)"]
    # win32, Python < 3.12 and extra-only requirements do not apply to the machine
    assert ("alpha", "==1.0") in fetch.asked and ("gamma-tool", "") in fetch.asked
    assert not {n for n, _ in fetch.asked} & {"win-only", "old-py", "extra-dep"}


def test_resolve_follows_extras_and_groups(tiny):
    groups = (kit.Group("base", ("alpha",), ""), kit.Group("more", ("alpha[fast]",), ""))
    res = kit.resolve(groups, {}, {"numpy": None}, fake_fetch(tiny))
    by_name = {r.name: r for r in res.wheels}
    assert set(by_name) == {"alpha", "beta", "extra-dep"}
    # a dependency joins the group of the first package that needs it
    assert by_name["beta"].group == "base" and by_name["extra-dep"].group == "base"
    assert by_name["alpha"].extras == {"fast"}


def test_resolve_refuses_a_pin_that_breaks_a_requirement(tiny):
    with pytest.raises(CellmorphError, match="requirements.txt pins beta==1.0"):
        kit.resolve(GROUPS, {"beta": "1.0"}, {"numpy": None}, fake_fetch(tiny))


def test_overrides_are_shipped_even_when_the_machine_has_them(tiny, monkeypatch):
    monkeypatch.setattr(kit, "OVERRIDES", {"beta": "too old there"})
    res = kit.resolve(GROUPS, {}, {"numpy": None, "beta": None}, fake_fetch(tiny))
    assert "beta" in [r.name for r in res.wheels]


def test_machine_list_matches_the_issue():
    machine = kit.read_machine(ROOT / "tools" / "gpu_machine.txt")
    assert machine["torch"] == "2.11.0" and machine["torchvision"] == "0.26.0"
    assert machine["python"] == "3.12.3"
    for present in ("numpy", "pandas", "pyarrow", "scikit-learn", "tifffile", "tensorstore"):
        assert present in machine
    for absent in ("nvidia-dali-cuda120", "ray", "zarr", "numcodecs", "imbalanced-learn"):
        assert absent not in machine
    assert "pydantic" not in machine and "pydantic-core" not in machine


def test_pins_come_from_requirements():
    pins = kit.read_pins(ROOT / "requirements.txt")
    assert pins["nvidia-dali-cuda120"] == "2.4.0" and pins["ray"] == "2.60.0"
    assert pins["typing-extensions"] and pins["pydantic-core"]


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize(
    ("path", "dropped"),
    [
        ("a/_x.cpython-311-x86_64-linux-gnu.so", True),
        ("a/_x.cpython-313t-x86_64-linux-gnu.so", True),
        ("a/_x.cpython-312t-x86_64-linux-gnu.so", True),
        ("a/_x.cpython-312-x86_64-linux-gnu.so", False),
        ("a/_x.abi3.so", False),
        ("a/libfoo.so.3", False),
    ],
)
def test_prune_keeps_only_cpython_312_extensions(path, dropped):
    assert (kit.pruned("any", path) is not None) is dropped


def test_prune_rules_for_dali_and_ray_only_touch_their_wheels():
    assert kit.pruned("nvidia-dali-cuda120", "nvidia/dali/include/dali/core.h")
    assert kit.pruned("ray", "ray/jars/ray_dist.jar")
    assert kit.pruned("other", "ray/jars/ray_dist.jar") is None
    assert kit.pruned("nvidia-dali-cuda120", "nvidia/dali/libdali_operators.so") is None


def test_part_writer_cuts_at_exact_sizes(tmp_path):
    w = kit.PartWriter(tmp_path, 10)
    data = bytes(range(37))
    for chunk in (data[:3], data[3:25], data[25:30], data[30:]):
        w.write(chunk)
    total = w.close()
    assert [p["bytes"] for p in w.parts] == [10, 10, 10, 7]
    joined = b"".join((tmp_path / p["file"]).read_bytes() for p in w.parts)
    assert joined == data and total["sha256"] == hashlib.sha256(data).hexdigest()
    assert [p["offset"] for p in w.parts] == [0, 10, 20, 30]


def test_parts_reassemble_to_the_manifest_hashes(tmp_path, tiny):
    m = build_kit(tmp_path, tiny)
    out = tmp_path / "kit-src"
    assert len(m["parts"]) >= 3  # the noise wheel spans parts
    assert all(p["bytes"] <= 1500 for p in m["parts"])
    joined = b"".join((out / p["file"]).read_bytes() for p in m["parts"])
    assert hashlib.sha256(joined).hexdigest() == m["payload"]["sha256"]
    assert len(joined) == m["payload"]["bytes"]
    for p in m["parts"]:
        assert kit.sha256_file(out / p["file"]) == p["sha256"]
    # wheels follow each other in group order, without gaps
    offsets = [(e["offset"], e["bytes"]) for e in m["wheels"]]
    assert offsets[0][0] == 0 and all(a + b == c for (a, b), (c, _) in zip(offsets, offsets[1:]))
    assert [e["group"] for e in m["wheels"]] == ["base", "base", "more"]
    alpha = m["wheels"][0]
    assert alpha["pruned"][0]["files"] == 1 and alpha["pruned"][0]["bytes"] == 500
    assert alpha["source_sha256"] == kit.sha256_file(tiny["alpha"])


def receive_all(m: dict, src: Path, dest: Path, indexes=None) -> list[str]:
    lines = []
    for p in m["parts"]:
        if indexes is None or p["index"] in indexes:
            lines += kit.receive(p["index"], src, dest)
    return lines


def test_receive_install_and_import(tmp_path, tiny):
    m = build_kit(tmp_path, tiny)
    src, dest, site = tmp_path / "kit-src", tmp_path / "machine-kit", tmp_path / "site"
    lines = receive_all(m, src, dest)
    n = len(m["parts"])
    assert lines[-1] == f"part {n}/{n} ok; {dest} holds {list(range(1, n + 1))}"
    report = kit.install(dest, site, None)
    assert report["installed_by"] == "pip" and report["parts_verified"] == list(range(1, n + 1))
    assert report["wheels"] == ["alpha==1.0", "beta==2.5", "gamma-tool==0.3"]
    assert report["unmet_requirements"] == []  # numpy comes from this environment
    code = "import alpha, beta, gamma_tool.x as g; print(alpha.VALUE, beta.NAME, g.A)"
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["42", "beta", "1"], out.stderr
    assert (site / "alpha" / "_ext.cpython-312-x86_64-linux-gnu.so").is_file()
    assert not (site / "alpha" / "_ext.cpython-311-x86_64-linux-gnu.so").exists()
    record = next(site.glob("alpha-1.0.dist-info")).joinpath("RECORD").read_text()
    assert "cpython-311" not in record
    assert json.loads((dest / "install.json").read_text())["wheels"] == report["wheels"]


def test_install_of_one_group_needs_only_its_parts(tmp_path, tiny):
    base_bytes = build_kit(tmp_path, tiny, part_bytes=10**6)["groups"]["base"]["bytes"]
    m = build_kit(tmp_path, tiny, part_bytes=base_bytes)  # base fills part 1 exactly
    base_parts = kit.parts_for(m, ["base"])
    assert base_parts == m["groups"]["base"]["parts"] and base_parts[0] == 1
    assert len(base_parts) < len(m["parts"])
    dest, site = tmp_path / "machine-kit", tmp_path / "site"
    receive_all(m, tmp_path / "kit-src", dest, base_parts)
    report = kit.install(dest, site, ["base"])
    assert report["wheels"] == ["alpha==1.0", "beta==2.5"]
    assert not (site / "gamma_tool").exists()
    with pytest.raises(CellmorphError, match=r"part-0\d missing"):
        kit.install(dest, site, None)


def test_a_corrupt_part_is_refused_with_its_name(tmp_path, tiny):
    m = build_kit(tmp_path, tiny)
    src, dest = tmp_path / "kit-src", tmp_path / "machine-kit"
    receive_all(m, src, dest)
    part = dest / m["parts"][1]["file"]
    data = bytearray(part.read_bytes())
    data[5] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(CellmorphError, match=rf"{part.name} corrupt; send those parts again"):
        kit.install(dest, tmp_path / "site", None)


def test_receive_checks_the_part_and_notices_a_restarted_machine(tmp_path, tiny):
    m = build_kit(tmp_path, tiny)
    src, dest = tmp_path / "kit-src", tmp_path / "machine-kit"
    with pytest.raises(CellmorphError, match="the kit has parts 1"):
        kit.receive(99, src, dest)
    (src / "part-02").write_bytes(b"garbage")
    with pytest.raises(CellmorphError, match="SHA-256 differs"):
        kit.receive(2, src, dest)
    lines = kit.receive(3, src, dest)
    assert "MISSING earlier parts [1, 2]" in lines[-1]
    with pytest.raises(CellmorphError, match="not here"):
        kit.receive(3, src, dest)  # it was moved away on the first call
    assert len(m["parts"]) >= 3


def test_rebuild_notices_a_manifest_that_lies(tmp_path, tiny):
    m = build_kit(tmp_path, tiny)
    dest = tmp_path / "machine-kit"
    receive_all(m, tmp_path / "kit-src", dest)
    m["wheels"][1]["wheel_sha256"] = "0" * 64
    with pytest.raises(CellmorphError, match="rebuilt wheel differs"):
        kit.rebuild_wheel(m, dest, m["wheels"][1], tmp_path)


def test_a_rebuild_reuses_the_compressed_wheels(tmp_path, tiny, monkeypatch):
    first = build_kit(tmp_path, tiny)

    def no_compress(*_args, **_kwargs):
        raise AssertionError("compressed again")

    monkeypatch.setattr(kit, "xz_compress", no_compress)
    second = build_kit(tmp_path, tiny)
    assert second["parts"] == first["parts"] and second["wheels"] == first["wheels"]


def test_python_lzma_fallback_round_trips(tmp_path, monkeypatch):
    monkeypatch.setattr(kit.shutil, "which", lambda _name: None)
    src = tmp_path / "a.bin"
    src.write_bytes(b"\x55\x48\x89\xe5" * 5000 + os.urandom(100))
    used = kit.xz_compress(src, tmp_path / "a.xz", "6e")
    assert used.startswith("python lzma")
    import lzma

    assert lzma.decompress((tmp_path / "a.xz").read_bytes()) == src.read_bytes()
    with pytest.raises(CellmorphError, match="--preset"):
        kit.xz_compress(src, tmp_path / "b.xz", "11")


def test_unpack_wheel_matches_pip_layout(tmp_path):
    wheel = make_wheel(
        tmp_path / "w", "delta", "1.0",
        {"delta/__init__.py": b"X = 1\n", "delta-1.0.data/scripts/delta-cli": b"#!python\n",
         "delta-1.0.data/purelib/delta_extra.py": b"Y = 2\n"},
    )  # fmt: skip
    site = tmp_path / "site"
    kit.unpack_wheel(wheel, site)
    assert (site / "delta" / "__init__.py").read_text() == "X = 1\n"
    assert (site / "delta_extra.py").is_file() and (site / "bin" / "delta-cli").is_file()
    assert (site / "delta-1.0.dist-info" / "METADATA").is_file()


def test_a_wheel_pip_refuses_is_unpacked_instead(tmp_path):
    good = make_wheel(tmp_path / "w", "eps", "1.0", {"eps.py": b"E = 5\n"})
    # a tag this interpreter does not support: pip refuses the whole install
    odd = good.with_name("eps-1.0-cp399-cp399-manylinux_2_99_x86_64.whl")
    good.rename(odd)
    site = tmp_path / "site"
    how = kit.install_wheels([odd], site)
    assert how.startswith("unpacked (pip failed: ") and "not a supported wheel" in how
    assert (site / "eps.py").read_text() == "E = 5\n"


@pytest.mark.parametrize(
    ("name", "glibc"),
    [
        ("c-50.0-cp311-abi3-manylinux_2_34_x86_64.whl", (2, 34)),
        ("n-0.16-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
         (2, 17)),
        ("p-0.4-py2.py3-none-manylinux1_x86_64.manylinux_2_5_x86_64.whl", (2, 5)),
        ("z-3.1-py3-none-any.whl", (0, 0)),
    ],
)  # fmt: skip
def test_glibc_needed_reads_the_oldest_accepted_tag(name, glibc):
    assert kit.glibc_needed(name) == glibc


def test_a_cached_download_is_the_one_pip_would_pick(tmp_path):
    for name in ("x-1.0-cp311-abi3-manylinux_2_34_x86_64.whl",
                 "x-1.0-cp311-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
                 "x-0.9-py3-none-any.whl", "y-2.0-py3-none-any.whl"):  # fmt: skip
        (tmp_path / name).write_bytes(b"")
    assert kit._wheel_in(tmp_path, "x", "==1.0").name.startswith("x-1.0-cp311-abi3-manylinux2014")
    assert kit._wheel_in(tmp_path, "x", "<1").name == "x-0.9-py3-none-any.whl"
    assert kit._wheel_in(tmp_path, "x", "==2.0") is None


def test_downloads_prefer_the_oldest_glibc():
    versions = [kit.glibc_needed(f"x-1-py3-none-{p}.whl") for p in kit.PLATFORMS]
    assert versions[:3] == [(2, 5), (2, 12), (2, 17)]
    assert versions[3:] == sorted(versions[3:]) and versions[-1] == (2, 39)


# --------------------------------------------------------------------------- runbook


def test_runbook_calls_fit_the_device_limits(tmp_path, tiny):
    m = build_kit(tmp_path, tiny)
    text = kit.runbook(m, ".gpukit")
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)\n```", text, re.S)]
    full, quick = kit.calls(m, ".gpukit", False), kit.calls(m, ".gpukit", True)
    assert blocks == full + quick
    assert [c["carry"][0] for c in full] == [f".gpukit/{p['file']}" for p in m["parts"]]
    for c in full + quick:
        assert len(c["command"]) <= kit.COMMAND_LIMIT and len(c["carry"]) <= 8
        assert c["carry"][1] == ".gpukit/manifest.json" and c["timeout_s"] <= 600
    assert "--probe" in full[0]["command"] and "--probe" in quick[0]["command"]
    last = full[-1]["command"]
    assert "install --target /tmp/site" in last and "bench/gpu_check.py" in last
    assert "--quick" not in last and "$OUT/gpu_check.json" in last
    assert "--groups base" in quick[-1]["command"] and "--quick" in quick[-1]["command"]
    assert len(quick) == len(m["groups"]["base"]["parts"])


needs_git = pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")


@needs_git
def test_build_refuses_parts_that_leave_no_room_for_the_repo(tmp_path):
    args = kit.parse_args(["build", "--out", str(tmp_path), "--part-mib", "63.9"])
    with pytest.raises(CellmorphError, match="exceeds the 64 MiB"):
        kit.build(args)


@needs_git
def test_real_kit_parts_fit_a_call_with_the_repo():
    """The numbers the runbook relies on: a default part plus the repo's files <= 64 MiB."""
    repo = kit.tracked_bytes(ROOT)
    assert repo > 0
    assert kit.PART_MIB * kit.MIB + repo + 256 * 1024 <= kit.CALL_LIMIT_MIB * kit.MIB


# --------------------------------------------------------------------------- gpu_check


def run_check(tmp_path: Path, *flags: str, timeout: int = 600,
              ray_address: str | None = None) -> tuple[dict, str]:  # fmt: skip
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), *flags, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if ray_address:  # its Ray section joins that cluster, as inside `ray job submit`
        env["RAY_ADDRESS"] = ray_address
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, _failed_sections(proc.stdout) + proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == printed
    return printed, proc.stderr


def _failed_sections(stdout: str) -> str:
    """The sections that did not end "ok", with their output (the report's JSON is long)."""
    try:
        sections = json.loads(stdout)["sections"]
    except (ValueError, KeyError):
        return stdout[-3000:]
    bad = {k: v for k, v in sections.items() if v.get("status") != "ok"}
    return json.dumps(bad, indent=1)[-6000:]


def test_gpu_check_quick_plan_leaves_out_dali_and_ray(tmp_path, monkeypatch):
    """What ``--quick`` changes, without a run: the full ``--cpu-smoke`` run below executes every
    section's code (``--quick`` runs a subset of it), so the quick mode is proved by its plan,
    its sections and the flags its section processes get."""
    check = _load_check()
    args = check.parse_args(["--quick", "--cpu-smoke"])
    plan = check.make_plan(args)
    assert plan.kinds == ["torch"] and plan.device == "cpu" and plan.smoke
    assert check.wanted(plan) == ["env", "store", "loaders", "train", "train_compile", "tests"]
    assert check.child_argv(args)[:2] == ["--quick", "--cpu-smoke"]
    full = check.make_plan(check.parse_args(["--cpu-smoke"]))
    assert full.kinds == ["dali", "torch"] and check.wanted(full)[-1] == "ray"
    ran = []
    monkeypatch.setattr(check.subprocess, "run", lambda cmd, **kw: ran.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0, "", ""))  # fmt: skip
    out = check.section_tests(plan, tmp_path)
    assert ran and "-m gpu" in out["command"] and "-k not dali" in out["command"]
    assert out["files"] and all(f in ran[0] for f in out["files"])


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_gpu_check_full_runs_end_to_end_on_the_cpu(tmp_path, ray_cluster):
    """Every section (DALI and Ray included) as a process, as on the GPU machine (its Ray
    section on the session's cluster: starting another Ray costs tens of seconds here)."""
    r, _ = run_check(tmp_path, "--cpu-smoke", "--budget", "840", timeout=880,
                     ray_address=ray_cluster.address)  # fmt: skip
    assert r["mode"] == "full cpu-smoke"
    assert list(r["sections"]) == ["env", "store", "loaders", "train", "train_compile", "tests",
                                   "ray"]  # fmt: skip
    assert all(s["status"] == "ok" for s in r["sections"].values()), r["sections"]
    assert r["env"]["packages"]["torch"] and r["env"]["cuda_available"] in (True, False)
    assert r["store"]["images"] == 48 and r["store"]["codec"] == "lz4"
    assert r["loaders"]["img_s"]["torch"] > 0 and r["loaders"]["img_s"]["dali"] > 0
    assert r["loaders"]["dali_gpu_inflate"] is False
    for name, compiled in (("train", False), ("train_compile", "eager")):
        t = r[name]
        assert t["compile"] == compiled and t["model_only"]["img_s"] > 0
        assert set(t["end_to_end"]) == {"dali", "torch"} and t["ratio"]["torch"] > 0
        assert t["end_to_end"]["dali"]["img_s"] > 0
    assert r["tests"]["files"] and r["tests"]["failed"] == 0 and r["tests"]["exit_code"] == 0
    assert r["ray"]["epochs"] == 1 and r["ray"]["use_gpu"] is False
    v = r["verdicts"]
    assert v["dali_loader"]["measured"] > 0 and v["train_end_to_end"]["measured"] > 0


def test_gpu_check_without_cuda_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--quick"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: torch sees no CUDA GPU here (use --cpu-smoke on a CPU)"


def _load_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


def test_verdicts_pick_the_best_end_to_end_variant():
    check = _load_check()
    report = {
        "loaders": {"img_s": {"dali": 31000.0, "torch": 9000.0}},
        "train": {"end_to_end": {"torch": {"img_s": 9000.0}, "dali": {"img_s": 12000.0}},
                  "ratio": {"torch": 0.6, "dali": 0.8}},
        "train_compile": {"end_to_end": {"dali": {"img_s": 16000.0}}, "ratio": {"dali": 0.92}},
    }  # fmt: skip
    v = check.verdicts(report)
    assert v["dali_loader"] == {"measured": 31000.0, "goal": 30000, "met": True}
    assert v["train_end_to_end"]["variant"] == "train_compile/dali"
    assert v["train_end_to_end"]["met"] is True and v["end_to_end_ratio"]["measured"] == 0.92
    empty = check.verdicts({"loaders": None, "train": None})
    assert empty["dali_loader"]["met"] is None and empty["train_end_to_end"]["measured"] is None


def test_a_failed_section_keeps_what_it_measured(tmp_path):
    check = _load_check()
    (tmp_path / "loaders.partial.json").write_text(json.dumps({"img_s": {"torch": 5.0}}))
    # no store in tmp_path: the section fails after the "measurement" above was saved
    got = check.run_child("loaders", ["--cpu-smoke"], tmp_path, 120)
    assert got["meta"]["status"] == "error" and "store.zarr" in got["meta"]["output_tail"]
    assert got["result"] == {"img_s": {"torch": 5.0}, "partial": True}
    slow = check.run_child("env", ["--cpu-smoke"], tmp_path, 0.2)
    assert slow["meta"]["status"] == "timeout" and slow["result"] is None
