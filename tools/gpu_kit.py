"""The GPU check kit: what the lent GPU machine lacks, cut into parts that fit one device call each.

The lent machine has torch but not DALI, Ray, zarr, numcodecs, pydantic or imbalanced-learn
(its package list: ``tools/gpu_machine.txt``), nothing can be downloaded there, and one device
call carries at most 64 MiB. Here, ``build`` (``make gpu-kit``) resolves the missing wheels for
CPython 3.12 against that list, drops the files no import there can use (``PRUNE``), stores each
wheel uncompressed and compresses it with xz (a far better ratio than the wheels' own deflate),
cuts the stream into numbered parts and writes a SHA-256 manifest and a runbook of device calls.
There, ``receive N`` checks part N and files it under /tmp/kit, and ``install`` verifies every
hash, rebuilds the wheels and installs them into a target folder.

    python tools/gpu_kit.py build                         # here: .gpukit/part-NN, manifest.json, RUNBOOK.md
    python3 tools/gpu_kit.py receive 3                    # there: one call per part
    python3 tools/gpu_kit.py install --target /tmp/site   # there: verify, rebuild, pip install

The machine side needs only the standard library and pip.
"""

from __future__ import annotations

import argparse
import csv
import email.parser
import hashlib
import io
import json
import lzma
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: cellmorph.errors is stdlib-only
    sys.path.insert(0, str(ROOT))

from cellmorph.errors import CellmorphError  # noqa: E402

MIB = 2**20
KIT_DIR = ".gpukit"  # in the repo root (ignored); parts travel from here with `carry`
MACHINE_KIT = "/tmp/kit"  # where `receive` files the parts on the machine
MACHINE_SITE = "/tmp/site"  # where `install` puts the packages (PYTHONPATH)
PART_MIB = 48  # with the repo (its real test site, ~14 MB) under CALL_LIMIT_MIB
CALL_LIMIT_MIB = 64  # what one device call may carry, the repo's own files included
COMMAND_LIMIT = 2000  # characters in one device call's command
PY = (3, 12)
FORMAT = 1

# Marker environment of the machine's interpreter (CPython 3.12.3 on x86-64 Linux).
TARGET_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "platform_python_implementation": "CPython",
    "platform_system": "Linux",
    "sys_platform": "linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "platform_release": "",
    "platform_version": "",
}
# pip matches manylinux_2_N tags exactly and prefers the ones listed first: the oldest glibc
# first, so that a wheel runs on the oldest machine possible (the machine's Python 3.12.3 is
# Ubuntu 24.04's, glibc 2.39; nobody has read its glibc yet).
PLATFORMS = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"] + [
    f"manylinux_2_{n}_x86_64" for n in range(5, 40)
]


@dataclass(frozen=True)
class Group:
    """Wheels installed together; the groups go into the stream in this order."""

    name: str
    roots: tuple[str, ...]  # requirements without versions: versions come from requirements.txt
    purpose: str


GROUPS = (
    Group(
        "base",
        ("zarr", "numcodecs", "pydantic", "imbalanced-learn", "typing-extensions"),
        "cellmorph itself (config, store, index): enough for gpu_check --quick",
    ),
    Group("ray", ("ray[default,train]",), "Ray Train: the 1-worker GPU run"),
    Group("dali", ("nvidia-dali-cuda120",), "the DALI loader (GPU LZ4 inflate and augmentation)"),
)
# Shipped although the machine has a version: the one there may be too old for a pin here.
OVERRIDES = {
    "typing-extensions": "pydantic 2.14 needs typing-extensions>=4.16; the machine's version is "
    "not known, and a newer one only adds names",
}


@dataclass(frozen=True)
class Prune:
    """Files left out of a project's wheel: nothing on the machine can load them."""

    project: str  # canonical project name; "*" for every wheel
    pattern: str  # regex searched in the path inside the wheel
    why: str


PRUNE = (
    Prune(
        "*",
        r"\.cpython-(?!312-)3\d+t?-[^/]*\.so$",
        "extension modules built for other Python versions (the machine runs CPython 3.12)",
    ),
    Prune(
        "nvidia-dali-cuda120",
        r"^nvidia/dali/include/",
        "C++ headers for building DALI plugins; nothing reads them at run time",
    ),
    Prune(
        "ray",
        r"^ray/jars/",
        "the Java worker's jar; only Java and cross-language workers load it",
    ),
)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- inputs


