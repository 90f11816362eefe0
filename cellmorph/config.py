"""One frozen, typed config tree, loaded from YAML with dotlist overrides.

Every section is a pydantic model with ``extra="forbid"`` and ``frozen=True``: an unknown key
or a wrong type stops with a message naming the full key (``train.epochs``), and nothing mutates
a config after it is loaded. Functions take the sub-config they need, not the whole tree.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from cellmorph import atomic
from cellmorph.augment import OP_NAMES

# re-exported: cellmorph.config is the one config entry point
from cellmorph.config_commands import (
    DEFAULT_LABEL_COLUMN,
    ConvertConfig,
    NucleiConfig,
    SynthConfig,
)
from cellmorph.config_io import (
    ConfigError,
    Section,
    config_to_dict,
    merge_trees,
    parse_overrides,
    read_tree,
    validate,
)
from cellmorph.metrics import SCORE_MODES, score_mode, topk_name
from cellmorph.urlpath import AnyPath, as_path

__all__ = [
    "DEFAULT_LABEL_COLUMN",
    "AugmentOp",
    "Config",
    "ConfigError",
    "ConvertConfig",
    "DataConfig",
    "EvalConfig",
    "LoaderConfig",
    "ModelConfig",
    "NucleiConfig",
    "OptimConfig",
    "RayConfig",
    "Section",
    "SynthConfig",
    "TrackingConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "default_image_size",
    "dump_config",
    "load_config",
    "max_view_fraction",
    "merge_trees",
    "parse_overrides",
    "read_tree",
    "resolve_from_store",
    "validate",
    "view_size",
]


class DataConfig(Section):
    """Labels, class selection, split and balancing (index arrays only, never images)."""

    store: str = "data/demo/store.zarr"
    label_column: str | None = Field(
        None,
        description="the column naming the classes; None = the one the store's conversion "
        f"recorded (attrs.label_column), else {DEFAULT_LABEL_COLUMN}",
    )
    top_k: int = Field(0, ge=0, description="keep the K most frequent classes; 0 keeps all")
    min_count: int = Field(0, ge=0)
    split: Literal["grouped", "plate", "image"] = "grouped"
    group_by: Literal["well", "plate"] = "well"
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    val_plates: list[str] = []
    test_fraction: float = Field(
        0.2, ge=0.0, lt=1.0,
        description="held out like validation (same grouping) and used only for the final "
        "score; 0 = no test fold (the headline is then the validation score)",
    )  # fmt: skip
    test_plates: list[str] = Field(
        [], description="plates held out whole as the test fold (the CPJUMP1 recipe)"
    )
    balance: Literal["oversample", "class_weight", "both", "none"] = "oversample"
    seed: int = Field(0, ge=0)
    oversample_before_split: bool = Field(
        False,
        description="the original study's flawed protocol (split=image only): oversample all "
        "rows, then split, so copies of one image land on both sides; for the leakage audit",
    )

    @model_validator(mode="after")
    def _split_options_agree(self) -> DataConfig:
        if self.oversample_before_split and self.split != "image":
            raise ValueError("oversample_before_split is only allowed with split=image")
        if self.oversample_before_split and (self.test_fraction or self.test_plates):
            raise ValueError("oversample_before_split (the study protocol) has no test fold: "
                             "set data.test_fraction=0")  # fmt: skip
        if self.val_plates and self.split != "plate":
            raise ValueError(f"val_plates is set but split is {self.split!r} (use split=plate)")
        if self.test_plates and self.test_fraction:
            raise ValueError("data.test_plates and data.test_fraction both choose the test fold: "
                             "set data.test_fraction=0 with test_plates")  # fmt: skip
        if set(self.test_plates) & set(self.val_plates):
            raise ValueError("data.test_plates and data.val_plates share plates")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"data.val_fraction ({self.val_fraction}) + data.test_fraction "
                f"({self.test_fraction}) leave under 10% of the data for training"
            )
        return self


# The names come from the op registry: an op is defined once, in cellmorph/augment.py.
AugmentOp = Literal[OP_NAMES]  # type: ignore[valid-type]


def max_view_fraction(degrees: float) -> float:
    """The largest central square (as a fraction of the side) that a rotation by up to
    ``degrees`` keeps inside the field: ``1 / (cos a + sin a)``."""
    a = math.radians(min(abs(degrees), 45.0))
    return 1.0 / (math.cos(a) + math.sin(a))


class LoaderConfig(Section):
    """Batches for training and evaluation: which loader, how big, which augmentations."""

    kind: Literal["torch", "dali"] = "torch"
    batch_size: int = Field(32, ge=1, description="per worker: the global batch is x workers")
    eval_batch_size: int = Field(128, ge=1)
    num_workers: int = Field(1, ge=0)
    image_size: int | None = Field(
        None, ge=8,
        description="side of the model's input in px; None = the store's size x "
        "view_fraction (160 px fields -> 128, 96 px cells -> 76), resolved when a run starts",
    )  # fmt: skip
    augment: list[AugmentOp] = ["hflip", "vflip", "rot90", "rotate", "brightness_contrast"]
    rotate_degrees: float = Field(10.0, ge=0.0, le=180.0)
    brightness: float = Field(0.1, ge=0.0, le=1.0)
    contrast: float = Field(0.1, ge=0.0, le=1.0)
    intensity: Literal["log", "linear"] = Field(
        "log", description="log1p of the uint16 values (fluorescence is heavy-tailed), or linear"
    )
    normalize: Literal["plate", "negcon", "store", "imagenet"] = Field(
        "plate",
        description="standardize each channel with the statistics of the image's plate, of its "
        "plate's negative-control wells, of the whole store, or ImageNet's (RGB only)",
    )
    # The model sees the central view_fraction of the (resized) store image; the rest is the
    # margin that rotation's empty corners fall into (store 160 px -> 128 px crop at 0.8).
    view_fraction: float = Field(0.8, gt=0.0, le=1.0)
    reader_threads: int = Field(2, ge=1, description="decode threads of the shard reader")
    prefetch: int = Field(2, ge=1, description="batches ahead per worker (torch) / queue (DALI)")
    dali_threads: int = Field(2, ge=1, description="DALI pipeline num_threads")
    cache_dir: str | None = Field(
        None,
        description="a store at a URL (s3://): keep fetched shard bytes in this local folder, "
        "so later epochs read local disk; None: fetch every epoch",
    )
    cache_gb: float = Field(50.0, gt=0.0, description="the most disk loader.cache_dir may use")

    @model_validator(mode="after")
    def _rotation_fits_the_view(self) -> LoaderConfig:
        """A rotation by up to ``rotate_degrees`` leaves empty corners; the central
        ``view_fraction`` must stay inside the rotated field, or the model trains on them."""
        if "rotate" not in self.augment or self.rotate_degrees == 0:
            return self
        limit = max_view_fraction(self.rotate_degrees)
        if self.view_fraction > limit + 1e-9:
            raise ValueError(
                f"loader.augment has rotate with loader.rotate_degrees={self.rotate_degrees:g}, "
                f"whose empty corners reach into the view: loader.view_fraction="
                f"{self.view_fraction:g} must be <= {limit:.3f} for that angle (or drop rotate, "
                "or lower loader.rotate_degrees)"
            )
        return self


class ModelConfig(Section):
    backbone: Literal["mobilenet_v2"] = "mobilenet_v2"
    pretrained: str | None = Field(
        None, description="local torchvision checkpoint; never downloaded"
    )
    width_mult: float = Field(1.0, gt=0.0)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)


class OptimConfig(Section):
    lr: float = Field(
        2e-3, gt=0.0,
        description="peak learning rate at a global batch of 256 (loader.batch_size x workers), "
        "scaled to the actual global batch by optim.lr_scaling",
    )  # fmt: skip
    lr_scaling: Literal["sqrt", "linear", "none"] = "sqrt"
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_steps: int = Field(100, ge=0, description="linear warm-up; at most a quarter of the run")
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0, description="max grad norm; 0 disables")


class TrainConfig(Section):
    epochs: int = Field(12, ge=1)
    min_steps: int = Field(
        300, ge=0,
        description="small data: add epochs until the run takes at least this many optimizer "
        "steps (0, or train.max_steps_per_epoch set: exactly train.epochs)",
    )  # fmt: skip
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: bool | None = None
    compile: bool = False
    keep_best: int = Field(
        2, ge=0, description="best-epochNNN.pt files kept besides last.pt and best.pt"
    )
    best_metric: str = Field(
        "balanced_accuracy",
        description="validation score that picks best.pt (lower is better for loss)",
    )
    max_steps_per_epoch: int = Field(0, ge=0, description="cap for smoke runs; 0 = whole epoch")
    bn_calibration_images: int = Field(
        512, ge=0,
        description="before each evaluation, recompute batch-norm statistics on this many "
        "training images (precise BN); 0 keeps the running averages",
    )  # fmt: skip
    log_every: int = Field(20, ge=1)


class RayConfig(Section):
    """How the training run is scaled (Ray Train ScalingConfig/RunConfig)."""

    address: str | None = Field(
        None, description="None: start a local Ray instance; 'auto' or host:port: join a cluster"
    )
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, ge=0.0)
    max_failures: int = Field(0, ge=-1)


class EvalConfig(Section):
    tsne_max_points: int = Field(2000, ge=10)
    top_k: int = Field(5, ge=1)
    sample_grid_per_class: int = Field(4, ge=0)


class TrackingConfig(Section):
    """Experiment tracking (MLflow); off unless ``mlflow_uri`` is set."""

    mlflow_uri: str | None = Field(
        None, description="MLflow tracking server (http://host:5000); None: nothing is sent"
    )
    experiment: str = Field("cellmorph", min_length=1)
    parent_run_id: str | None = Field(
        None, description="set by a sweep: each trial is a child run of the sweep's run"
    )


class Config(Section):
    """The whole tree: one per run, written to ``runs/<name>/config.yaml``."""

    name: str = "demo"
    seed: int = 0
    run_root: str = "runs"
    synth: SynthConfig = SynthConfig()
    convert: ConvertConfig = ConvertConfig()
    nuclei: NucleiConfig = NucleiConfig()
    data: DataConfig = DataConfig()
    loader: LoaderConfig = LoaderConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    ray: RayConfig = RayConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _name_is_a_folder(self) -> Config:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name must be a plain folder name, got {self.name!r}")
        return self

    @model_validator(mode="after")
    def _best_metric_is_a_score(self) -> Config:
        if score_mode(self.train.best_metric, self.eval.top_k) is None:
            known = [*SCORE_MODES, topk_name(self.eval.top_k)]
            raise ValueError(
                f"train.best_metric: {self.train.best_metric!r} is not a validation score "
                f"(one of {', '.join(known)})"
            )
        return self

    @property
    def best_mode(self) -> str:
        """ "max" or "min": whether a higher ``train.best_metric`` is better."""
        return score_mode(self.train.best_metric, self.eval.top_k) or "max"

    @property
    def run_dir(self) -> AnyPath:
        """``<run_root>/<name>``: a local folder, or a prefix when run_root is a URL (s3://)."""
        return as_path(self.run_root) / self.name


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate a plain dict into a Config, or raise ConfigError naming the bad keys."""
    return validate(Config, raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (or the built-in defaults when ``path`` is None) and apply dotlist overrides."""
    return config_from_dict(read_tree(path, overrides))


def view_size(image_size: int, view_fraction: float) -> int:
    """R: the side the store image is resized to before the centre crop of ``image_size``
    (``R - image_size`` is even, so the crop is exactly centred)."""
    margin = round((image_size / view_fraction - image_size) / 2)
    return image_size + 2 * max(0, margin)


def default_image_size(store_size: int, view_fraction: float) -> int:
    """The crop closest to ``store_size x view_fraction`` that needs no resize
    (:func:`view_size` of it is the store's size: 160 -> 128, 96 -> 76 at 0.8); the plain
    product when no nearby crop does."""
    target = store_size * view_fraction
    near = range(max(8, int(target) - 3), int(target) + 4)
    exact = [c for c in near if c <= store_size and view_size(c, view_fraction) == store_size]
    return min(exact, key=lambda c: abs(c - target)) if exact else max(8, round(target))


def resolve_from_store(cfg: Config) -> Config:
    """``cfg`` with the defaults that come from the store set: ``data.label_column`` (the
    column the store's conversion recorded, else the default) and ``loader.image_size``
    (:func:`default_image_size` of the store's size); explicit values stay. Called once where
    a store is opened for training (preflight, ``run_local``, the audit, a sweep), so the
    run's config.yaml and checkpoints record what was used and no reader sees None."""
    if cfg.data.label_column is not None and cfg.loader.image_size is not None:
        return cfg
    from cellmorph.store.read import recorded_attrs  # zarr: only when a store is read

    attrs = recorded_attrs(cfg.data.store)
    update: dict[str, Any] = {}
    if cfg.data.label_column is None:
        column = attrs.get("label_column") or DEFAULT_LABEL_COLUMN
        update["data"] = cfg.data.model_copy(update={"label_column": str(column)})
    if cfg.loader.image_size is None:
        size = default_image_size(int(attrs["size"]), cfg.loader.view_fraction)
        update["loader"] = cfg.loader.model_copy(update={"image_size": size})
    return cfg.model_copy(update=update)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic.write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
