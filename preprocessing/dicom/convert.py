"""DICOM series -> NIfTI volumes, with a summary of what was converted, skipped and why.

Stage artefact: ``<out>/nifti/*.nii.gz`` plus ``<out>/conversion.json`` (read by the quality
and datalist stages). A broken file or series never stops the run: it is recorded with its
name and reason, and the remaining series are converted.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from tqdm import tqdm

from preprocessing import artefacts
from preprocessing.dicom.discover import Discovery, NoteKind, SeriesRecord, discover_series
from preprocessing.dicom.frames import Rescale, frame_pixels, planes_of
from preprocessing.dicom.geometry import (
    IssueCode,
    Plane,
    SeriesGeometry,
    Severity,
    assess_planes,
)
from preprocessing.errors import (
    DataFormatError,
    MonaiFLError,
    PrepConfigError,
    SeriesGeometryError,
)

NIFTI_DESCRIP = b"monai-fl prep convert"


@dataclass(frozen=True)
class ConvertOptions:
    """Tolerances and switches of the conversion stage.

    Attributes:
        rel_tol: accepted relative deviation of slice steps (0.01 = 1 %).
        tilt_tol_deg: stacking angle above which a series counts as gantry-tilted.
        compress: write ``.nii.gz`` (else ``.nii``).
        verify_dcm2niix: also convert each series with dcm2niix and record the agreement.
    """

    rel_tol: float = 0.01
    tilt_tol_deg: float = 0.05
    compress: bool = True
    verify_dcm2niix: bool = False


@dataclass
class Volume:
    """A converted series in memory."""

    data: np.ndarray
    affine: np.ndarray
    geometry: SeriesGeometry
    planes: list[Plane]
    plane_hashes: list[str]
    sheared: bool


def _plane_hash(pixels: np.ndarray) -> str:
    """Short pixel hash for duplicate detection; blank planes are marked, not hashed,
    because empty slices (e.g. of a mask) are identical without being duplicates."""
    if pixels.size and pixels.min() == pixels.max():
        return f"constant:{pixels.flat[0]}"
    return hashlib.sha1(np.ascontiguousarray(pixels).tobytes()).hexdigest()[:16]


def _output_dtype(raw_dtype: np.dtype, rescales: list[Rescale], lo: float, hi: float) -> np.dtype:
    """Smallest faithful dtype: integers stay integers when the rescale keeps them integral."""
    integral = all(
        float(r.slope).is_integer() and float(r.intercept).is_integer() for r in rescales
    )
    if not integral:
        return np.dtype(np.float32)
    for candidate in (np.int16, np.int32):
        info = np.iinfo(candidate)
        if info.min <= lo and hi <= info.max:
            return np.dtype(candidate)
    if raw_dtype.kind == "u" and 0 <= lo and hi <= np.iinfo(np.uint32).max:
        return np.dtype(np.uint32)
    return np.dtype(np.float64)


def load_series(record: SeriesRecord, options: ConvertOptions = ConvertOptions()) -> Volume:
    """Read, check and stack one series.

    Args:
        record: the series from discovery.
        options: tolerances.

    Returns:
        The volume with a ``(columns, rows, slices[, volumes])`` array and RAS affine.

    Raises:
        DataFormatError: a file of the series is corrupt or not a greyscale image (the message
            names the file), or the geometry check failed (:class:`SeriesGeometryError`, a
            subclass, with every error finding in the message).
    """
    if record.corrupt:
        path, reason = record.corrupt[0]
        raise DataFormatError(
            f"{len(record.corrupt)} corrupt file(s) in the series, e.g. {path}: {reason}"
        )
    planes: list[Plane] = []
    rescales: list[Rescale] = []
    pixels: list[np.ndarray] = []
    for path in record.files:
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:  # noqa: BLE001 - any read failure is a corrupt file
            raise DataFormatError(f"{path}: unreadable DICOM ({exc})") from exc
        file_planes, file_rescales = planes_of(ds, str(path))
        frames = frame_pixels(ds, str(path))
        planes.extend(file_planes)
        rescales.extend(file_rescales)
        pixels.extend(frames)
    geometry = assess_planes(planes, rel_tol=options.rel_tol, tilt_tol_deg=options.tilt_tol_deg)
    if not geometry.ok:
        errors = [i.message for i in geometry.issues if i.severity is Severity.ERROR]
        raise SeriesGeometryError("; ".join(errors))
    ordered = [pixels[i] for i in geometry.order]
    ordered_rescales = [rescales[i] for i in geometry.order]
    raw_dtype = ordered[0].dtype
    if all(r.identity for r in ordered_rescales):
        stack = np.stack([p.T for p in ordered], axis=-1)
        lo, hi = float(stack.min()), float(stack.max())
        out_dtype = _output_dtype(raw_dtype, ordered_rescales, lo, hi)
        data = stack.astype(out_dtype, copy=False)
    else:
        values = np.stack(
            [p.T.astype(np.float64) * r.slope + r.intercept for p, r in zip(ordered, ordered_rescales)],
            axis=-1,
        )
        out_dtype = _output_dtype(raw_dtype, ordered_rescales, float(values.min()), float(values.max()))
        data = values.astype(out_dtype)
    if geometry.n_volumes > 1:
        cols, rows = data.shape[:2]
        data = data.reshape(cols, rows, geometry.n_volumes, geometry.n_slices).transpose(0, 1, 3, 2)
    sheared = any(i.code is IssueCode.GANTRY_TILT for i in geometry.issues)
    return Volume(
        data=data,
        affine=geometry.affine,
        geometry=geometry,
        planes=[planes[i] for i in geometry.order],
        plane_hashes=[_plane_hash(p) for p in ordered],
        sheared=sheared,
    )


def to_nifti(volume: Volume) -> nib.Nifti1Image:
    """Wrap a volume in a NIfTI-1 image with sform (and qform unless sheared) set to scanner.

    Args:
        volume: a converted series.

    Returns:
        The image (not yet saved).
    """
    img = nib.Nifti1Image(volume.data, volume.affine)
    img.header.set_sform(volume.affine, code=1)
    if volume.sheared:
        img.header.set_qform(None, code=0)  # a quaternion cannot hold a shear
    else:
        img.header.set_qform(volume.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = NIFTI_DESCRIP
    return img


def series_name(record: SeriesRecord) -> str:
    """Base file name of a series: ``<patient>_<series number>_<description or modality>``."""
    meta = record.meta
    number = meta.get("series_number")
    return "_".join(
        (
            artefacts.slug(str(meta.get("patient_id", "")), "unknown"),
            f"s{number}" if number is not None else "s-",
            artefacts.slug(str(meta.get("description") or meta.get("modality") or ""), "series"),
        )
    )


def _series_entry(record: SeriesRecord, root: Path) -> dict[str, Any]:
    meta = record.meta
    return {
        "series_uid": record.uid,
        "patient_id": meta.get("patient_id", ""),
        "study_uid": meta.get("study_uid", ""),
        "frame_of_reference_uid": meta.get("frame_of_reference_uid", ""),
        "series_number": meta.get("series_number"),
        "description": meta.get("description", ""),
        "modality": meta.get("modality", ""),
        "sop_class": meta.get("sop_class", ""),
        "n_files": len(record.files) + len(record.corrupt),
        "first_file": _rel(record.files[0] if record.files else Path(record.corrupt[0][0]), root),
    }


def _rel(path: Path | str, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def convert_discovered(
    discovery: Discovery,
    output_dir: str | Path,
    options: ConvertOptions = ConvertOptions(),
    progress: bool = False,
) -> dict[str, Any]:
    """Convert every series of a discovery and write the conversion summary.

    Args:
        discovery: result of :func:`discover_series`.
        output_dir: stage output folder (``nifti/`` and ``conversion.json`` go there).
        options: tolerances and switches.
        progress: show a tqdm bar over series.

    Returns:
        The summary that was written to ``conversion.json``.

    Raises:
        PrepConfigError: the output folder holds the conversion of another input.
    """
    out = Path(output_dir)
    root = discovery.root
    previous = out / artefacts.CONVERSION_JSON
    if previous.is_file():
        # a re-run of the same input may refresh its files; another input would mix two sites'
        # NIfTIs under one conversion.json that describes only the second
        before = artefacts.read_json(previous, "conversion summary").get("input")
        if before and before != str(root.resolve()):
            raise PrepConfigError(
                f"output folder {out} holds the conversion of {before}; convert {root} into another folder"
            )
    nifti_dir = out / artefacts.NIFTI_DIR
    nifti_dir.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if options.compress else ".nii"
    converted, skipped, used_names = [], [], set()
    for record in tqdm(discovery.series, desc="convert", unit="series", disable=not progress):
        entry = _series_entry(record, root)
        try:
            volume = load_series(record, options)
        except MonaiFLError as exc:
            entry["reason"] = str(exc).replace(f"{root}{os.sep}", "")  # paths relative to the input
            skipped.append(entry)
            continue
        name = series_name(record)
        if name in used_names:  # same patient/series number in two studies
            name = f"{name}_{hashlib.sha1(record.uid.encode()).hexdigest()[:6]}"
        used_names.add(name)
        rel_path = f"{artefacts.NIFTI_DIR}/{name}{suffix}"
        nib.save(to_nifti(volume), out / rel_path)
        entry.update(
            {
                "nifti": rel_path,
                "shape": list(volume.data.shape),
                "spacing": [round(s, 6) for s in volume.geometry.spacing],
                "dtype": volume.data.dtype.name,
                "orientation": "".join(nib.aff2axcodes(volume.affine)),
                "affine": np.round(volume.affine, 6).tolist(),
                "tilt_deg": round(volume.geometry.tilt_deg, 4),
                "issues": [i.as_dict() for i in volume.geometry.issues],
                "volume_sha1": artefacts.sha1_array(volume.data),
                "slices": [
                    {"source": _rel(p.source.split("#")[0], root) + _frame(p.source), "pixel_sha1": h}
                    for p, h in zip(volume.planes, volume.plane_hashes)
                ],
            }
        )
        if options.verify_dcm2niix:
            from preprocessing.dicom.reference import dcm2niix_reference

            try:
                entry["reference"] = dcm2niix_reference(record.files, volume.data, volume.affine)
            except PrepConfigError as exc:
                entry["reference"] = {"error": str(exc)}
        converted.append(entry)
    notes = [
        {**n.as_dict(), "path": _rel(n.path, root)}
        for n in discovery.notes
    ]
    summary = {
        "stage": "convert",
        "schema": artefacts.SCHEMA_VERSION,
        "input": str(root.resolve()),
        "counts": {
            "files": discovery.n_files,
            "series": len(discovery.series),
            "converted": len(converted),
            "skipped": len(skipped),
            **{
                kind: sum(1 for n in discovery.notes if n.kind == kind)
                for kind in (NoteKind.UNREADABLE, NoteKind.NON_IMAGE, NoteKind.DUPLICATE, NoteKind.IGNORED)
            },
        },
        "converted": converted,
        "skipped": skipped,
        "files_not_converted": notes,
    }
    artefacts.write_json(out / artefacts.CONVERSION_JSON, summary)
    return summary


def _frame(source: str) -> str:
    return "#" + source.split("#", 1)[1] if "#" in source else ""


def convert_tree(
    input_dir: str | Path,
    output_dir: str | Path,
    options: ConvertOptions = ConvertOptions(),
    progress: bool = False,
) -> dict[str, Any]:
    """Discover and convert every DICOM series under ``input_dir``.

    Args:
        input_dir: a site's DICOM folder tree (never modified).
        output_dir: where ``nifti/`` and ``conversion.json`` are written.
        options: tolerances and switches.
        progress: show tqdm bars.

    Returns:
        The conversion summary (also written to ``conversion.json``).

    Raises:
        PrepConfigError: the output folder lies inside the input folder.
        DataNotFoundError: the input folder does not exist.
    """
    if artefacts.is_within(output_dir, input_dir):
        raise PrepConfigError(
            f"output folder {output_dir} lies inside the input {input_dir}; choose another place"
        )
    discovery = discover_series(input_dir, progress=progress)
    return convert_discovered(discovery, output_dir, options, progress)


def format_summary(summary: dict[str, Any]) -> str:
    """Readable multi-line summary of a conversion (printed by the CLI).

    Args:
        summary: the dict returned by :func:`convert_tree`.

    Returns:
        Text ending without a newline.
    """
    c = summary["counts"]
    lines = [
        f"scanned {c['files']} files: {c['series']} image series, {c['converted']} converted, "
        f"{c['skipped']} skipped; {c['unreadable']} unreadable, {c['non_image']} non-image, "
        f"{c['duplicate']} duplicate, {c['ignored']} ignored (not DICOM)"
    ]
    for e in summary["converted"]:
        shape = "x".join(str(s) for s in e["shape"])
        spacing = "x".join(f"{s:g}" for s in e["spacing"])
        line = f"  converted {e['nifti']}  {shape} @ {spacing} mm  {e['dtype']} {e['orientation']}"
        ref = e.get("reference")
        if ref and "error" not in ref:
            line += (
                f"  dcm2niix: voxels {'equal' if ref['voxels_equal'] else 'DIFFER'}, "
                f"affine max diff {ref['max_affine_diff']:.1e}, corners {ref['max_corner_mm']:.1e} mm"
            )
        elif ref:
            line += f"  dcm2niix: {ref['error']}"
        lines.append(line)
        for issue in e["issues"]:
            if issue["severity"] != Severity.INFO.value:
                lines.append(f"    {issue['severity']}: {issue['message']}")
    for e in summary["skipped"]:
        label = e["description"] or e["series_uid"]
        lines.append(f"  skipped series {e['series_number']} {label!r} ({e['n_files']} files): {e['reason']}")
    for n in summary["files_not_converted"]:
        if n["kind"] != NoteKind.IGNORED:
            lines.append(f"  {n['kind']}: {n['path']}: {n['reason']}")
    return "\n".join(lines)