def read_pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a requirements file, by canonical name."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name.split("[", 1)[0])] = version.strip()
    return pins


def read_machine(path: Path) -> dict[str, str | None]:
    """The machine's packages: canonical name -> version where known (``name==version``)."""
    out: dict[str, str | None] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name.strip()):
            raise CellmorphError(f"{path}:{n}: not a package name: {line!r}")
        out[canonical(name.strip())] = version.strip() or None
    return out


def wheel_metadata(wheel: Path) -> tuple[str, str, list[str]]:
    """(canonical name, version, Requires-Dist lines) of a wheel's own dist-info."""
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        if len(names) != 1:
            raise CellmorphError(f"{wheel.name}: expected one top-level METADATA, found {names}")
        msg = email.parser.HeaderParser().parsestr(z.read(names[0]).decode("utf-8"))
    return canonical(msg["Name"]), msg["Version"], msg.get_all("Requires-Dist") or []


# --------------------------------------------------------------------------- resolution

Fetch = Callable[[str, str], Path]  # (canonical name, specifier such as "==1.2") -> wheel file


@dataclass
class Resolved:
    name: str
    version: str
    wheel: Path
    group: str
    required_by: list[str] = field(default_factory=list)
    extras: set[str] = field(default_factory=set)


@dataclass
class Resolution:
    groups: list[Group]
    wheels: list[Resolved]
    from_machine: dict[str, list[str]]  # machine package -> the requirements it satisfies


def _applies(req: Any, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**TARGET_ENV, "extra": e}) for e in {"", *extras})


def resolve(
    groups: list[Group] | tuple[Group, ...],
    pins: dict[str, str],
    machine: dict[str, str | None],
    fetch: Fetch,
) -> Resolution:
    """Every wheel the groups need that the machine lacks, with the versions pinned here.

    A requirement on a package the machine has is counted as met there (and recorded), except
    for ``OVERRIDES``. A dependency joins the group of the first package that needs it.
    """
    from packaging.requirements import Requirement

    done: dict[str, Resolved] = {}
    from_machine: dict[str, list[str]] = {}
    queue: list[tuple[str, Any, str]] = [
        (g.name, Requirement(r), "kit") for g in groups for r in g.roots
    ]
    while queue:
        group, req, by = queue.pop(0)
        name = canonical(req.name)
        if name in machine and name not in OVERRIDES:
            from_machine.setdefault(name, []).append(f"{req} ({by})")
            continue
        before: set[str] | None = None  # extras already expanded; None: new package
        if name in done:
            item = done[name]
            if not req.specifier.contains(item.version, prereleases=True):
                raise CellmorphError(f"{by} needs {req}, but {name} {item.version} is chosen")
            if by not in item.required_by:
                item.required_by.append(by)
            if set(req.extras) <= item.extras:
                continue
            before = set(item.extras)
        else:
            item = done[name] = _fetch_one(name, req, pins, fetch, group, by)
        item.extras |= set(req.extras)
        for dep in wheel_metadata(item.wheel)[2]:
            dreq = Requirement(dep)
            if _applies(dreq, item.extras) and not (before is not None and _applies(dreq, before)):
                queue.append((item.group, dreq, f"{name}=={item.version}"))
    order = {g.name: i for i, g in enumerate(groups)}
    wheels = sorted(done.values(), key=lambda r: (order[r.group], r.name))
    return Resolution(list(groups), wheels, from_machine)


def _fetch_one(name: str, req: Any, pins: dict[str, str], fetch: Fetch, group: str, by: str):
    pin = pins.get(name)
    if pin is not None and not req.specifier.contains(pin, prereleases=True):
        raise CellmorphError(f"{by} needs {req}; requirements.txt pins {name}=={pin}")
    wheel = fetch(name, f"=={pin}" if pin else str(req.specifier))
    got, version, _ = wheel_metadata(wheel)
    if got != name or not req.specifier.contains(version, prereleases=True):
        raise CellmorphError(f"{wheel.name}: is {got} {version}, wanted {req}")
    return Resolved(name, version, wheel, group, [by])


