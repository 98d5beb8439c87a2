"""``monai-fl prep``: turn a site's raw DICOM folder into what the tasks read.

Sub-commands (each writes an artefact the next one reads)::

    prep deid      DICOM  -> de-identified DICOM + site-private re-identification map
    prep convert   DICOM  -> nifti/*.nii.gz + conversion.json
    prep quality   conversion.json or NIfTI folder (+ labels) -> quality.json/.md/.html
    prep datalist  conversion.json or NIfTI folder (+ labels, quality.json) -> dataset.json
    prep all       deid -> convert -> quality -> datalist

The handlers only parse options and print summaries; the work is in the stage modules.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from preprocessing import artefacts
from preprocessing.errors import DataNotFoundError, MonaiFLError, PrepConfigError

PROG = "monai-fl prep"


def _progress(args: argparse.Namespace) -> bool:
    return not args.no_progress and sys.stderr.isatty()


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they only show on a terminal anyway)")


def _convert_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verify-dcm2niix",
        action="store_true",
        help="also convert every series with dcm2niix and record voxel/affine agreement",
    )
    p.add_argument(
        "--slice-tolerance",
        type=float,
        default=0.01,
        help="accepted relative deviation of slice steps before a series is reported as having "
        "missing slices or uneven spacing (default 0.01 = 1%%)",
    )


def _deid_options(p: argparse.ArgumentParser, map_required: bool = True) -> None:
    p.add_argument(
        "--reid-map",
        type=Path,
        required=map_required,
        help="site-private JSON re-identification map (outside the output; extended if it exists)"
        + ("" if map_required else "; required unless --no-deid"),
    )
    p.add_argument("--shift-dates", action="store_true", help="shift dates per patient instead of removing them")
    p.add_argument("--max-shift-days", type=int, default=365, help="largest date shift in days (default 365)")
    p.add_argument("--seed", type=int, help="secret seed making UIDs and shifts reproducible")
    p.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="KEYWORD",
        help="profile attribute the site reviewed and keeps, e.g. SeriesDescription (repeatable)",
    )
    p.add_argument(
        "--keep-private",
        action="append",
        default=[],
        metavar="GGGG:CREATOR:EE",
        help="safe private attribute to keep, e.g. 0013:CTP:10 (repeatable)",
    )
    p.add_argument("--pseudonym-prefix", default="P", help="pseudonyms are <prefix>0001, ... (default P)")
    p.add_argument(
        "--allow-burned-in",
        action="store_true",
        help="de-identify images flagged BurnedInAnnotation=YES, and US/SC/XA/RF/ES/XC/OT/GM/SM/DOC images "
        "not flagged NO (their pixels are NOT cleaned)",
    )


def _label_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("labels (at most one source)")
    g.add_argument("--label-series", metavar="REGEX", help="converted series whose name/description matches are labels")
    g.add_argument("--labels", type=Path, metavar="DIR", help="folder of label NIfTI files named like the images")
    g.add_argument("--labels-csv", type=Path, metavar="CSV", help="classification labels: columns image,label")
    g.add_argument("--label-names", metavar="V=NAME,...", help="class names, e.g. 0=background,1=tumour")


def _source_options(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--conversion", type=Path, help="conversion.json (or its folder) from `prep convert`")
    src.add_argument("--images", type=Path, help="folder of NIfTI images (a site that already holds NIfTI)")


def _label_spec(args: argparse.Namespace):
    from preprocessing.labels import LabelSpec, parse_label_names

    return LabelSpec(
        series_pattern=args.label_series,
        directory=args.labels,
        csv=args.labels_csv,
        names=parse_label_names(args.label_names),
    )


def _deid_opts(args: argparse.Namespace):
    from preprocessing.deid.deidentify import DeidOptions, SafePrivate

    return DeidOptions(
        shift_dates=args.shift_dates,
        max_shift_days=args.max_shift_days,
        seed=args.seed,
        safe_private=tuple(SafePrivate.parse(t) for t in args.keep_private),
        keep=tuple(args.keep),
        pseudonym_prefix=args.pseudonym_prefix,
        allow_burned_in=args.allow_burned_in,
    )


def _inventory(args: argparse.Namespace) -> tuple[list, dict[str, Any] | None]:
    from preprocessing.inventory import items_from_conversion, items_from_folder, load_conversion

    if args.conversion:
        summary, base = load_conversion(args.conversion)
        return items_from_conversion(summary, base), summary
    return items_from_folder(args.images), None


def cmd_convert(args: argparse.Namespace) -> int:
    """``prep convert INPUT --out DIR``."""
    from preprocessing.dicom.convert import ConvertOptions, convert_tree, format_summary

    options = ConvertOptions(rel_tol=args.slice_tolerance, verify_dcm2niix=args.verify_dcm2niix)
    summary = convert_tree(args.input, args.out, options, progress=_progress(args))
    print(format_summary(summary))
    print(f"summary: {Path(args.out) / artefacts.CONVERSION_JSON}")
    return 0


def cmd_deid(args: argparse.Namespace) -> int:
    """``prep deid INPUT --out DIR --reid-map FILE``."""
    from preprocessing.deid.deidentify import deidentify_tree, format_summary

    summary = deidentify_tree(args.input, args.out, args.reid_map, _deid_opts(args), progress=_progress(args))
    print(format_summary(summary))
    print(f"de-identified files: {args.out}; re-identification map (keep at the site): {args.reid_map}")
    return 0


def cmd_quality(args: argparse.Namespace) -> int:
    """``prep quality (--conversion F | --images DIR) [labels] --out DIR``."""
    from preprocessing.labels import pair_labels
    from preprocessing.quality import QualityOptions, assess_site, format_summary, write_report

    spec = _label_spec(args)
    spec.validate()  # option errors before reading any image
    items, conversion = _inventory(args)
    pairing = pair_labels(items, spec)
    report = assess_site(pairing, conversion, QualityOptions(site=args.site), progress=_progress(args))
    paths = write_report(report, args.out)
    print(format_summary(report, paths))
    return 0


def cmd_datalist(args: argparse.Namespace) -> int:
    """``prep datalist (--conversion F | --images DIR) [labels] [--quality F] --out dataset.json``."""
    from preprocessing.datalist import build_datalist, format_summary
    from preprocessing.labels import pair_labels

    spec = _label_spec(args)
    spec.validate()
    items, _ = _inventory(args)
    pairing = pair_labels(items, spec)
    quality = artefacts.read_json(args.quality, "quality report") if args.quality else None
    out = Path(args.out)
    if out.is_dir() or not out.suffix:
        out = out / artefacts.DATASET_JSON
    payload = build_datalist(pairing, out, quality, name=args.name, description=args.description, channels=_channels(args))
    print(format_summary(payload, out))
    return 0


def _channels(args: argparse.Namespace) -> list[str] | None:
    if not args.channels:
        return None
    channels = [c.strip() for c in args.channels.split(",") if c.strip()]
    if not channels:
        raise PrepConfigError("--channels needs comma-separated patterns, e.g. T1post,FLAIR")
    return channels


def cmd_all(args: argparse.Namespace) -> int:
    """``prep all INPUT --out DIR --reid-map FILE [labels]``: every stage in order."""
    from preprocessing.datalist import build_datalist
    from preprocessing.datalist import format_summary as datalist_summary
    from preprocessing.deid.deidentify import deidentify_tree
    from preprocessing.deid.deidentify import format_summary as deid_summary
    from preprocessing.dicom.convert import ConvertOptions, convert_tree
    from preprocessing.dicom.convert import format_summary as convert_summary
    from preprocessing.inventory import items_from_conversion
    from preprocessing.labels import pair_labels
    from preprocessing.quality import QualityOptions, assess_site, write_report
    from preprocessing.quality import format_summary as quality_summary

    out = Path(args.out)
    progress = _progress(args)
    spec = _label_spec(args)
    spec.validate()  # fail before hours of conversion, not after
    dicom_dir = Path(args.input)
    deid_skipped = None
    if not args.no_deid:
        if args.reid_map is None:
            raise PrepConfigError("prep all de-identifies first: pass --reid-map FILE (outside --out), or --no-deid")
        if artefacts.is_within(args.reid_map, out):
            raise PrepConfigError(
                f"--reid-map {args.reid_map} lies inside --out {out}, the folder a site shares; "
                "keep the re-identification map outside it"
            )
        print("[1/4] de-identify")
        summary = deidentify_tree(
            dicom_dir,
            out / artefacts.DEID_DIR,
            args.reid_map,
            _deid_opts(args),
            progress=progress,
            summary_path=out / artefacts.DEID_SUMMARY_JSON,  # beside, not inside, the DICOM tree
        )
        print(deid_summary(summary))
        c = summary["counts"]
        if c["written"] + c["already_done"] == 0:
            raise DataNotFoundError(
                f"no DICOM instance under {dicom_dir} could be de-identified ({c['files']} files: "
                f"{c['skipped']} skipped, {c['ignored_not_dicom']} not DICOM); nothing to convert"
            )
        deid_skipped = summary["skipped"]
        dicom_dir = out / artefacts.DEID_DIR
    print("[2/4] convert")
    conversion = convert_tree(
        dicom_dir,
        out,
        ConvertOptions(rel_tol=args.slice_tolerance, verify_dcm2niix=args.verify_dcm2niix),
        progress=progress,
    )
    print(convert_summary(conversion))
    print("[3/4] quality")
    pairing = pair_labels(items_from_conversion(conversion, out), spec)
    report = assess_site(
        pairing, conversion, QualityOptions(site=args.site), progress=progress, deid_skipped=deid_skipped
    )
    print(quality_summary(report, write_report(report, out)))
    print("[4/4] datalist")
    payload = build_datalist(
        pairing, out / artefacts.DATASET_JSON, report, name=args.site, channels=_channels(args)
    )
    print(datalist_summary(payload, out / artefacts.DATASET_JSON))
    return 0


def add_prep_subcommands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``prep`` and its sub-commands on an argparse sub-parsers object.

    Each leaf parser sets ``func`` to a handler ``(args) -> int`` that raises
    :class:`monai_fl.errors.MonaiFLError` on user errors (the caller prints them as one line).

    Args:
        subparsers: the object returned by ``parser.add_subparsers()``.

    Returns:
        The ``prep`` parser.
    """
    prep = subparsers.add_parser(
        "prep",
        help="preprocess a site's DICOM: de-identify, convert to NIfTI, quality report, dataset.json",
        description="Turn a site's raw DICOM folder into what the tasks read, without losing or leaking anything.",
    )
    add_stage_parsers(prep.add_subparsers(dest="prep_command", metavar="STAGE", required=True))
    return prep


