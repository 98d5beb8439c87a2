"""De-identification: PHI injected into every Annex E attribute must not survive, byte for byte."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pydicom
import pytest
from prep_helpers import bundled, copy_series
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from preprocessing.deid import annex_e
from preprocessing.deid.deidentify import Deidentifier, DeidOptions, SafePrivate, deidentify_tree
from preprocessing.dicom.convert import convert_tree
from preprocessing.errors import DeidentificationError, PrepConfigError

DATE, TIME, DATETIME = "19310217", "101112.131415", "19310217101112"
DS_MARK, IS_MARK, NUM_MARK = "31415.92653", "27182818", 31337
PRIVATE_MARK = "PHIPRIVATEVALUE1"


def _vr(tag: int, keyword: str) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:  # attributes newer than pydicom's dictionary
        vr = "SQ" if keyword.endswith("Sequence") else "DT" if "DateTime" in keyword else "LO"
    return vr.split(" or ")[0]


def _marker_element(tag: int, keyword: str, action: str, n: int) -> tuple[DataElement, bytes | None]:
    """An element full of PHI for ``tag`` and the bytes that must not appear in the output."""
    vr = _vr(tag, keyword)
    text = f"PHI{tag:08X}"
    uid = f"1.2.826.0.1.3680043.10.999.{n}"
    if vr == "SQ":
        item = Dataset()
        item.ReferencedSOPClassUID = pydicom.uid.CTImageStorage
        item.ReferencedSOPInstanceUID = uid
        if action != "X/Z/U*":  # those hold only references: their items keep unlisted codes
            item.CodeMeaning = text + "SQ"
        return DataElement(tag, vr, Sequence([item])), uid.encode()
    values = {
        "DA": DATE, "TM": TIME, "DT": DATETIME, "DS": DS_MARK, "IS": IS_MARK, "AS": "077Y", "UI": uid,
        "UR": f"http://phi.example/{text}", "PN": f"{text}^Jane",
    }
    if vr in values:
        value = values[vr]
        return DataElement(tag, vr, value), (uid if vr == "UI" else value.split("^")[0]).encode()
    if vr in ("OB", "OW", "UN", "OD", "OF", "OL", "OV"):
        blob = f"{text}XXXXX".encode()  # 16 bytes: valid length for every binary VR
        return DataElement(tag, vr, blob), blob
    if vr in ("US", "SS", "UL", "SL", "FL", "FD", "AT"):
        return DataElement(tag, vr, NUM_MARK), None  # checked on the parsed output instead
    return DataElement(tag, vr, text), text.encode()


def phi_dataset() -> tuple[Dataset, dict[int, bytes], list[int]]:
    """CT_small with PHI in every Table E.1-1 attribute, overlays/curves and private tags."""
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    markers: dict[int, bytes] = {}
    numeric: list[int] = []
    for n, (tag, keyword, action) in enumerate(annex_e.BASIC_PROFILE):
        if tag >> 16 in (0x0000, 0x0002):
            continue  # command / file-meta groups cannot live in a stored dataset (meta: see below)
        elem, marker = _marker_element(tag, keyword, action, n)
        ds[tag] = elem
        if marker is None:
            numeric.append(tag)
        else:
            markers[tag] = marker
    # repeating groups: overlay data/comments and curve data
    ds.add_new(0x60003000, "OW", b"PHIOVERLAYDATA00")
    ds.add_new(0x60024000, "LT", "PHIOVERLAYCOMMENT")
    ds.add_new(0x50003000, "OB", b"PHICURVEDATA0000")
    markers.update({0x60003000: b"PHIOVERLAYDATA00", 0x60024000: b"PHIOVERLAYCOMMENT", 0x50003000: b"PHICURVEDATA0000"})
    # private tags, top level and inside an unlisted (kept, cleaned) sequence
    block = ds.private_block(0x0009, "PHI CREATOR", create=True)
    block.add_new(0x01, "LO", PRIVATE_MARK)
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "T-A0100", "SRT", "Brain"
    region.private_block(0x0011, "NESTED CREATOR", create=True).add_new(0x02, "LO", "PHINESTEDPRIVATE")
    ds.AnatomicRegionSequence = Sequence([region])
    markers.update({0x00091001: PRIVATE_MARK.encode(), 0x00111002: b"PHINESTEDPRIVATE"})
    markers[0x00080018] = str(ds.SOPInstanceUID).encode()  # also in the file meta
    ds.file_meta.SourceApplicationEntityTitle = "PHISENDERAE"
    markers[0x00020016] = b"PHISENDERAE"
    ds.preamble = b"PHIPREAMBLE".ljust(128, b"\x00")
    markers[0] = b"PHIPREAMBLE"
    return ds, markers, numeric


def _md5s(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_phi_in_every_annex_e_attribute_is_gone(tmp_path):
    ds, markers, numeric = phi_dataset()
    assert tag_for_keyword("AnatomicRegionSequence") not in annex_e.profile_actions()
    src = tmp_path / "in"
    src.mkdir()
    ds.save_as(src / "phi.dcm", enforce_file_format=True)
    raw = (src / "phi.dcm").read_bytes()
    present = {t: m for t, m in markers.items() if m in raw}
    assert len(present) == len(markers) > 600  # every marker really is in the input
    before = _md5s(src)

    summary = deidentify_tree(src, tmp_path / "out", tmp_path / "site" / "reid.json")
    assert summary["counts"]["written"] == 1 and summary["skipped"] == []
    (out_file,) = (tmp_path / "out").rglob("*.dcm")
    blob = out_file.read_bytes()
    leaked = {f"{t:08X}": m for t, m in markers.items() if m in blob}
    assert leaked == {}
    assert _md5s(src) == before  # originals untouched

    out = pydicom.dcmread(out_file)
    for tag in numeric:
        assert tag not in out or out[tag].value in (None, b"", 0, [], ""), f"{tag:08X} kept {out[tag].value!r}"
    assert not any(e.tag.is_private for e in out.iterall())
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.preamble == b"\x00" * 128
    assert out.AnatomicRegionSequence[0].CodeMeaning == "Brain"  # unlisted content is kept
    assert str(out.PatientID) == str(out.PatientName) == "P0001"


@pytest.mark.parametrize(
    "keyword, check",
    [
        ("AccessionNumber", lambda v: v in ("", None)),  # Z
        ("InstitutionName", lambda v: v == "ANONYMIZED"),  # X/Z/D -> D
        ("SeriesDescription", lambda v: v is None),  # X
        ("StudyDate", lambda v: v in ("", None)),  # Z
        ("SeriesDate", lambda v: v == "19000101"),  # X/D -> D
        ("StudyInstanceUID", lambda v: v.startswith("2.25.")),  # U
        ("PatientID", lambda v: v == "P0001"),  # Z/D -> pseudonym
    ],
)
def test_actions_on_parsed_output(tmp_path, keyword, check):
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    ds.InstitutionName, ds.SeriesDescription, ds.SeriesDate = "Hospital", "desc", "20040101"
    Deidentifier(DeidOptions(seed=1)).dataset(ds)
    assert check(ds[keyword].value if keyword in ds else None)


@pytest.mark.parametrize(
    "action, vr, resolved",
    [("X/Z", "LO", "Z"), ("X/D", "LO", "D"), ("Z/D", "DA", "D"), ("X/Z/D", "SQ", "Z"), ("X/Z/U*", "SQ", "U"),
     ("X/Z/U*", "UI", "U"), ("X/Z/U*", "LO", "Z"), ("D", "SQ", "Z"), ("X", "PN", "X"), ("U", "UI", "U")],
)
def test_resolve_action(action, vr, resolved):
    assert annex_e.resolve_action(action, vr) == resolved


def test_profile_table_is_real_and_complete():
    table = annex_e.BASIC_PROFILE
    tags = [t for t, _, _ in table]
    assert len(table) >= 600 and len(set(tags)) == len(tags) and tags == sorted(tags)
    assert {a for _, _, a in table} <= set(annex_e.BASIC + annex_e.COMBINED)
    for tag, keyword, _ in table:  # keywords are pydicom's wherever pydicom knows the tag
        known = pydicom.datadict.keyword_for_tag(tag)
        assert not known or known == keyword
    expected = {
        "PatientName": "Z", "PatientID": "Z/D", "PatientBirthDate": "Z", "PatientSex": "Z", "PatientAge": "X",
        "StudyInstanceUID": "U", "SeriesInstanceUID": "U", "SOPInstanceUID": "U", "FrameOfReferenceUID": "U",
        "AccessionNumber": "Z", "StudyDate": "Z", "ContentDate": "Z/D", "InstitutionName": "X/Z/D",
        "ReferringPhysicianName": "Z", "SeriesDescription": "X", "ReferencedImageSequence": "X/Z/U*",
        "OtherPatientIDsSequence": "X", "DeviceSerialNumber": "X/Z/D",
    }
    actions = {k: a for _, k, a in table}
    assert {k: actions[k] for k in expected} == expected


def test_uids_remapped_consistently_and_geometry_kept(tmp_path, dicom_study, converted_study):
    reid = tmp_path / "site" / "reid.json"
    summary = deidentify_tree(dicom_study, tmp_path / "deid", reid, DeidOptions(keep=("SeriesDescription",)))
    assert summary["counts"]["written"] == 125 and summary["counts"]["patients"] == 1
    files = sorted((tmp_path / "deid").rglob("*.dcm"))
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    originals = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(dicom_study.rglob("*.dcm"))]
    assert len({h.StudyInstanceUID for h in headers}) == 1 and len({h.FrameOfReferenceUID for h in headers}) == 1
    assert len({h.SeriesInstanceUID for h in headers}) == 5 and len({h.SOPInstanceUID for h in headers}) == 125
    old_uids = {str(o.get(k)) for o in originals for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")}
    new_uids = {str(h.get(k)) for h in headers for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")}
    assert not old_uids & new_uids
    mapping = json.loads(reid.read_text())
    assert {mapping["uids"][u] for u in old_uids} == new_uids  # the map reverses every UID
    assert mapping["patients"]["P0001"]["PatientID"] == "PGBM-001"
    assert reid.stat().st_mode & 0o777 == 0o600
    assert not any(p.name == "reid.json" for p in (tmp_path / "deid").rglob("*"))
    assert "PGBM" not in json.dumps(json.loads((tmp_path / "deid" / "deid_summary.json").read_text()))
    # the de-identified series convert to the same voxels and affines as the originals
    conv = convert_tree(tmp_path / "deid", tmp_path / "conv")
    orig_summary, orig_out = converted_study
    before = {e["description"]: e for e in orig_summary["converted"]}
    for entry in conv["converted"]:
        ref = before[entry["description"]]
        assert entry["volume_sha1"] == ref["volume_sha1"] and entry["affine"] == ref["affine"]
        assert entry["nifti"].startswith("nifti/P0001_")


def test_date_shift_is_per_patient_and_consistent(tmp_path, series_dirs):
    src = copy_series(series_dirs["T1post"], tmp_path / "in" / "a")
    reid = tmp_path / "site" / "reid.json"
    deidentify_tree(tmp_path / "in", tmp_path / "out", reid, DeidOptions(shift_dates=True, seed=7))
    shift = json.loads(reid.read_text())["patients"]["P0001"]["date_shift_days"]
    assert 1 <= abs(shift) <= 365
    import datetime as dt

    expected = (dt.date(1991, 11, 19) + dt.timedelta(days=shift)).strftime("%Y%m%d")
    outs = [pydicom.dcmread(f, stop_before_pixels=True) for f in (tmp_path / "out").rglob("*.dcm")]
    assert {o.StudyDate for o in outs} == {expected} and len(outs) == len(list(src.glob("*.dcm")))
    assert {o.LongitudinalTemporalInformationModified for o in outs} == {"MODIFIED"}
    assert {c.CodeValue for c in outs[0].DeidentificationMethodCodeSequence} == {"113100", "113107"}
    assert all(not o.get("PatientBirthDate") for o in outs)  # never shifted, stays removed


def test_rerun_with_existing_map_keeps_pseudonyms_and_uids(tmp_path):
    shutil.copy(bundled("CT_small.dcm"), tmp_path / "ct.dcm")
    src = tmp_path / "in"
    src.mkdir()
    shutil.move(tmp_path / "ct.dcm", src / "ct.dcm")
    reid = tmp_path / "reid.json"
    deidentify_tree(src, tmp_path / "out1", reid)
    deidentify_tree(src, tmp_path / "out2", reid)
    a, b = (pydicom.dcmread(next((tmp_path / d).rglob("*.dcm"))) for d in ("out1", "out2"))
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.PatientID == b.PatientID == "P0001"


def test_safe_private_attribute_is_kept(tmp_path, series_dirs):
    copy_series(series_dirs["MaskTumor"], tmp_path / "in")
    deidentify_tree(tmp_path / "in", tmp_path / "out", tmp_path / "reid.json", DeidOptions(safe_private=(SafePrivate.parse("0013:CTP:10"),)))
    out = pydicom.dcmread(next((tmp_path / "out").rglob("*.dcm")))
    private = {(e.tag.group, e.tag.element): e.value for e in out if e.tag.is_private}
    assert private == {(0x0013, 0x0010): "CTP", (0x0013, 0x1010): "Brain-Tumor-Progression"}
    assert {c.CodeValue for c in out.DeidentificationMethodCodeSequence} == {"113100", "113111"}


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda t: (t / "in", t / "out", t / "out" / "reid.json", DeidOptions()), DeidentificationError, "must be outside"),
        (lambda t: (t / "in", t / "in" / "out", t / "reid.json", DeidOptions()), DeidentificationError, "overlap"),
        (lambda t: (t / "in", t / "out", t / "reid.json", DeidOptions(keep=("PatientName",))), PrepConfigError, "direct identifier"),
        (lambda t: (t / "in", t / "out", t / "reid.json", DeidOptions(keep=("NoSuchKeyword",))), PrepConfigError, "not a DICOM keyword"),
    ],
    ids=["map-in-output", "output-in-input", "keep-name", "keep-unknown"],
)
def test_unsafe_options_are_refused(tmp_path, make, error, match):
    (tmp_path / "in").mkdir()
    with pytest.raises(error, match=match):
        deidentify_tree(*make(tmp_path))


def test_safe_private_spec_is_validated():
    with pytest.raises(PrepConfigError, match="GGGG:CREATOR:EE"):
        SafePrivate.parse("0012:CTP:10")  # even group: not private


def test_burned_in_annotation_is_refused_unless_allowed(tmp_path):
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    ds.BurnedInAnnotation = "YES"
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "burned.dcm", enforce_file_format=True)
    refused = deidentify_tree(tmp_path / "in", tmp_path / "out", tmp_path / "reid.json")
    assert refused["counts"]["written"] == 0 and "BurnedInAnnotation=YES" in refused["skipped"][0]["reason"]
    allowed = deidentify_tree(tmp_path / "in", tmp_path / "out2", tmp_path / "reid2.json", DeidOptions(allow_burned_in=True))
    assert allowed["counts"]["written"] == 1