def _wheel_in(folder: Path, name: str, spec: str) -> Path | None:
    """The newest wheel of ``name`` in ``folder`` whose version meets ``spec`` (of one
    version, the one that accepts the oldest glibc, as pip with ``PLATFORMS`` picks)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    best: tuple[Any, Any, Path] | None = None
    for p in folder.glob("*.whl"):
        dist, version = p.name.split("-")[:2]
        if canonical(dist) == name and SpecifierSet(spec).contains(version, prereleases=True):
            key = (Version(version), tuple(-x for x in glibc_needed(p.name)))
            if best is None or key > best[:2]:
                best = (*key, p)
    return best[2] if best else None


def pip_download(dest: Path) -> Fetch:
    """A fetcher that downloads cp312 manylinux x86-64 wheels with pip (here, not in tests).

    An exact pin already in ``dest`` is reused; anything else asks pip, which picks the newest
    matching version and skips files it has.
    """
    dest.mkdir(parents=True, exist_ok=True)

    def fetch(name: str, spec: str) -> Path:
        if spec.startswith("==") and (hit := _wheel_in(dest, name, spec)):
            return hit
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--python-version", "3.12", "--implementation", "cp", "--dest", str(dest)]
        for p in PLATFORMS:
            cmd += ["--platform", p]
        proc = subprocess.run([*cmd, f"{name}{spec}"], capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise CellmorphError(f"pip download {name}{spec} failed: {last}")
        saved = re.findall(r"(?:Saved|File was already downloaded) (\S+\.whl)", proc.stdout)
        hit = Path(saved[-1]) if saved else _wheel_in(dest, name, spec)
        if hit is None:
            raise CellmorphError(f"pip download {name}{spec}: no wheel in {dest}")
        return dest / hit.name

    return fetch


# --------------------------------------------------------------------------- packing


def pruned(project: str, path: str) -> Prune | None:
    for rule in PRUNE:
        if rule.project in ("*", project) and re.search(rule.pattern, path):
            return rule
    return None


def repack(src: Path, dst: Path, project: str) -> list[tuple[str, int, str]]:
    """Copy a wheel without its pruned files, stored uncompressed; returns (path, bytes, why).

    The RECORD loses the pruned files' lines, so the wheel stays consistent.
    """
    dropped: list[tuple[str, int, str]] = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        record = next(
            (i for i in zin.infolist() if re.fullmatch(r"[^/]+\.dist-info/RECORD", i.filename)),
            None,
        )
        for info in zin.infolist():
            rule = pruned(project, info.filename)
            if rule is not None:
                dropped.append((info.filename, info.file_size, rule.why))
                continue
            if info is record:
                continue
            out = zipfile.ZipInfo(info.filename, info.date_time)
            out.external_attr, out.create_system = info.external_attr, info.create_system
            with zin.open(info) as r, zout.open(out, "w", force_zip64=True) as w:
                shutil.copyfileobj(r, w, 4 * MIB)
        if record is not None:
            gone = {d[0] for d in dropped}
            rows = csv.reader(io.StringIO(zin.read(record).decode("utf-8")))
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(
                r for r in rows if r and r[0] not in gone
            )
            out = zipfile.ZipInfo(record.filename, record.date_time)
            out.external_attr = record.external_attr
            zout.writestr(out, buf.getvalue())
    return dropped


def _lzma_filters(preset: str) -> list[dict[str, Any]]:
    level = int(preset.rstrip("e")) | (lzma.PRESET_EXTREME if preset.endswith("e") else 0)
    return [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": level}]


def xz_compress(src: Path, dst: Path, preset: str = "9e") -> str:
    """Compress ``src`` to an .xz file (x86 BCJ + LZMA2); returns the command used.

    The x86 filter makes machine code (most of DALI) compress a few percent better. The xz
    program runs on every core; Python's lzma, the fallback, on one.
    """
    if not re.fullmatch(r"[0-9]e?", preset):
        raise CellmorphError(f"--preset: {preset!r} is not 0-9 with an optional 'e'")
    xz = shutil.which("xz")
    with open(dst, "wb") as out:
        if xz:
            cmd = [xz, "--x86", f"--lzma2=preset={preset}", "-T0", "-c", str(src)]
            subprocess.run(cmd, stdout=out, check=True)
            return f"xz --x86 --lzma2=preset={preset} -T0"
        comp = lzma.LZMACompressor(format=lzma.FORMAT_XZ, filters=_lzma_filters(preset))
        with open(src, "rb") as f:
            while chunk := f.read(4 * MIB):
                out.write(comp.compress(chunk))
        out.write(comp.flush())
    return f"python lzma x86+lzma2 preset {preset}"


class PartWriter:
    """Writes one byte stream into ``part-01``, ``part-02``, ... of at most ``size`` bytes."""

    def __init__(self, folder: Path, size: int):
        self.folder, self.size = folder, size
        self.parts: list[dict[str, Any]] = []
        self.offset = 0
        self._f: Any = None
        self._h: Any = None
        self._total = hashlib.sha256()

    def _open(self) -> None:
        name = f"part-{len(self.parts) + 1:02d}"
        self.parts.append({"index": len(self.parts) + 1, "file": name, "offset": self.offset})
        # Closed by _finish, when the part is full or the stream ends.
        self._f, self._h = open(self.folder / name, "wb"), hashlib.sha256()  # noqa: SIM115

    def _finish(self) -> None:
        if self._f is not None:
            self._f.close()
            part = self.parts[-1]
            part["bytes"] = self.offset - part["offset"]
            part["sha256"] = self._h.hexdigest()
            self._f = None

    def write(self, data: bytes) -> None:
        self._total.update(data)
        view = memoryview(data)
        while view:
            if self._f is None:
                self._open()
            room = self.parts[-1]["offset"] + self.size - self.offset
            chunk = view[:room]
            self._f.write(chunk)
            self._h.update(chunk)
            self.offset += len(chunk)
            view = view[len(chunk) :]
            if self.offset - self.parts[-1]["offset"] == self.size:
                self._finish()

    def close(self) -> dict[str, Any]:
        self._finish()
        return {"bytes": self.offset, "sha256": self._total.hexdigest()}


# --------------------------------------------------------------------------- build


def pack(
    res: Resolution, out: Path, part_bytes: int, preset: str, log: Callable[[str], None]
) -> dict[str, Any]:
    """Repack, compress and split the resolved wheels into ``out``; returns the manifest.

    Compressed wheels are kept in ``out/cache`` (keyed by the source wheel, the preset and the
    prune rules), so a rebuild after a change elsewhere does not compress DALI again.
    """
    for old in out.glob("part-*"):
        old.unlink()
    writer = PartWriter(out, part_bytes)
    entries, compressions = [], set()
    for r in res.wheels:
        t0 = time.perf_counter()
        member, info = compressed_member(r, out / "cache", preset)
        compressions.add(info["compression"])
        offset = writer.offset
        with open(member, "rb") as f:
            while chunk := f.read(4 * MIB):
                writer.write(chunk)
        entry = {
            "file": r.wheel.name,
            "project": r.name,
            "version": r.version,
            "group": r.group,
            "required_by": r.required_by,
            "offset": offset,
            "bytes": member.stat().st_size,
            "sha256": info["sha256"],
            "wheel_bytes": info["wheel_bytes"],
            "wheel_sha256": info["wheel_sha256"],
            "source_bytes": r.wheel.stat().st_size,
            "source_sha256": info["source_sha256"],
            "pruned": info["pruned"],
        }
        entries.append(entry)
        log(
            f"{r.wheel.name}: {entry['source_bytes'] / MIB:.1f} MiB -> {entry['bytes'] / MIB:.1f}"
            f" MiB ({time.perf_counter() - t0:.0f} s)"
        )
    payload = writer.close()
    compression = " + ".join(sorted(compressions))
    return _manifest(res, entries, writer.parts, payload, part_bytes, compression)


def compressed_member(r: Resolved, cache: Path, preset: str) -> tuple[Path, dict[str, Any]]:
    """The pruned, stored, xz-compressed wheel of ``r`` and what it holds (cached)."""
    source_sha = sha256_file(r.wheel)
    rules = json.dumps([[p.project, p.pattern] for p in PRUNE]).encode()
    key = hashlib.sha256(f"{FORMAT}:{source_sha}:{preset}:".encode() + rules).hexdigest()[:24]
    member, sidecar = cache / f"{key}.xz", cache / f"{key}.json"
    if member.is_file() and sidecar.is_file():
        info = json.loads(sidecar.read_text())
        if info.get("sha256") == sha256_file(member):
            return member, info
    cache.mkdir(parents=True, exist_ok=True)
    stored = cache / f"{key}.whl"
    dropped = repack(r.wheel, stored, r.name)
    info = {
        "compression": xz_compress(stored, member, preset),
        "wheel_bytes": stored.stat().st_size,
        "wheel_sha256": sha256_file(stored),
        "source_sha256": source_sha,
        "pruned": _summarize_pruned(dropped),
        "sha256": sha256_file(member),
    }
    stored.unlink()
    sidecar.write_text(json.dumps(info) + "\n")
    return member, info


def glibc_needed(wheel_name: str) -> tuple[int, int]:
    """The oldest glibc a wheel's platform tags accept ((0, 0) for pure wheels)."""
    aliases = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
    tags = wheel_name.removesuffix(".whl").split("-")[-1].split(".")
    found = []
    for tag in tags:
        m = re.fullmatch(r"manylinux_(\d+)_(\d+)_\w+", tag)
        if m:
            found.append((int(m.group(1)), int(m.group(2))))
        elif tag.rsplit("_", 2)[0] in aliases:
            found.append(aliases[tag.split("_", 1)[0]])
    return min(found) if found else (0, 0)


