"""``cellmorph convert`` and ``cellmorph inspect`` (the Ray job reuses the same arguments)."""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import ValidationError

from cellmorph.config import Config, ConvertConfig, NucleiConfig, load_config, validate
from cellmorph.errors import CellmorphError
from cellmorph.store import layout as slayout
from cellmorph.store import read as sread
from cellmorph.store import verify as sverify
from conversion.layouts import check_settings

# argument name -> ConvertConfig field, for options whose value is a comma-separated list.
_LISTS = {"channels", "file_channels", "join_on"}
_FIELDS = [
    "load_data", "images", "metadata", "id_pattern", "id_column", "join", "join_on", "illum_dir",
    "channels", "file_channels", "size", "codec", "shard_size", "workers", "label_column",
    "path_replace", "stats_images", "barcode_platemap", "platemap_dir", "external_metadata",
    "max_pixels", "crop_size", "locations", "bin",
]  # fmt: skip


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``cellmorph convert`` (shared with ``python -m ray_jobs.convert``)."""
    src = p.add_argument_group("input (one layout)")
    src.add_argument(
        "--load-data", help="CellProfiler LoadData CSV (FileName_Orig<Ch>/PathName_Orig<Ch>)"
    )
    src.add_argument("--images", help="folder of multi-channel TIFFs, one per site")
    src.add_argument("--metadata", help="metadata CSV for --images")
    src.add_argument(
        "--id-pattern", help="regex extracting the identifier from each file name (group 'id' or 1)"
    )
    src.add_argument(
        "--id-column",
        help="metadata column holding the identifier, bare or inside a file name "
        "(--id-pattern is applied to it too; trimmed, case-insensitive)",
    )
    src.add_argument("--join", help="separate metadata table joined to the LoadData rows")
    src.add_argument("--join-on", help="comma-separated key columns for --join")
    src.add_argument(
        "--path-replace", action="append", help="OLD=NEW path prefix rewrite (repeatable)"
    )
    src.add_argument("--illum-dir", help="folder with <plate>_Illum<Ch>.npy illumination functions")
    labels = p.add_argument_group("labels from JUMP plate maps (either layout)")
    labels.add_argument(
        "--barcode-platemap",
        help="barcode_platemap.csv (Assay_Plate_Barcode -> Plate_Map_Name); maps are read from "
        "platemap/<Plate_Map_Name>.txt next to it",
    )
    labels.add_argument("--platemap-dir", help="folder of the plate maps, if not platemap/")
    labels.add_argument(
        "--external-metadata",
        action="append",
        help="table keyed by broad_sample (compound, CRISPR, ORF metadata); repeatable",
    )
    opt = p.add_argument_group("store")
    opt.add_argument("--out", required=True, help="store path or URL")
    opt.add_argument("--channels", help="channel names in store order, e.g. DNA,ER,RNA,AGP,Mito")
    opt.add_argument("--file-channels", help="channel names in file order (folder layout)")
    opt.add_argument("--size", type=int, help="stored image size in pixels (default 160)")
    opt.add_argument("--codec", choices=["auto", "zstd", "lz4", "blosc-lz4"])
    opt.add_argument("--shard-size", type=int, help="images per shard file")
    opt.add_argument("--workers", type=int, help="parallel processes")
    opt.add_argument(
        "--label-column", help="column that must hold a label (default Metadata_pert_iname)"
    )
    opt.add_argument("--allow-unlabeled", action="store_true", help="keep sites without a label")
    opt.add_argument("--stats-images", type=int, help="images sampled for channel statistics")
    opt.add_argument(
        "--max-pixels",
        type=int,
        help="largest TIFF plane (height x width) to decode; larger files are quarantined from "
        "their header (default 16777216 = 4096x4096)",
    )
    opt.add_argument("--overwrite", action="store_true", help="replace whatever is at --out")
    opt.add_argument(
        "--config", help="YAML config; its convert (and nuclei) sections give the defaults"
    )
    _add_cell_arguments(p)


def _add_cell_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a cell store (``--crop-size``) and of its nuclei finder."""
    cells = p.add_argument_group("single cells (a cell store: one crop per nucleus)")
    cells.add_argument(
        "--crop-size", type=int, help="crop size in px, centred on each nucleus (0: fields)"
    )
    cells.add_argument(
        "--locations",
        help="nucleus centres: a DeepProfiler folder (<plate>/<well>-<site>-Nuclei.csv) or one "
        "CellProfiler object table; default: found on the DNA channel (cellmorph nuclei)",
    )
    cells.add_argument(
        "--bin", type=int, help="average BIN x BIN pixel blocks before cropping (default 1)"
    )
    cells.add_argument(
        "--nucleus-diameter",
        type=float,
        help="the finder's expected nucleus diameter in native px (nuclei.diameter, 29.8)",
    )


