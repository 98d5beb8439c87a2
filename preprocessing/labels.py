"""Label sources and their pairing with images (shared by the quality and datalist stages).

Three sources:
- ``series``: a regular expression that picks label *series* among the converted ones (e.g.
  ``Mask`` for the expert tumour mask); each image is paired with the label series of the
  same patient, study and frame of reference;
- ``directory``: a folder of label NIfTI files named like the images (MSD ``labelsTr``), or
  with a ``_seg``/``_label``/``_mask`` suffix;
- ``csv``: image-level classes for classification, columns ``image`` (file name, stem or
  patient ID) and ``label`` (an integer or a class name).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from preprocessing.errors import DataFormatError, DataNotFoundError, PrepConfigError
from preprocessing.inventory import ImageItem, nifti_files, strip_nifti_suffix

LABEL_SUFFIXES = ("", "_seg", "_label", "_labels", "_mask", "-seg", "-label", "-mask")


class LabelKind:
    """What a label is."""

    NONE = "none"
    SEGMENTATION = "segmentation"  # a label map file per image
    CLASSIFICATION = "classification"  # an integer class per image


@dataclass(frozen=True)
class LabelSpec:
    """Where labels come from (at most one source).

    Attributes:
        series_pattern: regex (case-insensitive) selecting label series among converted ones.
        directory: folder of label NIfTI files.
        csv: CSV of image-level classes.
        names: class names by value (``{0: "background", 1: "tumour"}``), optional.
    """

    series_pattern: str | None = None
    directory: Path | None = None
    csv: Path | None = None
    names: dict[int, str] | None = None

    def validate(self) -> None:
        """Refuse several sources at once or an invalid regex.

        Raises:
            PrepConfigError: with the offending option.
        """
        given = [s for s in (self.series_pattern, self.directory, self.csv) if s]
        if len(given) > 1:
            raise PrepConfigError("give one label source: --label-series, --labels or --labels-csv")
        if self.series_pattern:
            try:
                re.compile(self.series_pattern)
            except re.error as exc:
                raise PrepConfigError(f"--label-series {self.series_pattern!r} is not a valid regex ({exc})") from None

    @property
    def kind(self) -> str:
        """The label kind this source yields."""
        if self.csv:
            return LabelKind.CLASSIFICATION
        if self.series_pattern or self.directory:
            return LabelKind.SEGMENTATION
        return LabelKind.NONE


@dataclass
class Pairing:
    """Images with their labels.

    Attributes:
        kind: a :class:`LabelKind` value.
        images: the image items (label series removed).
        labels: image id -> label path (segmentation) or class index (classification).
        orphans: labels that matched no image (paths or CSV keys).
        ambiguous: image id -> note when several labels matched (the first is used).
        class_names: class index -> name.
    """

    kind: str
    images: list[ImageItem]
    labels: dict[str, Path | int] = field(default_factory=dict)
    orphans: list[str] = field(default_factory=list)
    ambiguous: dict[str, str] = field(default_factory=dict)
    class_names: dict[int, str] = field(default_factory=dict)

    def label_of(self, item: ImageItem) -> Path | int | None:
        """The item's label, or None."""
        return self.labels.get(item.id)


def parse_label_names(text: str | None) -> dict[int, str] | None:
    """Parse ``0=background,1=tumour``.

    Raises:
        PrepConfigError: malformed text.
    """
    if not text:
        return None
    names = {}
    for part in text.split(","):
        key, sep, name = part.partition("=")
        if not sep or not key.strip().isdigit() or not name.strip():
            raise PrepConfigError(f"--label-names {text!r}: expected VALUE=NAME pairs like 0=background,1=tumour")
        names[int(key)] = name.strip()
    return names


def _pair_series(items: Sequence[ImageItem], spec: LabelSpec) -> Pairing:
    rx = re.compile(spec.series_pattern, re.IGNORECASE)
    label_items = [i for i in items if rx.search(i.match_text)]
    images = [i for i in items if not rx.search(i.match_text)]
    pairing = Pairing(LabelKind.SEGMENTATION, images)
    used = set()
    for img in images:
        candidates = [lab for lab in label_items if lab.group_key == img.group_key]
        if not candidates:
            continue
        pairing.labels[img.id] = candidates[0].image
        used.add(candidates[0].id)
        if len(candidates) > 1:
            pairing.ambiguous[img.id] = (
                f"{len(candidates)} label series match ({', '.join(c.id for c in candidates)}); "
                f"{candidates[0].id} used"
            )
    pairing.orphans = [str(lab.image) for lab in label_items if lab.id not in used]
    return pairing