def _summarize_pruned(dropped: list[tuple[str, int, str]]) -> list[dict[str, Any]]:
    by_why: dict[str, dict[str, Any]] = {}
    for path, size, why in dropped:
        d = by_why.setdefault(why, {"why": why, "files": 0, "bytes": 0, "examples": []})
        d["files"] += 1
        d["bytes"] += size
        if len(d["examples"]) < 3:
            d["examples"].append(path)
    return list(by_why.values())


def _manifest(res, entries, parts, payload, part_bytes, compression) -> dict[str, Any]:
    manifest = {
        "kit_format": FORMAT,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": f"{PY[0]}.{PY[1]}",
        "compression": compression,
        "part_bytes": part_bytes,
        "payload": payload,
        "parts": parts,
        "wheels": entries,
        "groups": {},
        "needs_glibc": ".".join(map(str, max(glibc_needed(e["file"]) for e in entries))),
        "from_machine": res.from_machine,
        "overrides": OVERRIDES,
        "prune_rules": [{"project": p.project, "pattern": p.pattern, "why": p.why} for p in PRUNE],
    }
    for g in res.groups:
        sel = [e for e in entries if e["group"] == g.name]
        manifest["groups"][g.name] = {
            "purpose": g.purpose,
            "wheels": [e["file"] for e in sel],
            "bytes": sum(e["bytes"] for e in sel),
            "parts": parts_for(manifest, [g.name]),
        }
    return manifest


