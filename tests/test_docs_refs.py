"""Every file or module the code's docstrings and comments name exists, so they cannot rot
when a module moves (``store.py`` became the ``store/`` package; docs live in ``docs/``)."""

from __future__ import annotations

import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cellmorph", "conversion", "ray_jobs", "bench", "tools")
# A path from the repository root: docs/x.md, cellmorph/a/b.py, conversion/x.py, ...
PATH = re.compile(r"(?<![\w./-])((?:docs|cellmorph|conversion|ray_jobs|bench|tools)/[\w./-]*\w)")
# A path inside the module's own package: ``loaders/normalize.py`` from cellmorph/.
RELATIVE = re.compile(r"(?<![\w./-])([a-z_]+/[\w./-]*\.(?:py|md))\b")
MODULE = re.compile(r"(?<![\w.])((?:cellmorph|conversion)(?:\.[a-z_][a-z0-9_]*)+)")
# A bare file name (store.py, PLATFORM_NOTES.md) must be a file somewhere in the repository.
BARE = re.compile(r"(?<![\w./-])([\w-]+\.(?:py|md))\b")


def _prose(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and string (docstrings included) of a module."""
    out = []
    with path.open("rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type in (tokenize.COMMENT, tokenize.STRING):
                out.append((tok.start[0], tok.string))
    return out


def _module_exists(dotted: str) -> bool:
    """``a.b.c`` names a module, or a name defined in the longest prefix that is one."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:n])
        file = (
            base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        )
        if not file.is_file():
            continue
        if n == len(parts):
            return True
        name = re.escape(parts[n])
        defined = rf"^\s*(?:async def|def|class)\s+{name}\b|^{name}\b\s*[:=]|\bimport\b.*\b{name}\b"
        return re.search(defined, file.read_text(), re.M) is not None
    return False


# Files the code writes (tools/gpu_kit.py writes the kit's RUNBOOK.md), not files it names.
GENERATED = {"RUNBOOK.md"}


def _files() -> set[str]:
    return {
        p.name for p in ROOT.rglob("*") if p.suffix in (".py", ".md") and ".venv" not in p.parts
    }


def test_named_files_and_modules_exist():
    names = _files()
    missing = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            where = path.relative_to(ROOT)
            for line, text in _prose(path):
                for ref in PATH.findall(text):
                    ref = ref.split("#")[0].rstrip(".")
                    if not (ROOT / ref).exists() and not _is_pattern(ref):
                        missing.append(f"{where}:{line}: {ref}")
                for ref in RELATIVE.findall(text):
                    if not any((base / ref).exists() for base in (ROOT, ROOT / pkg)):
                        missing.append(f"{where}:{line}: {ref}")
                for ref in MODULE.findall(text):
                    # a string that is the name alone is a value (an MLflow tag), not a reference
                    if not _module_exists(ref) and text.strip("\"'") != ref:
                        missing.append(f"{where}:{line}: {ref}")
                for ref in BARE.findall(text):
                    if ref not in names and ref not in GENERATED:
                        missing.append(f"{where}:{line}: {ref}")
    assert not missing, "names of files or modules that do not exist:\n" + "\n".join(missing)


def _is_pattern(ref: str) -> bool:
    """``cellmorph/<name>.py``-like templates and globs are not paths."""
    return any(c in ref for c in "*<>{}")


def test_the_check_finds_a_missing_file():
    assert PATH.findall("# see docs/nope.md and cellmorph/store.py") == [
        "docs/nope.md",
        "cellmorph/store.py",
    ]
    assert not (ROOT / "cellmorph/store.py").exists()
    assert not _module_exists("cellmorph.store_missing")
    assert _module_exists("cellmorph.launch.resolve_paths")
    assert _module_exists("cellmorph.store.read") and not _module_exists("cellmorph.launch.nope")
    assert RELATIVE.findall("(see ``loaders/geometry.py``)") == ["loaders/geometry.py"]
    assert BARE.findall("see PLATFORM_NOTES.md") == ["PLATFORM_NOTES.md"]
    assert "PLATFORM_NOTES.md" not in _files()