def add_stage_parsers(sub: argparse._SubParsersAction) -> None:
    """Register convert, deid, quality, datalist and all on a sub-parsers object."""

    p = sub.add_parser(
        "convert",
        help="DICOM series -> NIfTI with checked geometry, plus conversion.json",
        description="Find the DICOM series under INPUT, check their geometry (missing slices, uneven "
        "spacing, mixed orientations, gantry tilt, inconsistent sizes), write NIfTI files and a summary "
        "of what was converted, skipped and why.",
    )
    p.add_argument("input", type=Path, help="folder tree with DICOM files")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder (nifti/ and conversion.json)")
    _convert_options(p)
    _common(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "deid",
        help="de-identify DICOM (PS3.15 Annex E Basic Profile) into a new folder",
        description="Apply the DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile to every "
        "DICOM file under INPUT and write the results under OUT; originals are only read. The "
        "re-identification map goes to a separate, site-private file.",
    )
    p.add_argument("input", type=Path, help="folder tree with original DICOM files")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder for de-identified files")
    _deid_options(p)
    _common(p)
    p.set_defaults(func=cmd_deid)

    p = sub.add_parser(
        "quality",
        help="data-quality report (JSON, Markdown, HTML)",
        description="Check completeness, duplicates, consistency, spacing/intensity outliers, "
        "image/label agreement and class balance of a site's images.",
    )
    _source_options(p)
    _label_options(p)
    p.add_argument("-o", "--out", type=Path, required=True, help="folder for quality.json/.md/.html")
    p.add_argument("--site", default="site", help="site name shown in the report")
    _common(p)
    p.set_defaults(func=cmd_quality)

    p = sub.add_parser(
        "datalist",
        help="write an MSD-style dataset.json",
        description="Write an MSD-style dataset.json (training pairs, unlabelled test images) for the "
        "segmentation or classification task; images with quality errors are left out.",
    )
    _source_options(p)
    _label_options(p)
    p.add_argument("--quality", type=Path, help="quality.json: images with errors are excluded")
    p.add_argument("-o", "--out", type=Path, required=True, help="dataset.json path (or folder)")
    p.add_argument("--name", default="site", help="dataset name")
    p.add_argument("--description", default="", help="dataset description")
    p.add_argument("--channels", metavar="REGEX,...", help="stack the series of each study as channels, in this order")
    _common(p)
    p.set_defaults(func=cmd_datalist)

    p = sub.add_parser(
        "all",
        help="deid -> convert -> quality -> datalist in one go",
        description="Run every stage: de-identify INPUT into OUT/dicom_deid (unless --no-deid), convert it to "
        "OUT/nifti, write OUT/quality.* and OUT/dataset.json.",
    )
    p.add_argument("input", type=Path, help="folder tree with original DICOM files")
    p.add_argument("-o", "--out", type=Path, required=True, help="site output folder")
    p.add_argument("--no-deid", action="store_true", help="input is already de-identified: skip that stage")
    _deid_options(p, map_required=False)
    _convert_options(p)
    _label_options(p)
    p.add_argument("--site", default="site", help="site / dataset name")
    p.add_argument("--channels", metavar="REGEX,...", help="see `prep datalist`")
    _common(p)
    p.set_defaults(func=cmd_all)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m preprocessing STAGE ...`` = ``monai-fl prep STAGE ...``.

    Args:
        argv: arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        Exit status: 0 on success, 2 on a user error (printed as one line).
    """
    parser = argparse.ArgumentParser(prog="python -m preprocessing", description=__doc__.splitlines()[0].replace("``", ""))
    add_stage_parsers(parser.add_subparsers(dest="prep_command", metavar="STAGE", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MonaiFLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