def parts_for(manifest: dict[str, Any], groups: Iterable[str]) -> list[int]:
    """Indexes of the parts that hold the given groups' wheels."""
    want = set(groups)
    spans = [
        (e["offset"], e["offset"] + e["bytes"]) for e in manifest["wheels"] if e["group"] in want
    ]
    return [
        p["index"]
        for p in manifest["parts"]
        if any(a < p["offset"] + p["bytes"] and b > p["offset"] for a, b in spans)
    ]


def tracked_bytes(repo: Path) -> int:
    """Bytes of what every device call sends anyway: tracked and untracked-not-ignored files."""
    cmd = ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    names = subprocess.run(cmd, capture_output=True, check=True).stdout.split(b"\0")
    total = 0
    for n in names:
        p = repo / os.fsdecode(n)
        if n and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def build(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    part_bytes = int(args.part_mib * MIB)
    base = tracked_bytes(ROOT)
    manifest_room = 256 * 1024
    if part_bytes + base + manifest_room > CALL_LIMIT_MIB * MIB:
        raise CellmorphError(
            f"--part-mib {args.part_mib}: a part plus the repo's {base / MIB:.1f} MiB of files "
            f"exceeds the {CALL_LIMIT_MIB} MiB a device call carries"
        )
    pins = read_pins(Path(args.requirements))
    machine = read_machine(Path(args.machine))
    res = resolve(GROUPS, pins, machine, pip_download(Path(args.downloads)))
    print(f"resolved {len(res.wheels)} wheels the machine lacks", flush=True)
    manifest = pack(res, out, part_bytes, args.preset, lambda m: print(m, flush=True))
    manifest["repo_bytes"] = base
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (out / "RUNBOOK.md").write_text(runbook(manifest, out.name))
    return manifest


# --------------------------------------------------------------------------- runbook


def calls(manifest: dict[str, Any], kit: str, quick: bool) -> list[dict[str, Any]]:
    """The device calls, in order: one per part, the last one also installs and checks."""
    groups = ["base"] if quick else list(manifest["groups"])
    parts = parts_for(manifest, groups)
    tool = "python3 tools/gpu_kit.py"
    install = f"{tool} install --target {MACHINE_SITE}"
    install += " --groups base" if quick else ""
    check = (
        f"PYTHONPATH={MACHINE_SITE}:$PWD PYTHONUNBUFFERED=1 python3 bench/gpu_check.py"
        f"{' --quick' if quick else ''} --kit-report {MACHINE_KIT}/install.json"
        " --out $OUT/gpu_check.json"
    )
    out = []
    for n, idx in enumerate(parts):
        cmd = f"{tool} receive {idx}" + (" --probe" if n == 0 else "")
        last = n == len(parts) - 1
        if last:
            cmd = (
                f"set -o pipefail; {cmd} && {install} 2>&1 | tee $OUT/kit_install.log"
                f" && {check} 2>&1 | tee $OUT/gpu_check.log"
            )
        out.append(
            {
                "command": cmd,
                "carry": [f"{kit}/part-{idx:02d}", f"{kit}/manifest.json"],
                "timeout_s": 600 if last else 120,
            }
        )
    return out


def runbook(manifest: dict[str, Any], kit: str = KIT_DIR) -> str:
    """Markdown with every device call spelled out, ready to paste one after another."""
    full, quick = calls(manifest, kit, False), calls(manifest, kit, True)
    for c in full + quick:
        if len(c["command"]) > COMMAND_LIMIT:
            raise CellmorphError(f"runbook: a command is {len(c['command'])} characters")
    parts = manifest["parts"]
    biggest = max(p["bytes"] for p in parts) if parts else 0
    lines = [
        "# GPU check runbook (generated by `make gpu-kit`)",
        "",
        f"Kit of {manifest['created_utc']}: {len(parts)} parts, "
        f"{manifest['payload']['bytes'] / MIB:.1f} MiB in all, the largest "
        f"{biggest / MIB:.1f} MiB; the repo's own files add {manifest['repo_bytes'] / MIB:.1f} "
        f"MiB to every call (limit {CALL_LIMIT_MIB} MiB). Its wheels need glibc >= "
        f"{manifest['needs_glibc']} (call 1 prints the machine's).",
        "",
        "Before: `status` (free). Plan A needs about 10 minutes of device time (a start of 1-2 "
        "minutes, the part calls, about 1 minute to install, at most 6 for the check), plan B "
        "about 8: below 660 s of `budget_left_s`, use plan B.",
        "",
        "Rules: make the calls back to back, each right after the previous answer — the machine "
        "keeps /tmp/kit only while it is warm (30 s after a call). Each `receive` prints which "
        "parts /tmp/kit holds; if one says parts are missing, the machine was restarted: start "
        "again at call 1 if plan A still fits the budget, else switch to plan B.",
        "",
        "Per-group parts: "
        + ", ".join(f"{g} {v['parts']}" for g, v in manifest["groups"].items())
        + ".",
        "",
        f"## Plan A: the whole check ({len(full)} calls)",
        "",
    ]
    lines += _render(full)
    lines += [
        f"## Plan B: --quick, without DALI and Ray ({len(quick)} call(s))",
        "",
        "For when the parts cannot all be sent (little device time left, or the machine went "
        "cold halfway).",
        "",
    ]
    lines += _render(quick)
    lines += [
        "## Afterwards",
        "",
        "`$OUT/gpu_check.json` comes back (files_at). Put it, the card's name and the date into "
        "docs/benchmarks.md (section 'GPU figures'), then call `give_back`.",
        "",
    ]
    return "\n".join(lines)


def _render(calls_: list[dict[str, Any]]) -> list[str]:
    lines = []
    for i, c in enumerate(calls_, 1):
        lines += [f"Call {i} of {len(calls_)}:", "", "```json", json.dumps(c), "```", ""]
    return lines


# --------------------------------------------------------------------------- machine side


def load_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CellmorphError(f"{path}: no kit manifest (carry .gpukit/manifest.json)") from None
    if manifest.get("kit_format") != FORMAT:
        raise CellmorphError(f"{path}: kit format {manifest.get('kit_format')}, need {FORMAT}")
    return manifest


def probe() -> list[str]:
    """One line each about what the machine offers the kit (the first call prints these)."""
    smi = shutil.which("nvidia-smi")
    gpu = "no nvidia-smi"
    if smi:
        q = [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        gpu = subprocess.run(q, capture_output=True, text=True).stdout.strip() or "no GPU listed"
    pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True)
    free = shutil.disk_usage("/tmp").free / 2**30
    return [
        f"gpu: {gpu}",
        f"python: {sys.version.split()[0]} at {sys.executable}; {' '.join(platform.libc_ver())}",
        f"pip: {pip.stdout.split(' from ')[0].strip() or 'missing (install unpacks wheels itself)'}",
        f"/tmp free: {free:.0f} GiB; cpus: {os.cpu_count()}",
    ]


def receive(index: int, src: Path, kit: Path) -> list[str]:
    """Check part ``index`` (carried in ``src``) and file it in ``kit``; say what ``kit`` holds."""
    manifest = load_manifest(src / "manifest.json")
    parts = {p["index"]: p for p in manifest["parts"]}
    if index not in parts:
        raise CellmorphError(f"part {index}: the kit has parts 1..{len(parts)}")
    part = parts[index]
    carried = src / part["file"]
    if not carried.is_file():
        raise CellmorphError(f"{carried}: not here (carry {KIT_DIR}/{part['file']} in this call)")
    if sha256_file(carried) != part["sha256"]:
        raise CellmorphError(f"{carried}: SHA-256 differs from the manifest; send it again")
    kit.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "manifest.json", kit / "manifest.json")
    shutil.move(str(carried), kit / part["file"])
    have = sorted(i for i, p in parts.items() if (kit / p["file"]).is_file())
    missing = sorted(set(parts) - set(have))
    msg = [f"part {index}/{len(parts)} ok; {kit} holds {have or 'nothing'}"]
    if [i for i in missing if i < index]:
        msg.append(f"MISSING earlier parts {[i for i in missing if i < index]}: machine restarted?")
    return msg