def config_from_args(args: argparse.Namespace) -> ConvertConfig:
    """Merge the YAML config's convert section (if any) with the options given."""
    raw: dict[str, Any] = load_config(args.config).convert.model_dump()
    for name in _FIELDS:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name in _LISTS:
            # Empty channel names are kept so the settings check can name the typo (DNA,,ER).
            value = [v.strip() for v in value.split(",")]
            value = value if name != "join_on" else [v for v in value if v]
        raw[name] = value
    if args.allow_unlabeled:
        raw["allow_unlabeled"] = True
    try:
        cfg = ConvertConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")  # our validators name their keys
        raise CellmorphError(f"convert.{key}: {msg}" if key else msg) from None
    check_settings(cfg)  # before the Ray job connects to a cluster, or anything is read
    return cfg


def convert_nuclei_from_args(args: argparse.Namespace) -> NucleiConfig:
    """The finder's settings for a cell store: the config's nuclei section, then
    ``--nucleus-diameter``."""
    raw = load_config(args.config).nuclei.model_dump()
    if getattr(args, "nucleus_diameter", None) is not None:
        raw["diameter"] = args.nucleus_diameter
    return validate(Config, {"nuclei": raw}, "invalid option").nuclei


def print_summary(summary: dict[str, Any]) -> None:
    """The result line, then the most frequent quarantine reasons with counts and fixes."""
    what = "cells" if summary.get("unit") == "cell" else "images"
    if summary["nothing_to_do"]:
        print(f"nothing to do: {summary['store']} is complete ({summary['images']} {what})")
    else:
        print(
            f"converted {summary['images']} {what} into {summary['store']} "
            f"({summary['written']} written in this run), quarantined {summary['quarantined']} "
            f"(see {summary['store']}/{slayout.QUARANTINE}), {summary['seconds']:.1f} s"
        )
    if summary.get("sites_without_cells"):
        print(
            f"sites without cells: {summary['sites_without_cells']} (in "
            f"{summary['store']}/{slayout.QUARANTINE}, reasons starting 'no cells')"
        )
    if summary.get("replaced"):
        print(f"swapped the new store in at {summary['store']}; {summary['replaced']}")
    if summary.get("unfinished_overwrite"):
        print(
            f"note: an unfinished --overwrite of this store is in {summary['unfinished_overwrite']}"
            "; rerun that command with --overwrite to finish it, or delete that folder"
        )
    reasons = summary.get("quarantine_reasons") or []
    # A cell store's rows are cells: its sites are counted in its attributes.
    total = summary.get("sites") or summary["images"]
    total += summary["quarantined"]
    if total and summary["quarantined"] * 2 >= total:
        print(
            f"warning: {summary['quarantined']} of {total} sites "
            f"({100 * summary['quarantined'] / total:.0f}%) were quarantined: most of the input "
            f"is missing from the store; check the reasons below (every site's in "
            f"{summary['store']}/{slayout.QUARANTINE}) before training"
        )
    if reasons:
        print("quarantine reasons (most frequent first):")
    width = max((len(str(r["count"])) for r in reasons), default=0)
    for r in reasons:
        fix = f"  [fix: {r['fix']}]" if r["fix"] else ""
        print(f"  {r['count']:>{width}}  {r['reason']}{fix}")


def _convert(args: argparse.Namespace) -> int:
    from conversion.pack import convert

    cfg = config_from_args(args)
    nuclei = convert_nuclei_from_args(args)
    print_summary(convert(cfg, args.out, overwrite=args.overwrite, nuclei=nuclei))
    return 0


# metadata.parquet columns that are not metadata: left out of the list a typo is shown.
_BOOKKEEPING = {slayout.CHECKSUM, slayout.CHUNK_CRC}


