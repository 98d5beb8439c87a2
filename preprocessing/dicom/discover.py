"""Find DICOM series in a folder tree, without decoding pixels.

Every file under the root ends up in exactly one place: a series (grouped by
SeriesInstanceUID), or a :class:`Note` saying why it was not used (not DICOM, unreadable,
no pixel data, duplicate instance). Nothing is silently dropped.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from tqdm import tqdm

from preprocessing.errors import DataNotFoundError

#: Extensions a site uses for DICOM; such a file that does not parse is reported as corrupt,
#: any other non-DICOM file (README, checksums) is only noted as ignored.
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
DEFER_SIZE = 1024  # bytes: header values larger than this (pixels, CSA blobs) stay on disk
DICOMDIR_REASON = "DICOMDIR (media directory), not an instance"


class NoteKind:
    """Categories of files that are not part of a converted series."""

    UNREADABLE = "unreadable"  # meant to be DICOM but broken (reported by name)
    IGNORED = "ignored"  # not DICOM at all
    NON_IMAGE = "non_image"  # valid DICOM without pixel data (RTSTRUCT, SR, ...)
    DUPLICATE = "duplicate"  # same SOPInstanceUID as an earlier file


@dataclass(frozen=True)
class Note:
    """Why one file is not part of a converted series."""

    path: str
    kind: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        """JSON-ready form."""
        return {"path": self.path, "kind": self.kind, "reason": self.reason}


@dataclass
class SeriesRecord:
    """Files of one SeriesInstanceUID and the header facts used to name and pair it.

    Attributes:
        uid: SeriesInstanceUID.
        files: instance files, sorted by path.
        corrupt: files of this series whose header parsed but whose content is broken
            (path, reason); a series with any is not converted.
        meta: a few header values of the first file (patient, study, description...).
    """

    uid: str
    files: list[Path] = field(default_factory=list)
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    meta: dict[str, object] = field(default_factory=dict)


@dataclass
class Discovery:
    """Result of :func:`discover_series`."""

    root: Path
    series: list[SeriesRecord]
    notes: list[Note]
    n_files: int

    def notes_of(self, kind: str) -> list[Note]:
        """Notes of one kind."""
        return [n for n in self.notes if n.kind == kind]


def iter_files(root: Path) -> list[Path]:
    """All regular files under ``root``, sorted, skipping hidden files and folders.

    Args:
        root: folder to walk.

    Returns:
        Sorted file paths.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(found)


def _meant_as_dicom(path: Path) -> bool:
    """A DICOM extension or the "DICM" magic at byte 128: the site meant this to be DICOM."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _meta(ds: pydicom.Dataset) -> dict[str, object]:
    sop = UID(str(ds.get("SOPClassUID", "")))
    return {
        "sop_class_uid": str(sop),
        "sop_class": sop.name if sop else "",
        "modality": str(ds.get("Modality", "")),
        "patient_id": str(ds.get("PatientID", "")),
        "study_uid": str(ds.get("StudyInstanceUID", "")),
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")),
        "series_number": int(ds.SeriesNumber) if ds.get("SeriesNumber") not in (None, "") else None,
        "description": str(ds.get("SeriesDescription", "")),
        "study_date": str(ds.get("StudyDate", "")),
    }


def _native_pixel_bytes(ds: pydicom.Dataset) -> int | None:
    """Bytes of uncompressed pixel data implied by the header, or None when compressed."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None or UID(str(ts)).is_compressed:
        return None
    try:
        n = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
        n *= int(ds.get("NumberOfFrames", 1) or 1)
        return (n * int(ds.BitsAllocated) + 7) // 8
    except (AttributeError, TypeError, ValueError):
        return None


def pixel_truncation(ds: pydicom.Dataset, path: Path) -> str | None:
    """Detect pixel data cut short (a truncated copy) without decoding it.

    pydicom reads a truncated file without complaint and only fails when pixels are decoded;
    comparing the stored length with what the header implies finds it at discovery time.

    Args:
        ds: dataset read with ``defer_size`` (PixelData may be a raw, unread element).
        path: the file it came from.

    Returns:
        A reason string, or None when the pixel data looks complete.
    """
    keyword = next((k for k in PIXEL_KEYWORDS if k in ds), None)
    if keyword is None:
        return None
    raw = ds.get_item(keyword)
    expected = _native_pixel_bytes(ds) if keyword == "PixelData" else None
    tell, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
    if getattr(raw, "value", None) is None and tell is not None and length not in (None, 0xFFFFFFFF):
        held = max(path.stat().st_size - tell, 0)  # deferred: compare with the file size
    else:
        value = raw.value
        held = len(value) if isinstance(value, (bytes, bytearray)) else None
    if held is None:
        return None
    if length not in (None, 0xFFFFFFFF) and held < length:
        return f"pixel data truncated: header declares {length} bytes, file holds {held}"
    if expected is not None and held < expected:
        return f"pixel data truncated: {held} bytes for {expected} implied by the image size"
    return None