def check_parts(manifest: dict[str, Any], kit: Path, indexes: list[int]) -> None:
    """Every listed part is in ``kit`` with the manifest's size and SHA-256, or one error."""
    bad = []
    for p in manifest["parts"]:
        if p["index"] not in indexes:
            continue
        path = kit / p["file"]
        if not path.is_file():
            bad.append(f"{p['file']} missing")
        elif path.stat().st_size != p["bytes"] or sha256_file(path) != p["sha256"]:
            bad.append(f"{p['file']} corrupt")
    if bad:
        raise CellmorphError(f"{kit}: {', '.join(bad)}; send those parts again (receive N)")


def read_range(manifest: dict[str, Any], kit: Path, offset: int, size: int) -> Iterator[bytes]:
    """Bytes ``offset .. offset+size`` of the stream, read across part files."""
    end = offset + size
    for p in manifest["parts"]:
        a, b = max(offset, p["offset"]), min(end, p["offset"] + p["bytes"])
        if a >= b:
            continue
        with open(kit / p["file"], "rb") as f:
            f.seek(a - p["offset"])
            left = b - a
            while left:
                chunk = f.read(min(left, 4 * MIB))
                if not chunk:
                    raise CellmorphError(f"{kit / p['file']}: shorter than the manifest says")
                left -= len(chunk)
                yield chunk