def _inspect(args: argparse.Namespace) -> int:
    # Only the columns it reports on: every column of millions of rows (five file paths a
    # site) would take GBs.
    st = sread.open_store(args.store, columns=[args.label_column] if args.label_column else [])
    label = args.label_column or st.attrs.get("label_column")
    if args.label_column and args.label_column not in st.metadata_columns():
        # Silently leaving the class counts out would read as "no classes".
        present = [c for c in st.metadata_columns() if c not in _BOOKKEEPING
                   and not c.startswith("source_")]  # fmt: skip
        raise CellmorphError(
            f"--label-column {args.label_column}: no such column in {st.path}/{slayout.METADATA} "
            f"(columns present: {', '.join(present)})"
        )
    if label and label not in st.metadata.columns:
        st = sread.open_store(args.store, columns=[label])
    print(sverify.dumps(sverify.describe(st, label)))
    if args.verify:
        verify(st)
    return 0


def verify(st: sread.Store, show: int = 20) -> None:
    """Check every image against its checksums; list what is wrong, then stop with a count."""
    problems = sverify.verify_store(st)
    if not problems:
        print(
            f"verified {len(st)} images: every chunk's crc32c and every image's checksum match "
            f"{slayout.METADATA}"
        )
        return
    for line in problems[:show]:
        print(line)
    if len(problems) > show:
        print(f"... and {len(problems) - show} more")
    raise CellmorphError(
        f"{st.path}: {len(problems)} of {len(st)} images failed verification (listed above); "
        "the store is damaged: convert again with --overwrite"
    )


def add_nuclei_arguments(p: argparse.ArgumentParser) -> None:
    """``cellmorph nuclei``: convert's input options, the CSV to write, the nuclei settings."""
    src = p.add_argument_group("input (one layout, read as convert reads it)")
    src.add_argument("--load-data", help="CellProfiler LoadData CSV (FileName_Orig<Ch>/...)")
    src.add_argument("--images", help="folder of multi-channel TIFFs, one per site")
    src.add_argument("--metadata", help="metadata CSV for --images")
    src.add_argument("--id-pattern", help="regex extracting the identifier from each file name")
    src.add_argument("--id-column", help="metadata column holding the identifier")
    src.add_argument("--file-channels", help="channel names in file order (folder layout)")
    src.add_argument(
        "--path-replace", action="append", help="OLD=NEW path prefix rewrite (repeatable)"
    )
    opt = p.add_argument_group("nuclei")
    opt.add_argument("--out", required=True, help="CSV to write, one row per nucleus")
    opt.add_argument("--channel", help="the nuclear stain's channel name (default DNA)")
    opt.add_argument("--diameter", type=float, help="expected nucleus diameter in px (29.8)")
    opt.add_argument("--workers", type=int, help="parallel processes")
    opt.add_argument("--config", help="YAML config: its convert and nuclei sections")


def nuclei_config_from_args(args: argparse.Namespace) -> tuple[NucleiConfig, ConvertConfig]:
    """The nuclei settings (config section ``nuclei`` + options) and the input settings."""
    raw = load_config(args.config).nuclei.model_dump()
    given = {"channel": args.channel, "diameter": args.diameter, "workers": args.workers}
    raw.update({k: v for k, v in given.items() if v is not None})
    cfg = validate(Config, {"nuclei": raw}, "invalid option").nuclei
    # convert's own merge of the config file and the input options (no labels needed here).
    args.allow_unlabeled = True
    return cfg, config_from_args(args)


def _nuclei(args: argparse.Namespace) -> int:
    from conversion.nuclei import find_all

    cfg, convert = nuclei_config_from_args(args)
    summary = find_all(cfg, convert, args.out)
    print(
        f"found {summary['nuclei']} nuclei in {summary['sites']} sites -> {summary['out']} "
        f"({summary['seconds']:.1f} s); skipped {len(summary['skipped'])} sites"
    )
    for r in summary["reasons"]:
        print(f"  {r['count']}  {r['reason']}" + (f"  [fix: {r['fix']}]" if r["fix"] else ""))
    for s in summary["skipped"][:10]:
        print(f"  skipped {s['site']}: {s['reason']}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``convert``, ``inspect`` and ``nuclei``."""
    nuc = subparsers.add_parser(
        "nuclei", help="find nuclei on the DNA channel; one CSV row per nucleus"
    )
    add_nuclei_arguments(nuc)
    nuc.set_defaults(func=_nuclei)
    conv = subparsers.add_parser("convert", help="pack TIFFs into a sharded zarr store")
    add_convert_arguments(conv)
    conv.set_defaults(func=_convert)
    insp = subparsers.add_parser("inspect", help="summarize a store")
    insp.add_argument("store")
    insp.add_argument("--label-column", help="count classes in this column")
    insp.add_argument(
        "--verify",
        action="store_true",
        help="read every image and check it against its stored checksums (exit 2 if any fails)",
    )
    insp.set_defaults(func=_inspect)