def read_header(path: Path) -> tuple[pydicom.Dataset | None, Note | None]:
    """Read one file's header, classifying failures.

    Args:
        path: file to read.

    Returns:
        (dataset, None) for a DICOM file with the identifiers we need, else (None, note) or,
        for a truncated image, (dataset, note) so the note can be attached to its series.
    """
    try:
        ds = pydicom.dcmread(path, defer_size=DEFER_SIZE)
    except InvalidDicomError:
        # No preamble/"DICM": either not DICOM, or an old headerless file. Only accept a forced
        # read that produced real identifiers, otherwise any text file would "parse".
        try:
            ds = pydicom.dcmread(path, defer_size=DEFER_SIZE, force=True)
            if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
                raise InvalidDicomError("no SOP identifiers")
        except Exception:  # noqa: BLE001 - any parser failure means "not DICOM" here
            if _meant_as_dicom(path):
                return None, Note(str(path), NoteKind.UNREADABLE, "not a valid DICOM file")
            return None, Note(str(path), NoteKind.IGNORED, "not a DICOM file")
    except Exception as exc:  # noqa: BLE001 - pydicom raises OSError/EOFError/struct.error...
        return None, Note(str(path), NoteKind.UNREADABLE, f"unreadable DICOM ({exc})")
    if getattr(ds, "file_meta", None) is not None and ds.file_meta.get(
        "MediaStorageSOPClassUID"
    ) == "1.2.840.10008.1.3.10":
        return None, Note(str(path), NoteKind.NON_IMAGE, DICOMDIR_REASON)
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID") if k not in ds]
    if missing:
        return None, Note(
            str(path),
            NoteKind.UNREADABLE,
            f"incomplete header (no {', '.join(missing)}); the file is probably truncated",
        )
    if not any(k in ds for k in PIXEL_KEYWORDS):
        name = UID(str(ds.SOPClassUID)).name
        if "Image Storage" in name:  # an image class always has pixels: the file was cut short
            return None, Note(
                str(path), NoteKind.UNREADABLE, f"no pixel data in a {name} object; the file is probably truncated"
            )
        return None, Note(str(path), NoteKind.NON_IMAGE, f"no pixel data ({name})")
    if "SeriesInstanceUID" not in ds:
        return None, Note(str(path), NoteKind.UNREADABLE, "image without SeriesInstanceUID")
    truncated = pixel_truncation(ds, path)
    if truncated:
        return ds, Note(str(path), NoteKind.UNREADABLE, truncated)
    return ds, None


def discover_series(
    root: str | os.PathLike, progress: bool = False, files: Iterable[Path] | None = None
) -> Discovery:
    """Group the DICOM files under ``root`` into series.

    Args:
        root: folder tree of a site's DICOM export.
        progress: show a tqdm bar over files.
        files: explicit files to read instead of walking ``root`` (paths under ``root``).

    Returns:
        A :class:`Discovery` with series sorted by (patient, study, series number, uid).

    Raises:
        DataNotFoundError: ``root`` does not exist or is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataNotFoundError(f"DICOM input folder {root} does not exist or is not a folder")
    paths = list(files) if files is not None else iter_files(root)
    series: dict[str, SeriesRecord] = {}
    seen_sop: dict[str, Path] = {}
    truncated_sop: dict[str, tuple[SeriesRecord, tuple[str, str]]] = {}
    notes: list[Note] = []
    for path in tqdm(paths, desc="scan DICOM", unit="file", disable=not progress):
        ds, note = read_header(path)
        if note is not None:
            notes.append(note)
            if ds is not None:  # truncated image: remember it on its series
                rec = series.setdefault(str(ds.SeriesInstanceUID), SeriesRecord(str(ds.SeriesInstanceUID)))
                sop_uid = str(ds.SOPInstanceUID)
                if sop_uid not in seen_sop:  # else an intact copy already stands in for it
                    rec.corrupt.append((str(path), note.reason))
                    truncated_sop[sop_uid] = (rec, rec.corrupt[-1])
                rec.meta = rec.meta or _meta(ds)
            continue
        sop_uid = str(ds.SOPInstanceUID)
        if sop_uid in truncated_sop:
            # an intact copy of an instance seen truncated: the series is whole after all
            rec, entry = truncated_sop.pop(sop_uid)
            rec.corrupt.remove(entry)
        if sop_uid in seen_sop:
            notes.append(
                Note(
                    str(path),
                    NoteKind.DUPLICATE,
                    f"same SOPInstanceUID as {seen_sop[sop_uid]}; the first copy is used",
                )
            )
            continue
        seen_sop[sop_uid] = path
        uid = str(ds.SeriesInstanceUID)
        rec = series.setdefault(uid, SeriesRecord(uid))
        rec.files.append(path)
        if not rec.meta:
            rec.meta = _meta(ds)
    ordered = sorted(
        series.values(),
        key=lambda r: (
            str(r.meta.get("patient_id", "")),
            str(r.meta.get("study_uid", "")),
            r.meta.get("series_number") if r.meta.get("series_number") is not None else -1,
            r.uid,
        ),
    )
    for rec in ordered:
        rec.files.sort()
    return Discovery(root=root, series=ordered, notes=notes, n_files=len(paths))