def rebuild_wheel(manifest: dict[str, Any], kit: Path, entry: dict[str, Any], dest: Path) -> Path:
    """Decompress one wheel from the parts, checking both its SHA-256 sums."""
    packed, plain = hashlib.sha256(), hashlib.sha256()
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    path = dest / entry["file"]
    with open(path, "wb") as out:
        for chunk in read_range(manifest, kit, entry["offset"], entry["bytes"]):
            packed.update(chunk)
            data = dec.decompress(chunk)
            plain.update(data)
            out.write(data)
    if packed.hexdigest() != entry["sha256"] or not dec.eof:
        raise CellmorphError(f"{entry['file']}: compressed bytes differ from the manifest")
    if plain.hexdigest() != entry["wheel_sha256"]:
        raise CellmorphError(f"{entry['file']}: rebuilt wheel differs from the manifest")
    return path


def unpack_wheel(wheel: Path, target: Path) -> None:
    """Install a wheel by unpacking it (what pip does for these wheels), for a machine without pip."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            name = info.filename
            m = re.match(r"[^/]+\.data/(purelib|platlib|scripts)/(.*)", name)
            if m:
                name = m.group(2) if m.group(1) != "scripts" else f"bin/{m.group(2)}"
            elif re.match(r"[^/]+\.data/", name):
                continue  # headers and data files: nothing here imports them
            dest = target / name
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as r, open(dest, "wb") as w:
                shutil.copyfileobj(r, w, 4 * MIB)
            if info.external_attr >> 16 & 0o111:
                dest.chmod(0o755)


def install_wheels(wheels: list[Path], target: Path) -> str:
    """pip install --no-index --no-deps into ``target`` (unpacking when pip is missing)."""
    pip = [sys.executable, "-m", "pip"]
    if subprocess.run([*pip, "--version"], capture_output=True).returncode != 0:
        why = "no pip"
    else:
        cmd = [*pip, "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
        cmd += ["--disable-pip-version-check", "--upgrade", "--target", str(target)]
        proc = subprocess.run([*cmd, *map(str, wheels)], capture_output=True, text=True)
        if proc.returncode == 0:
            return "pip"
        # e.g. a wheel's manylinux tag newer than the machine's glibc: pip refuses them all,
        # while unpacked only that package would fail, at its import
        why = "pip failed: " + " | ".join(proc.stderr.strip().splitlines()[-2:])
    for w in wheels:
        unpack_wheel(w, target)
    return f"unpacked ({why})"


def unmet_requirements(target: Path, names: Iterable[str]) -> list[str]:
    """Requirements of the installed wheels that the machine plus ``target`` do not meet."""
    import importlib.metadata as md

    try:
        from packaging.requirements import Requirement
    except ImportError:
        return ["packaging missing: requirements not checked"]
    have: dict[str, str] = {}
    for d in md.distributions(path=[str(target), *sys.path]):
        have.setdefault(canonical(d.metadata["Name"]), d.version)  # the first one is imported
    problems = []
    for name in names:
        dist = next(md.distributions(name=name, path=[str(target)]), None)
        if dist is None:
            problems.append(f"{name}: not installed in {target}")
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            if not _applies(req, set()):
                continue
            v = have.get(canonical(req.name))
            if v is None or not req.specifier.contains(v, prereleases=True):
                problems.append(f"{name} needs {req}; found {v or 'nothing'}")
    return problems


def install(kit: Path, target: Path, groups: list[str] | None) -> dict[str, Any]:
    """Verify the parts, rebuild the wheels of ``groups`` (default: all) and install them."""
    t0 = time.perf_counter()
    manifest = load_manifest(kit / "manifest.json")
    groups = groups or list(manifest["groups"])
    unknown = sorted(set(groups) - set(manifest["groups"]))
    if unknown:
        raise CellmorphError(f"--groups: unknown {unknown}; the kit has {list(manifest['groups'])}")
    needed = parts_for(manifest, groups)
    check_parts(manifest, kit, needed)
    wheel_dir = kit / "wheels"
    wheel_dir.mkdir(exist_ok=True)
    entries = [e for e in manifest["wheels"] if e["group"] in groups]
    wheels = [rebuild_wheel(manifest, kit, e, wheel_dir) for e in entries]
    t_rebuild = time.perf_counter() - t0
    target.mkdir(parents=True, exist_ok=True)
    how = install_wheels(wheels, target)
    for w in wheels:
        w.unlink()
    report = {
        "kit_created_utc": manifest["created_utc"],
        "groups": groups,
        "parts_verified": needed,
        "wheels": [f"{e['project']}=={e['version']}" for e in entries],
        "target": str(target),
        "installed_by": how,
        "rebuild_s": round(t_rebuild, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "unmet_requirements": unmet_requirements(target, [e["project"] for e in entries]),
    }
    (kit / "install.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="here: download, pack, split; write manifest and runbook")
    b.add_argument("--out", default=str(ROOT / KIT_DIR))
    b.add_argument("--downloads", default=str(ROOT / KIT_DIR / "downloads"))
    b.add_argument("--part-mib", type=float, default=PART_MIB)
    b.add_argument("--preset", default="9e", help="xz preset (0-9, 'e' = extreme)")
    b.add_argument("--requirements", default=str(ROOT / "requirements.txt"))
    b.add_argument("--machine", default=str(ROOT / "tools" / "gpu_machine.txt"))
    r = sub.add_parser("receive", help="there: check part N and file it under --kit")
    r.add_argument("index", type=int)
    r.add_argument("--src", default=str(ROOT / KIT_DIR))
    r.add_argument("--kit", default=MACHINE_KIT)
    r.add_argument("--probe", action="store_true", help="also print GPU, Python, pip, disk")
    i = sub.add_parser("install", help="there: verify all hashes, rebuild wheels, install")
    i.add_argument("--kit", default=MACHINE_KIT)
    i.add_argument("--target", default=MACHINE_SITE)
    i.add_argument("--groups", default=None, help="comma list (default: every group)")
    rb = sub.add_parser("runbook", help="print the runbook of an existing manifest")
    rb.add_argument("--manifest", default=str(ROOT / KIT_DIR / "manifest.json"))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.cmd == "build":
            m = build(args)
            print(f"{len(m['parts'])} parts, {m['payload']['bytes'] / MIB:.1f} MiB: {args.out}")
        elif args.cmd == "receive":
            lines = probe() if args.probe else []
            print("\n".join(lines + receive(args.index, Path(args.src), Path(args.kit))))
        elif args.cmd == "install":
            groups = args.groups.split(",") if args.groups else None
            print(json.dumps(install(Path(args.kit), Path(args.target), groups)))
        else:
            print(runbook(load_manifest(Path(args.manifest))))
    except CellmorphError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
