"""The config sections of the data-making commands: ``synth``, ``convert`` and ``nuclei``.

Part of the one config tree (:class:`cellmorph.config.Config`); import them from
:mod:`cellmorph.config`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cellmorph.config_io import Section


class SynthConfig(Section):
    """Synthetic Cell Painting plate (the embedded default dataset)."""

    out: str = "data/demo/raw"
    seed: int = 0
    plates: int = Field(2, ge=1)
    rows: int = Field(4, ge=1, le=16)
    cols: int = Field(6, ge=1, le=24)
    sites: int = Field(4, ge=1)
    size: int = Field(96, ge=32)
    cells_per_site: int = Field(14, ge=1)
    # Real scale (None: the thumbnail scale above, whose cells grow with ``size``).
    nucleus_diameter: float | None = Field(
        None, gt=0.0,
        description="draw at a fixed physical scale: mean nucleus equivalent diameter in px "
        "(the pilot's is 29.8 at 1080 px); cells_per_site is then ignored",
    )  # fmt: skip
    cells_per_field: float = Field(
        110.0, gt=0.0, description="real scale: expected cells per 1080 x 1080 px of field"
    )
    texture_only: bool = Field(
        False,
        description="real scale: treatments differ only in texture (1-4 px: chromatin, "
        "nucleoli, mitochondria, ER, actin), not in size, shape, intensity or density",
    )

    @model_validator(mode="after")
    def _texture_needs_real_scale(self) -> SynthConfig:
        if self.texture_only and self.nucleus_diameter is None:
            raise ValueError("synth.texture_only needs synth.nucleus_diameter (real scale)")
        return self


DEFAULT_LABEL_COLUMN = "Metadata_pert_iname"


class ConvertConfig(Section):
    """Packing TIFFs into the store (writer side)."""

    load_data: str | None = None
    images: str | None = None
    metadata: str | None = None
    id_pattern: str | None = None
    id_column: str | None = None
    join: str | None = None
    join_on: list[str] = []
    illum_dir: str | None = None
    channels: list[str] = ["DNA", "ER", "RNA", "AGP", "Mito"]
    size: int = Field(160, ge=8)
    codec: Literal["auto", "zstd", "lz4", "blosc-lz4"] = Field(
        "auto",
        description="auto: zstd for a field store, blosc-lz4 for a cell store; zstd: Blosc zstd, "
        "bit-shuffled (level 3 for a field store, 1 for a cell store: attrs.codec_level); "
        "blosc-lz4: Blosc LZ4, bit-shuffled (fastest on the CPU); lz4: plain LZ4, which DALI "
        "inflates on the GPU",
    )
    shard_size: int = Field(1024, ge=1)
    workers: int = Field(2, ge=1)
    label_column: str = DEFAULT_LABEL_COLUMN
    allow_unlabeled: bool = Field(False, description="keep sites without a label (prediction)")
    file_channels: list[str] = Field(
        [], description="channel names in file order for multi-channel TIFFs; [] = channels"
    )
    path_replace: list[str] = Field([], description="OLD=NEW prefixes applied to LoadData paths")
    stats_images: int = Field(256, ge=1, description="images sampled for channel percentiles")
    negcon: str = Field(
        "Metadata_control_type=negcon",
        pattern=r"^$|^[^=]+=",
        description="COLUMN=VALUE naming the negative-control wells (per-plate statistics for "
        "loader.normalize=negcon); empty: none",
    )
    barcode_platemap: str | None = Field(
        None, description="JUMP barcode_platemap.csv: plate barcode -> plate map (labels by join)"
    )
    platemap_dir: str | None = Field(
        None, description="folder of <Plate_Map_Name>.txt; None = platemap/ next to the CSV"
    )
    external_metadata: list[str] = Field(
        [], description="tables keyed by broad_sample (compound, CRISPR, ORF metadata)"
    )
    max_pixels: int = Field(
        4096 * 4096,
        ge=1,
        description="largest plane (height x width) decoded; a larger TIFF is quarantined from "
        "its header (fields are 1080-2160 px; a 20000x20000 plane decodes to GBs)",
    )
    crop_size: int | None = Field(
        None, ge=0, le=2048,
        description="a cell store: one crop_size x crop_size crop per nucleus (after binning), "
        "zero-padded past the field's edge; None or 0: a field store (size)",
    )  # fmt: skip
    locations: str | None = Field(
        None, description="nucleus centres: a DeepProfiler folder (<plate>/<well>-<site>-"
        "Nuclei.csv) or one CellProfiler object table; None: found by the nuclei finder",
    )  # fmt: skip
    bin: int = Field(
        1, ge=1, le=16,
        description="average bin x bin blocks of the field before cropping (centres / bin)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _cell_options_need_crop(self) -> ConvertConfig:
        if not self.crop_size:
            for key, given in (("locations", self.locations is not None), ("bin", self.bin != 1)):
                if given:
                    raise ValueError(f"convert.{key} needs convert.crop_size (--crop-size)")
        elif self.crop_size < 8:
            raise ValueError(f"convert.crop_size {self.crop_size} is below 8 px (0: fields)")
        return self


class NucleiConfig(Section):
    """Finding nuclei on the DNA channel (``cellmorph nuclei``); defaults fit the JUMP pilot."""

    channel: str = Field("DNA", min_length=1, description="the channel that stains nuclei")
    diameter: float = Field(
        29.8, gt=0.0, description="expected nucleus equivalent diameter in px (the pilot's median)"
    )
    smoothing: float = Field(
        0.067, ge=0.0, description="Gaussian sigma before thresholding, as a fraction of diameter"
    )
    threshold: Literal["otsu", "li"] = Field(
        "otsu",
        description="global threshold of the log-intensities: otsu, or li (minimum cross "
        "entropy, CellProfiler's default)",
    )
    min_contrast: float = Field(
        2.0, ge=1.0,
        description="the threshold is at least this x the 1st percentile (the background), so "
        "a field without nuclei yields none rather than the brightest noise",
    )  # fmt: skip
    split_distance: float = Field(
        0.3, gt=0.0, le=2.0,
        description="touching nuclei are split at distance-transform peaks at least this "
        "fraction of diameter apart",
    )  # fmt: skip
    min_area: float = Field(0.25, ge=0.0, description="smallest nucleus, fraction of expected area")
    max_area: float = Field(4.0, gt=0.0, description="largest nucleus, fraction of expected area")
    exclude_border: bool = Field(
        True, description="drop nuclei touching the image border (as CellProfiler does)"
    )
    workers: int = Field(2, ge=1, description="parallel processes (sites)")

    @model_validator(mode="after")
    def _area_bounds_ordered(self) -> NucleiConfig:
        if self.min_area >= self.max_area:
            raise ValueError(f"nuclei.min_area ({self.min_area}) must be below nuclei.max_area "
                             f"({self.max_area})")  # fmt: skip
        return self
