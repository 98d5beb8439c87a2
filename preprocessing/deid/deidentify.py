"""De-identify DICOM files with the PS3.15 Annex E Basic Application Level Confidentiality Profile.

What happens to each instance:
- every attribute of Table E.1-1 (:mod:`preprocessing.deid.annex_e`) is removed, emptied,
  replaced by a dummy or given a new UID, at any depth of nested sequences;
- private attributes are removed, except those on a site-approved safe list
  (Retain Safe Private Option);
- UIDs are remapped consistently for the whole run, so studies, series, frames of reference
  and references between instances stay linked;
- Patient ID and Patient's Name become one pseudonym per patient;
- optionally, dates are shifted by a per-patient number of days (Retain Longitudinal Temporal
  Information with Modified Dates Option); otherwise dates follow the Basic Profile;
- Patient Identity Removed = YES, De-identification Method and its Code Sequence are set, and
  the File Meta Information and the 128-byte preamble are rewritten.

Originals are only read. The re-identification map (pseudonyms, UID map, date shifts, source
paths) is written to a separate file that must stay at the site, outside the shared output.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import secrets
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, generate_uid
from tqdm import tqdm

from preprocessing import artefacts
from preprocessing.deid import annex_e
from preprocessing.dicom.discover import DICOMDIR_REASON, NoteKind, iter_files, read_header
from preprocessing.errors import DataNotFoundError, DeidentificationError, PrepConfigError

TOOL_NAME = "monai-fl prep deid"
METHOD_TEXT = "monai-fl: PS3.15 Annex E Basic Profile"
IMPLEMENTATION_VERSION = "MONAIFL_DEID_1"

_TEXT_DUMMY = "ANONYMIZED"
_DUMMY_BY_VR: Mapping[str, Any] = MappingProxyType({
    "AE": "ANON",
    "AS": "000Y",
    "CS": "ANON",
    "DA": "19000101",
    "DS": "0",
    "DT": "19000101000000",
    "IS": "0",
    "LO": _TEXT_DUMMY,
    "LT": _TEXT_DUMMY,
    "PN": _TEXT_DUMMY,
    "SH": "ANON",
    "ST": _TEXT_DUMMY,
    "TM": "000000",
    "UC": _TEXT_DUMMY,
    "UR": _TEXT_DUMMY,
    "UT": _TEXT_DUMMY,
    "OB": b"\x00\x00",
    "OW": b"\x00\x00",
    "OD": b"\x00" * 8,
    "OF": b"\x00" * 4,
    "OL": b"\x00" * 4,
    "OV": b"\x00" * 8,
    "UN": b"\x00\x00",
    "US": 0,
    "SS": 0,
    "UL": 0,
    "SL": 0,
    "UV": 0,
    "SV": 0,
    "FL": 0.0,
    "FD": 0.0,
    "AT": 0,
})

#: Modalities whose pixels often show names or dates (screen captures, ultrasound, fluoroscopy,
#: photographs); without an explicit BurnedInAnnotation=NO they are refused by default.
BURNED_IN_PRONE = frozenset({"US", "SC", "XA", "RF", "ES", "XC", "OT", "GM", "SM", "DOC"})

#: Direct identifiers a site may never ask to keep.
NEVER_KEEP = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientAddress",
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "PatientTelephoneNumbers",
        "MedicalRecordLocator",
        "AccessionNumber",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
    }
)


@dataclass(frozen=True)
class SafePrivate:
    """A private attribute approved by the site: (group, private creator, element low byte).

    ``0013:CTP:10`` keeps (0013,xx10) of the block reserved by creator "CTP".
    """

    group: int
    creator: str
    element: int

    @classmethod
    def parse(cls, text: str) -> SafePrivate:
        """Parse ``GGGG:CREATOR:EE`` (hex group and element byte).

        Raises:
            PrepConfigError: malformed text or an even (standard) group.
        """
        parts = text.split(":")
        try:
            group, creator, element = int(parts[0], 16), ":".join(parts[1:-1]), int(parts[-1], 16)
        except (ValueError, IndexError):
            raise PrepConfigError(
                f"safe private attribute {text!r} is not GGGG:CREATOR:EE (e.g. 0013:CTP:10)"
            ) from None
        if len(parts) < 3 or group % 2 == 0 or not creator or not 0 <= element <= 0xFF:
            raise PrepConfigError(
                f"safe private attribute {text!r} is not GGGG:CREATOR:EE with an odd group"
            )
        return cls(group, creator, element)


@dataclass(frozen=True)
class DeidOptions:
    """Choices of a de-identification run.

    Attributes:
        shift_dates: shift dates by a per-patient number of days instead of removing them.
        max_shift_days: shifts are drawn from [-max, -1] u [1, max].
        seed: makes pseudonym UIDs and shifts reproducible (keep it secret like the map).
        safe_private: private attributes to keep (Retain Safe Private Option).
        keep: keywords of profile attributes the site has reviewed and keeps (e.g.
            SeriesDescription); direct identifiers in :data:`NEVER_KEEP` are refused.
        pseudonym_prefix: pseudonyms are ``<prefix><0001>``.
        allow_burned_in: de-identify images flagged BurnedInAnnotation=YES, or of a modality in
            :data:`BURNED_IN_PRONE` without BurnedInAnnotation=NO (pixels are not cleaned!); by
            default such files are refused.
    """

    shift_dates: bool = False
    max_shift_days: int = 365
    seed: int | None = None
    safe_private: tuple[SafePrivate, ...] = ()
    keep: tuple[str, ...] = ()
    pseudonym_prefix: str = "P"
    allow_burned_in: bool = False

    def validate(self) -> None:
        """Refuse unsafe or meaningless options.

        Raises:
            PrepConfigError: unknown keyword, direct identifier in ``keep``, bad shift range.
        """
        for kw in self.keep:
            tag = tag_for_keyword(kw)
            if tag is None:
                raise PrepConfigError(f"--keep {kw}: not a DICOM keyword")
            if kw in NEVER_KEEP or dictionary_VR(tag) == "PN":
                raise PrepConfigError(f"--keep {kw}: a direct identifier cannot be kept")
        if self.shift_dates and self.max_shift_days < 1:
            raise PrepConfigError("--max-shift-days must be at least 1")
        if not artefacts.slug(self.pseudonym_prefix, "") == self.pseudonym_prefix:
            raise PrepConfigError(
                f"pseudonym prefix {self.pseudonym_prefix!r} must be letters, digits or '-'"
            )


@dataclass
class ReidMap:
    """Everything needed to re-identify: stays at the site, never shared.

    Attributes:
        patients: pseudonym -> {"PatientID", "PatientName", "date_shift_days"}.
        uids: original UID -> new UID.
        files: [{"source": original path, "output": de-identified path}].
        studies: original StudyInstanceUID -> output folder ``<pseudonym>/study-<n>``, so a
            later batch of the same study lands beside the first and never on another study.
        skipped: [{"source", "reason"}] of the latest run.
    """

    patients: dict[str, dict[str, Any]] = field(default_factory=dict)
    uids: dict[str, str] = field(default_factory=dict)
    files: list[dict[str, str]] = field(default_factory=list)
    studies: dict[str, str] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> ReidMap:
        """Load an existing map so a later run keeps the same pseudonyms, UIDs and folders."""
        data = artefacts.read_json(path, "re-identification map")
        return cls(
            data.get("patients", {}), data.get("uids", {}), data.get("files", []), data.get("studies", {}), []
        )

    def save(self, path: Path, options: DeidOptions) -> None:
        """Write the map with owner-only permissions."""
        artefacts.write_json(
            path,
            {
                "warning": "RE-IDENTIFICATION MAP: contains patient identifiers. Keep at the site.",
                "tool": TOOL_NAME,
                "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "options": {"shift_dates": options.shift_dates, "keep": list(options.keep)},
                "patients": self.patients,
                "uids": self.uids,
                "files": self.files,
                "studies": self.studies,
                "skipped": self.skipped,
            },
            mode=0o600,
        )

    def _by_identity(self) -> dict[str, str]:
        return {_identity_key(p["PatientID"], p["PatientName"]): k for k, p in self.patients.items()}


def _identity_key(patient_id: str, patient_name: str) -> str:
    """One patient = one Patient ID; the name only when there is no ID."""
    return f"id:{patient_id}" if patient_id.strip() else f"name:{patient_name}"


class Deidentifier:
    """Applies the profile to datasets; holds the per-run state (map, random source)."""

    def __init__(self, options: DeidOptions = DeidOptions(), reid: ReidMap | None = None):
        """Create a de-identifier.

        Args:
            options: run options (validated here).
            reid: an existing map to extend (new, empty one if None).
        """
        options.validate()
        self.options = options
        self.reid = reid if reid is not None else ReidMap()
        self._rng = random.Random(options.seed) if options.seed is not None else secrets.SystemRandom()
        self._actions = annex_e.profile_actions()
        for kw in options.keep:
            self._actions[tag_for_keyword(kw)] = "K"
        self._identity = self.reid._by_identity()
        self.counts: dict[str, int] = {}

    # --- identities -----------------------------------------------------------------
    def pseudonym(self, patient_id: str, patient_name: str) -> str:
        """The pseudonym of a patient, created on first sight.

        Args:
            patient_id: original Patient ID.
            patient_name: original Patient's Name.

        Returns:
            ``<prefix><nnnn>``, stable within the run (and across runs sharing a map).
        """
        key = _identity_key(patient_id, patient_name)
        if key not in self._identity:
            pseudo = f"{self.options.pseudonym_prefix}{len(self.reid.patients) + 1:04d}"
            shift = 0
            if self.options.shift_dates:
                shift = self._rng.randint(1, self.options.max_shift_days) * self._rng.choice((-1, 1))
            self.reid.patients[pseudo] = {
                "PatientID": patient_id,
                "PatientName": patient_name,
                "date_shift_days": shift,
            }
            self._identity[key] = pseudo
        return self._identity[key]

    def new_uid(self, uid: str) -> str:
        """Consistent replacement of one UID (same input -> same output for the run)."""
        uid = str(uid).strip()
        if not uid:
            return uid
        if uid not in self.reid.uids:
            if self.options.seed is not None:
                # keyed by the secret seed: reproducible, not reversible without it
                self.reid.uids[uid] = generate_uid(prefix=None, entropy_srcs=[str(self.options.seed), uid])
            else:
                self.reid.uids[uid] = generate_uid(prefix=None)
        return self.reid.uids[uid]

    # --- values ---------------------------------------------------------------------
    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    @staticmethod
    def _shift_one(value: str, vr: str, days: int) -> str:
        text = str(value).strip()
        if len(text) < 8 or not text[:8].isdigit():
            return ""  # partial or malformed date: cannot be shifted safely, so dropped
        try:
            day = dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
        except ValueError:
            return ""
        shifted = (day + dt.timedelta(days=days)).strftime("%Y%m%d")
        return shifted + text[8:] if vr == "DT" else shifted

    def _shift(self, elem: DataElement, days: int) -> None:
        if elem.VM == 0 or elem.value in (None, ""):
            return
        values = elem.value if elem.VM > 1 else [elem.value]
        shifted = [self._shift_one(v, elem.VR, days) for v in values]
        elem.value = shifted if elem.VM > 1 else shifted[0]
        self._count("dates_shifted")

    def _dummy(self, elem: DataElement, pseudo: str) -> Any:
        if elem.tag in (0x00100020, 0x00100010):  # Patient ID, Patient's Name
            return pseudo
        if elem.VR == "UI":
            return self.new_uid(str(elem.value)) if elem.value else generate_uid(prefix=None)
        return _DUMMY_BY_VR.get(elem.VR, _TEXT_DUMMY)

    def _apply(self, ds: Dataset, elem: DataElement, action: str, ctx: dict) -> None:
        tag, vr = elem.tag, elem.VR
        action = annex_e.resolve_action(action, vr)
        days = ctx["shift"]
        if (
            days is not None
            and vr in ("DA", "DT")
            and action in ("D", "Z", "X", "C")
            and int(tag) not in annex_e.NEVER_SHIFTED
        ):
            self._shift(elem, days)
            return
        if days is not None and vr == "TM" and action in ("D", "Z", "X", "C"):
            self._count("times_kept_with_shifted_dates")
            return  # whole-day shifts keep the time of day (Modified Dates Option)
        if action == "X":
            del ds[tag]
            self._count("removed")
        elif action == "Z":
            if tag in (0x00100010,):  # Patient's Name: Z allows a dummy; the pseudonym is kinder
                elem.value = ctx["pseudo"]
            elif vr == "SQ":
                elem.value = Sequence()
            else:
                elem.value = b"" if isinstance(elem.value, (bytes, bytearray)) else None
            self._count("emptied")
        elif action == "D" or action == "C":
            elem.value = self._dummy(elem, ctx["pseudo"])
            self._count("replaced")
        elif action == "U":
            if vr == "SQ":
                for item in elem.value:
                    self._clean(item, ctx)
            elif elem.VM > 1:
                elem.value = [self.new_uid(v) for v in elem.value]
            else:
                elem.value = self.new_uid(elem.value)
            self._count("uids_replaced")
        elif action == "K":
            if vr == "SQ":
                for item in elem.value:
                    self._clean(item, ctx)
        else:  # pragma: no cover - resolve_action only returns the letters above
            raise AssertionError(action)

    def _safe_private_blocks(self, ds: Dataset) -> set[tuple[int, int]]:
        """(group, block) pairs whose private creator is on the safe list."""
        blocks = set()
        wanted = {(s.group, s.creator) for s in self.options.safe_private}
        for elem in ds:
            tag = elem.tag
            if tag.is_private and 0x10 <= tag.element <= 0xFF and (tag.group, str(elem.value).strip()) in wanted:
                blocks.add((tag.group, tag.element))
        return blocks

    def _keep_private(self, ds: Dataset, elem: DataElement, blocks: set[tuple[int, int]]) -> bool:
        tag = elem.tag
        if not self.options.safe_private:
            return False
        if 0x10 <= tag.element <= 0xFF:  # a private creator: kept if its block is
            return (tag.group, tag.element) in blocks
        block = tag.element >> 8
        if (tag.group, block) not in blocks or elem.VR == "SQ":
            return False
        creator = str(ds[(tag.group << 16) | block].value).strip()
        return SafePrivate(tag.group, creator, tag.element & 0xFF) in self.options.safe_private

    def _clean(self, ds: Dataset, ctx: dict) -> None:
        blocks = self._safe_private_blocks(ds)
        for elem in list(ds):
            tag = elem.tag
            if tag.is_private:
                if self._keep_private(ds, elem, blocks):
                    self._count("private_kept")
                else:
                    del ds[tag]
                    self._count("private_removed")
                continue
            action = self._actions.get(int(tag)) or annex_e.repeating_group_action(int(tag))
            if action is None:
                self._unlisted(ds, elem, ctx)
            else:
                self._apply(ds, elem, action, ctx)

    def _unlisted(self, ds: Dataset, elem: DataElement, ctx: dict) -> None:
        """Attributes outside Table E.1-1: kept, with three safety nets (see module doc)."""
        if elem.VR == "SQ":
            for item in elem.value:
                self._clean(item, ctx)
        elif elem.VR == "PN" and elem.value:
            # a person's name is identifying whatever attribute carries it
            elem.value = None
            self._count("unlisted_names_emptied")
        elif elem.VR in ("DA", "DT") and elem.value:
            if ctx["shift"] is not None:
                self._shift(elem, ctx["shift"])
            else:
                elem.value = None
                self._count("unlisted_dates_emptied")

    # --- instances ------------------------------------------------------------------
    def dataset(self, ds: Dataset) -> str:
        """De-identify one dataset in place.

        Args:
            ds: a dataset read from a file (with file_meta).

        Returns:
            The patient's pseudonym.

        Raises:
            DeidentificationError: the image declares burned-in annotation, or is of a
                modality prone to it without declaring none, and the options do not allow it.
        """
        if not self.options.allow_burned_in:
            burned = str(ds.get("BurnedInAnnotation", "")).strip().upper()
            modality = str(ds.get("Modality", "")).strip().upper()
            if burned == "YES":
                raise DeidentificationError(
                    "BurnedInAnnotation=YES: pixel data may show identifying text; refused "
                    "(clean the pixels first, or pass --allow-burned-in after review)"
                )
            if burned != "NO" and modality in BURNED_IN_PRONE:
                raise DeidentificationError(
                    f"modality {modality} often carries burned-in text and BurnedInAnnotation is not "
                    "set to NO; refused (review or clean the pixels, then pass --allow-burned-in)"
                )
        pseudo = self.pseudonym(str(ds.get("PatientID", "")), str(ds.get("PatientName", "")))
        shift = self.reid.patients[pseudo]["date_shift_days"] if self.options.shift_dates else None
        self._clean(ds, {"pseudo": pseudo, "shift": shift})
        ds.PatientID = pseudo
        ds.PatientName = pseudo
        ds.PatientIdentityRemoved = "YES"
        # LO holds 64 characters but De-identification Method is multi-valued: one note each
        method = [METHOD_TEXT] + [f"kept after site review: {kw}" for kw in self.options.keep]
        ds.DeidentificationMethod = method if len(method) > 1 else method[0]
        codes = [annex_e.CODE_BASIC_PROFILE]
        if self.options.shift_dates:
            codes.append(annex_e.CODE_MODIFIED_DATES)
        if self.options.safe_private:
            codes.append(annex_e.CODE_SAFE_PRIVATE)
        items = []
        for value, scheme, meaning in codes:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        ds.LongitudinalTemporalInformationModified = "MODIFIED" if self.options.shift_dates else "REMOVED"
        self._new_file_meta(ds)
        return pseudo

    @staticmethod
    def _new_file_meta(ds: Dataset) -> None:
        """Rebuild File Meta Information: the original may name the sending application."""
        old = getattr(ds, "file_meta", None)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = old.TransferSyntaxUID if old is not None and "TransferSyntaxUID" in old else pydicom.uid.ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION
        ds.file_meta = meta
        ds.preamble = b"\x00" * 128


def _read_instance(path: Path) -> tuple[Dataset | None, str | None, bool]:
    """Read one file for de-identification.

    Returns:
        (dataset, None, _) for a composite instance; (None, reason, ignorable) otherwise, where
        ``ignorable`` marks a file that is plainly not DICOM (README, checksums) rather than a
        broken or unsupported DICOM file that must be reported by name.
    """
    _, note = read_header(path)
    # Non-image instances (SR, RTSTRUCT, ...) carry PHI too and are de-identified; a DICOMDIR
    # lists original paths and identifiers and is not an instance, so it is left behind.
    if note is not None and (note.kind != NoteKind.NON_IMAGE or note.reason == DICOMDIR_REASON):
        # truncated pixel data included: half an image is never passed on
        return None, note.reason, note.kind == NoteKind.IGNORED
    try:
        ds = pydicom.dcmread(path, force=True)  # full read: read_header defers large values
    except Exception as exc:  # noqa: BLE001 - pydicom raises OSError/EOFError/struct.error...
        return None, f"unreadable DICOM ({exc})", False
    if not ds.is_little_endian:
        return None, (
            "Explicit VR Big Endian (a retired transfer syntax) is not supported; convert it "
            "first, e.g. `dcmconv +te in.dcm out.dcm`"
        ), False
    return ds, None, False


def _identifiers(ds: Dataset) -> list[bytes]:
    """Original identifying strings whose bytes must not appear in the output file."""
    found = []
    for kw in ("PatientID", "PatientName", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs"):
        value = str(ds.get(kw, "") or "")
        for part in [value, *value.replace("^", " ").split()]:
            if len(part.strip()) >= 4:
                found.append(part.strip().encode("utf-8", "ignore"))
    return found


def _study_folder(reid: ReidMap, out: Path, pseudo: str, study_uid: str) -> str:
    """``<pseudonym>/study-<n>`` of a study: from the map, else the next number not yet used."""
    if study_uid in reid.studies:
        return reid.studies[study_uid]
    used = set(reid.studies.values())
    n = 1
    while f"{pseudo}/study-{n}" in used or (out / pseudo / f"study-{n}").exists():
        n += 1
    reid.studies[study_uid] = f"{pseudo}/study-{n}"
    return reid.studies[study_uid]


def _write_one(deid: Deidentifier, ds: Dataset, out: Path, last_index: dict[Path, int]) -> str:
    """De-identify one dataset and write it under ``out``; returns its relative path.

    ``last_index`` holds this run's last ``IM<n>`` per series folder, so a folder is listed once
    (when the run first writes to it, to go on after an earlier batch), not once per file.

    Raises:
        DeidentificationError: refused by the profile, or an identifier survived (the guard).
    """
    leaks = _identifiers(ds)
    study_uid = str(ds.get("StudyInstanceUID", ""))
    pseudo = deid.dataset(ds)
    number = ds.get("SeriesNumber")
    series_dir = (
        out
        / _study_folder(deid.reid, out, pseudo, study_uid)
        / f"series-{artefacts.slug(str(number) if number not in (None, '') else 'x')}-"
        f"{artefacts.slug(str(ds.get('Modality', '')), 'OT')}"
    )
    series_dir.mkdir(parents=True, exist_ok=True)
    if series_dir not in last_index:
        last_index[series_dir] = sum(1 for _ in series_dir.glob("IM*.dcm"))
    index = last_index[series_dir] + 1
    while (series_dir / f"IM{index:05d}.dcm").exists():
        index += 1
    dst = series_dir / f"IM{index:05d}.dcm"
    part = dst.with_name(dst.name + ".part")  # an interrupted write never looks like a result
    try:
        ds.save_as(part, enforce_file_format=True)
        blob = part.read_bytes()
        leaked = [
            s.decode("utf-8", "ignore")
            for s in leaks
            if s in blob and s.decode("utf-8", "ignore") not in (pseudo, _TEXT_DUMMY, "ANON")
        ]
        if leaked:
            # a guard, not the method: the profile should already have removed these
            raise DeidentificationError(f"identifier still present after de-identification: {leaked[0]!r}")
        os.replace(part, dst)
        last_index[series_dir] = index
    finally:
        part.unlink(missing_ok=True)
    return str(dst.relative_to(out))


def deidentify_tree(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    reid_map_path: str | os.PathLike,
    options: DeidOptions = DeidOptions(),
    progress: bool = False,
    files: Iterable[Path] | None = None,
    summary_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """De-identify every DICOM file under ``input_dir`` into ``output_dir``.

    Output layout: ``<out>/<pseudonym>/study-<n>/series-<number>-<modality>/IM<nnnnn>.dcm``;
    no original name, ID or description reaches a path. A summary without identifiers is
    written to ``summary_path`` (default ``<out>/deid_summary.json``); the re-identification
    map (extended if it exists) to ``reid_map_path``.

    Args:
        input_dir: original DICOM tree (only read).
        output_dir: new folder for de-identified files; must not overlap the input.
        reid_map_path: site-private JSON file; must lie outside ``output_dir``.
        options: see :class:`DeidOptions`.
        progress: show a tqdm bar.
        files: explicit files under ``input_dir`` (default: all files).
        summary_path: where to write the summary JSON.

    Returns:
        The summary (counts, skipped files with reasons, output files).

    Raises:
        DeidentificationError: the map would be written into the shared output, the output
            overlaps the input, or the output holds patients of another map.
        DataNotFoundError: the input folder does not exist.
    """
    src, out, map_path = Path(input_dir), Path(output_dir), Path(reid_map_path)
    if not src.is_dir():
        raise DataNotFoundError(f"DICOM input folder {src} does not exist or is not a folder")
    if artefacts.is_within(out, src) or artefacts.is_within(src, out):
        raise DeidentificationError(
            f"output {out} and input {src} overlap; originals must stay untouched"
        )
    if artefacts.is_within(map_path, out) or artefacts.is_within(map_path, src):
        raise DeidentificationError(
            f"re-identification map {map_path} must be outside the output and input folders "
            f"(it holds patient identifiers and stays at the site)"
        )
    reid = ReidMap.load(map_path) if map_path.exists() else ReidMap()
    foreign = sorted(  # patient folders (<pseudonym>/study-<n>/) that another map wrote
        p.name
        for p in (out.iterdir() if out.is_dir() else [])
        if p.is_dir() and p.name not in reid.patients and any(p.glob("study-*"))
    )
    if foreign:
        # pseudonyms are numbered per map: another map's P0001 is another patient
        raise DeidentificationError(
            f"output {out} already holds de-identified patients ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}) that the re-identification map {map_path} does not "
            "know; pass the map of that earlier run, or choose an empty output folder"
        )
    deid = Deidentifier(options, reid)
    done = {f["source"]: f["output"] for f in reid.files}
    last_index: dict[Path, int] = {}
    written, skipped, ignored, already = [], [], 0, 0
    paths = list(files) if files is not None else iter_files(src)
    if not paths:
        print(f"warning: no files under {src}", file=sys.stderr)
    try:
        for path in tqdm(paths, desc="de-identify", unit="file", disable=not progress):
            previous = done.get(str(path.resolve()))
            if previous is not None and (out / previous).is_file():
                already += 1  # a re-run resumes: never a second copy, never an overwrite
                continue
            ds, problem, ignorable = _read_instance(path)
            if ds is None:
                if ignorable:
                    ignored += 1
                else:
                    skipped.append({"source": str(path), "reason": problem})
                continue
            try:
                rel = _write_one(deid, ds, out, last_index)
            except DeidentificationError as exc:
                skipped.append({"source": str(path), "reason": str(exc)})
                continue
            except Exception as exc:  # noqa: BLE001 - one odd file must not stop the site's run
                skipped.append({"source": str(path), "reason": f"could not be de-identified ({type(exc).__name__}: {exc})"})
                continue
            reid.files.append({"source": str(path.resolve()), "output": rel})
            written.append(rel)
    finally:
        # even on Ctrl-C or a crash: the files already written stay re-identifiable
        reid.skipped = skipped
        reid.save(map_path, options)
    summary = {
        "stage": "deid",
        "schema": artefacts.SCHEMA_VERSION,
        "profile": "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile",
        "options": {
            "shift_dates": options.shift_dates,
            "safe_private": [f"{s.group:04X}:{s.creator}:{s.element:02X}" for s in options.safe_private],
            "keep": list(options.keep),
        },
        "counts": {
            "files": len(paths),
            "written": len(written),
            "skipped": len(skipped),
            "ignored_not_dicom": ignored,
            "already_done": already,
            "patients": len({w.split("/")[0] for w in written}),
            **dict(sorted(deid.counts.items())),
        },
        "outputs": written,
    }
    # Skipped files are listed by source path only in the site-private map and the return value.
    artefacts.write_json(summary_path or out / artefacts.DEID_SUMMARY_JSON, summary)
    return {**summary, "skipped": skipped}


def format_summary(summary: dict[str, Any]) -> str:
    """Readable summary of a de-identification run (printed by the CLI)."""
    c = summary["counts"]
    run = ("files", "written", "skipped", "ignored_not_dicom", "already_done", "patients")
    actions = ", ".join(f"{k} {v}" for k, v in c.items() if k not in run)
    lines = [
        f"de-identified {c['written']} of {c['files']} files for {c['patients']} patient(s); "
        f"{c['skipped']} skipped, {c['ignored_not_dicom']} ignored (not DICOM)"
        + (f", {c['already_done']} already de-identified by an earlier run" if c.get("already_done") else "")
    ]
    if actions:
        lines.append(f"  actions: {actions}")
    lines += [f"  skipped {s['source']}: {s['reason']}" for s in summary.get("skipped", [])]
    return "\n".join(lines)


__all__ = [
    "DeidOptions",
    "Deidentifier",
    "ReidMap",
    "SafePrivate",
    "deidentify_tree",
    "format_summary",
]
