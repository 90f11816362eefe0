"""The generic half of the config: the section base, its error, and YAML/dotlist reading.

Knows no section: :mod:`cellmorph.config` builds the tree on :class:`Section` and loads it
with :func:`read_tree` and :func:`validate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from cellmorph.errors import CellmorphError

S = TypeVar("S", bound=BaseModel)


class ConfigError(CellmorphError):
    """A config that cannot be used; the message names the key."""


class Section(BaseModel):
    """Base of every config section: unknown keys rejected, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["train.epochs=3", "loader.augment=[hflip]"]`` into a nested dict.

    Values are parsed as YAML scalars/flow collections, so ``3`` is an int and ``[a,b]`` a list.
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse value {raw!r} ({e})") from None
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is set to a value and a section")
        node[parts[-1]] = value
    return tree


def merge_trees(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` laid over it, section by section."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_trees(out[k], v)
        else:
            out[k] = v
    return out


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        msg = msg.removeprefix("Value error, ")  # our validators' messages name their keys
        lines.append(f"{key}: {msg}" if key else msg)
    return "; ".join(lines)


def validate(model: type[S], raw: dict[str, Any], where: str = "invalid config") -> S:
    """Validate ``raw`` into ``model``, or raise ConfigError naming every bad key."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{where}: {_describe(e)}") from None


def read_tree(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The YAML mapping at ``path`` (empty when None) with dotlist ``overrides`` applied."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:  # a binary file (an image, a checkpoint) given by mistake
            raise ConfigError(
                f"config file {p} is not text (byte {e.start} is not UTF-8): give a YAML file"
            ) from None
        except yaml.YAMLError as e:  # its message spans lines: keep the error to one
            raise ConfigError(
                f"config file {p}: not valid YAML ({' '.join(str(e).split())})"
            ) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        raw = loaded
    return merge_trees(raw, parse_overrides(overrides or []))


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