def _pair_directory(items: Sequence[ImageItem], spec: LabelSpec) -> Pairing:
    files = nifti_files(spec.directory)
    by_stem = {strip_nifti_suffix(p.name): p.resolve() for p in files}
    pairing = Pairing(LabelKind.SEGMENTATION, list(items))
    used = set()
    for img in items:
        for suffix in LABEL_SUFFIXES:
            stem = img.id + suffix
            if stem in by_stem:
                pairing.labels[img.id] = by_stem[stem]
                used.add(stem)
                break
    pairing.orphans = [str(p) for stem, p in sorted(by_stem.items()) if stem not in used]
    return pairing


def _pair_csv(items: Sequence[ImageItem], spec: LabelSpec) -> Pairing:
    path = Path(spec.csv)
    if not path.is_file():
        raise DataNotFoundError(f"label CSV {path} does not exist")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"image", "label"} <= set(rows[0]):
        raise DataFormatError(f"label CSV {path} needs a header with columns 'image' and 'label'")
    raw = {r["image"].strip(): r["label"].strip() for r in rows}
    values = sorted(set(raw.values()))
    if all(v.lstrip("-").isdigit() for v in values):
        to_index = {v: int(v) for v in values}
        names = spec.names or {int(v): f"class_{v}" for v in values}
    else:
        # class names: indices follow the --label-names order if given, else alphabetical
        order = [spec.names[k] for k in sorted(spec.names)] if spec.names else values
        unknown = sorted(set(values) - set(order))
        if unknown:
            raise DataFormatError(f"label CSV {path}: classes {unknown} are not in --label-names")
        to_index = {name: order.index(name) for name in values}
        names = dict(enumerate(order))
    pairing = Pairing(LabelKind.CLASSIFICATION, list(items), class_names=names)
    used = set()
    for img in items:
        for key in (img.image.name, img.id, str(img.meta.get("patient_id", ""))):
            if key and key in raw:
                pairing.labels[img.id] = to_index[raw[key]]
                used.add(key)
                break
    pairing.orphans = sorted(k for k in raw if k not in used)
    return pairing


def pair_labels(items: Sequence[ImageItem], spec: LabelSpec) -> Pairing:
    """Pair images with labels from the given source.

    Args:
        items: the site's images.
        spec: the label source (may be empty: no labels).

    Returns:
        A :class:`Pairing`; images without a label are simply absent from ``labels``.

    Raises:
        PrepConfigError: invalid spec, or a label source that pairs no image at all (a wrong
            pattern or naming, not a data-quality finding).
        DataNotFoundError: the label folder/CSV does not exist.
        DataFormatError: the CSV is malformed.
    """
    spec.validate()
    if spec.series_pattern:
        pairing = _pair_series(items, spec)
    elif spec.directory:
        pairing = _pair_directory(items, spec)
    elif spec.csv:
        pairing = _pair_csv(items, spec)
    else:
        return Pairing(LabelKind.NONE, list(items))
    if spec.names and pairing.kind == LabelKind.SEGMENTATION:
        pairing.class_names = dict(spec.names)
    if items and not pairing.labels:
        raise PrepConfigError(_nothing_paired(items, spec, pairing))
    return pairing


def _nothing_paired(items: Sequence[ImageItem], spec: LabelSpec, pairing: Pairing) -> str:
    """Why a label source paired no image, with the likely fix."""
    if spec.series_pattern:
        names = sorted({i.match_text for i in items})
        hint = ""
        if not any(i.meta.get("description") for i in items):
            hint = (
                "; the series have no description (de-identification removes SeriesDescription): "
                "de-identify with --keep SeriesDescription after review, or match on series number"
            )
        elif not pairing.orphans:
            hint = "; it matched no series at all"
        else:
            hint = "; the matched label series share no patient/study/frame of reference with an image"
        return (
            f"--label-series {spec.series_pattern!r} paired no image with a label{hint}. "
            f"Converted series: {'; '.join(names[:6])}{' ...' if len(names) > 6 else ''}"
        )
    source = f"--labels {spec.directory}" if spec.directory else f"--labels-csv {spec.csv}"
    examples = ", ".join(i.id for i in items[:3])
    return (
        f"{source} paired no image with a label: label names must match the image names "
        f"(e.g. {examples}{', ...' if len(items) > 3 else ''})"
        + (f"; unmatched labels: {', '.join(pairing.orphans[:3])}" if pairing.orphans else "")
    )
