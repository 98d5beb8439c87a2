"""Data-quality report of one site: completeness, duplicates, consistency, outliers, labels.

Stage artefact: ``quality.json`` (read by the datalist stage, which leaves out images with
errors) plus the same content as ``quality.md`` and ``quality.html`` for people.

Severity of findings:
- error: the image must not be used (unreadable, non-finite values, duplicate of another
  image, label on another grid, label values that are not classes);
- warning: usable, but somebody should look (missing label, outlier spacing or intensity,
  empty label map, skipped series, unreadable DICOM files);
- info: facts (dtype mix, class balance).
"""

from __future__ import annotations

import datetime as dt
import html
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from preprocessing import artefacts
from preprocessing.inventory import ImageItem
from preprocessing.labels import LabelKind, Pairing

AFFINE_TOL_MM = 1e-3  # same tolerance as the MSD datalist reader of the tasks
ROBUST_Z = 3.5  # Iglewicz & Hoaglin's cut-off for the modified z-score
MIN_FOR_OUTLIERS = 5  # below this many images a median says nothing
MAX_LABEL_CLASSES = 64  # more distinct values than this is not a label map


@dataclass(frozen=True)
class QualityOptions:
    """Thresholds of the quality checks.

    Attributes:
        robust_z: |modified z| above which spacing or intensity is an outlier.
        affine_tol: largest accepted image/label affine element difference (mm).
        site: site name written into the report.
    """

    robust_z: float = ROBUST_Z
    affine_tol: float = AFFINE_TOL_MM
    site: str = "site"


def _finding(severity: str, code: str, message: str, items: Sequence[str] = ()) -> dict[str, Any]:
    return {"severity": severity, "code": code, "message": message, "items": list(items)}


def robust_z(values: np.ndarray) -> np.ndarray:
    """Modified z-score 0.6745 (x - median) / MAD.

    When the MAD is 0 (most values identical) any value off the median by more than 0.1 %
    gets an infinite score: in a site where all images but one have 1 mm voxels, that one
    image is the outlier.

    Args:
        values: 1-D array.

    Returns:
        Scores, same shape.
    """
    values = np.asarray(values, dtype=float)
    med = np.median(values)
    mad = np.median(np.abs(values - med))
    if mad == 0:
        off = np.abs(values - med) > 1e-3 * max(abs(med), 1e-12)
        scores = np.zeros_like(values)
        scores[off] = np.inf * np.sign(values[off] - med)
        return scores
    return 0.6745 * (values - med) / mad


def _image_stats(item: ImageItem) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray | None, list[dict]]:
    """Header facts and intensity statistics of one image."""
    issues: list[dict] = []
    try:
        img = nib.load(item.image)
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for broken files
        issues.append(_finding("error", "unreadable_image", f"{item.image}: cannot be read as NIfTI ({exc})", [item.id]))
        return {"id": item.id, "image": str(item.image)}, None, None, issues
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    row: dict[str, Any] = {
        "id": item.id,
        "image": str(item.image),
        "shape": list(data.shape),
        "spacing": [round(z, 6) for z in zooms],
        "dtype": data.dtype.name,
        "orientation": "".join(nib.aff2axcodes(img.affine)),
        "sha1": artefacts.sha1_array(data),
    }
    if item.meta.get("modality"):
        row["modality"] = item.meta["modality"]
    finite = np.isfinite(data) if data.dtype.kind == "f" else None
    values = data[finite] if finite is not None else data.ravel()
    if finite is not None and not finite.all():
        issues.append(
            _finding("error", "non_finite", f"{item.image}: {int((~finite).sum())} NaN/Inf voxels", [item.id])
        )
    if values.size == 0:
        issues.append(_finding("error", "empty_image", f"{item.image}: no finite voxel", [item.id]))
        return row, data, img.affine, issues
    p01, p99 = np.percentile(values, [1, 99])
    row["intensity"] = {
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "p01": float(p01),
        "p99": float(p99),
    }
    if values.min() == values.max():
        issues.append(
            _finding("warning", "constant_image", f"{item.image}: every voxel is {float(values.min()):g}", [item.id])
        )
    return row, data, img.affine, issues


def _label_checks(
    item: ImageItem, label: Path, data: np.ndarray, affine: np.ndarray, options: QualityOptions
) -> tuple[dict[str, Any], Counter, list[dict]]:
    """Compare a label map with its image; count voxels per class."""
    issues: list[dict] = []
    info: dict[str, Any] = {"label": str(label)}
    try:
        lab_img = nib.load(label)
        lab = np.asanyarray(lab_img.dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for broken files
        issues.append(_finding("error", "unreadable_label", f"{label}: cannot be read as NIfTI ({exc})", [item.id]))
        return info, Counter(), issues
    ndim = lab.ndim
    if data.shape[:ndim] != lab.shape:
        issues.append(
            _finding(
                "error",
                "label_shape_mismatch",
                f"image {item.image.name} is {tuple(data.shape)}, label {label.name} is {tuple(lab.shape)}",
                [item.id],
            )
        )
    diff = float(np.abs(np.asarray(affine) - np.asarray(lab_img.affine)).max())
    info["affine_max_diff"] = diff
    if diff > options.affine_tol:
        issues.append(
            _finding(
                "error",
                "label_affine_mismatch",
                f"label {label.name} lies on another grid than image {item.image.name} "
                f"(affines differ by up to {diff:.4g} mm, tolerance {options.affine_tol:g})",
                [item.id],
            )
        )
    values, counts = np.unique(lab, return_counts=True)
    info["label_dtype"] = lab.dtype.name
    if values.size > MAX_LABEL_CLASSES or not np.all(values == np.round(values)) or values.min() < 0:
        issues.append(
            _finding(
                "error",
                "label_not_classes",
                f"label {label.name} has {values.size} distinct values (e.g. {', '.join(f'{v:g}' for v in values[:5])}); "
                f"a label map holds non-negative integers",
                [item.id],
            )
        )
        return info, Counter(), issues
    per_class = Counter({int(v): int(c) for v, c in zip(values, counts)})
    info["label_values"] = sorted(per_class)
    if set(per_class) <= {0}:
        issues.append(_finding("warning", "empty_label", f"label {label.name} has no foreground voxel", [item.id]))
    if lab.dtype.kind == "f":
        issues.append(
            _finding("info", "float_label", f"label {label.name} is stored as {lab.dtype.name} (values are integral)", [item.id])
        )
    return info, per_class, issues


def _outliers(
    rows: list[dict], features: list[dict[str, list[float]]], key: str, label: str, options: QualityOptions
) -> list[dict]:
    """Robust outliers of one per-image feature vector, within each modality.

    Args:
        rows: per-image report rows (parallel to ``features``); outlier names are added.
        features: per-image feature vectors by name.
        key: feature name (``spacing`` or ``intensity``).
        label: how the feature is described in messages.
        options: thresholds.

    Returns:
        One warning per outlying image.
    """
    findings = []
    groups: dict[str, list[int]] = defaultdict(list)
    for idx, (r, f) in enumerate(zip(rows, features)):
        if key in f:
            groups[str(r.get("modality", ""))].append(idx)
    for modality, members in groups.items():
        if len(members) < MIN_FOR_OUTLIERS:
            continue
        matrix = np.array([features[i][key] for i in members], dtype=float)
        scores = np.column_stack([robust_z(matrix[:, j]) for j in range(matrix.shape[1])])
        worst = np.max(np.abs(scores), axis=1)
        medians = ", ".join(f"{v:.4g}" for v in np.median(matrix, axis=0))
        for idx, score, vec in zip(members, worst, matrix):
            if score <= options.robust_z:
                continue
            row = rows[idx]
            finding = _finding(
                "warning",
                f"{key}_outlier",
                f"{row['id']}: {label} ({', '.join(f'{v:.4g}' for v in vec)}) far from the site "
                f"median ({medians})" + (f" among {modality} images" if modality else ""),
                [row["id"]],
            )
            row["issues"].append(finding)
            findings.append(finding)
    return findings


def _dicom_duplicates(items: Sequence[ImageItem]) -> list[dict]:
    """Identical non-blank slices in different series (the same image stored twice)."""
    where: dict[str, list[str]] = defaultdict(list)
    for item in items:
        for sl in item.meta.get("slices", []):
            h = sl.get("pixel_sha1", "")
            if h and not h.startswith("constant:"):
                where[h].append(f"{item.id}:{sl['source']}")
    # one finding per set of series involved, not one per slice: a re-exported series would
    # otherwise produce as many findings as it has slices
    groups: dict[tuple[str, ...], list[list[str]]] = defaultdict(list)
    for places in where.values():
        if len(places) > 1:
            groups[tuple(sorted({p.split(":", 1)[0] for p in places}))].append(places)
    findings = []
    for series, dup_sets in groups.items():
        where_text = f"across series {', '.join(series)}" if len(series) > 1 else f"within {series[0]}"
        findings.append(
            _finding(
                "warning",
                "duplicate_slices",
                f"{len(dup_sets)} slice(s) with identical pixel data {where_text} "
                f"(e.g. {'; '.join(dup_sets[0][:2])})",
                list(series),
            )
        )
    return findings


def assess_site(
    pairing: Pairing,
    conversion: dict[str, Any] | None = None,
    options: QualityOptions = QualityOptions(),
    progress: bool = False,
    deid_skipped: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Check every image (and label) of a site and summarise the findings.

    Args:
        pairing: the images and their labels (see :func:`preprocessing.labels.pair_labels`).
        conversion: the conversion summary, when the images came from DICOM (adds unreadable
            files, skipped series and slice-level duplicates).
        options: thresholds.
        progress: show a tqdm bar.
        deid_skipped: files the de-identification stage left behind (``{"source", "reason"}``);
            reported by count and kind of reason only, since original paths may name patients.

    Returns:
        The report (JSON-ready): ``summary``, ``findings``, ``items``, ``consistency``,
        ``labels`` and ``completeness``.
    """
    findings: list[dict] = []
    rows: list[dict] = []
    features: list[dict[str, list[float]]] = []
    class_voxels: Counter = Counter()
    class_images: Counter = Counter()
    by_hash: dict[str, list[str]] = defaultdict(list)
    for item in tqdm(pairing.images, desc="quality", unit="image", disable=not progress):
        row, data, affine, issues = _image_stats(item)
        label = pairing.label_of(item)
        if data is not None:
            by_hash[row["sha1"]].append(item.id)
            if pairing.kind == LabelKind.SEGMENTATION and label is not None:
                info, per_class, label_issues = _label_checks(item, Path(label), data, affine, options)
                row.update(info)
                issues += label_issues
                class_voxels.update(per_class)
                class_images.update({k: 1 for k, v in per_class.items() if v > 0})
            elif pairing.kind == LabelKind.CLASSIFICATION and label is not None:
                row["label"] = int(label)
                class_images[int(label)] += 1
        if pairing.kind != LabelKind.NONE and label is None:
            issues.append(_finding("warning", "missing_label", f"{item.id}: no label found", [item.id]))
        if item.id in pairing.ambiguous:
            issues.append(_finding("warning", "ambiguous_label", f"{item.id}: {pairing.ambiguous[item.id]}", [item.id]))
        feats: dict[str, list[float]] = {}
        if row.get("spacing"):
            feats["spacing"] = row["spacing"]
        if row.get("intensity"):
            it = row["intensity"]
            # log scale: intensity ranges span orders of magnitude between scanners
            feats["intensity"] = [float(np.log10(1 + abs(it["p99"] - it["p01"]))), float(np.log10(1 + it["std"]))]
        row["issues"] = issues
        findings += issues
        rows.append(row)
        features.append(feats)
    for ids in by_hash.values():
        if len(ids) > 1:
            dup = _finding(
                "error",
                "duplicate_image",
                f"identical voxel data in {len(ids)} images: {', '.join(ids)} (only the first is kept)",
                ids[1:],
            )
            findings.append(dup)
            for r in rows:
                if r["id"] in ids[1:]:
                    r["issues"].append(dup)
    findings += _outliers(rows, features, "spacing", "spacing (mm)", options)
    findings += _outliers(rows, features, "intensity", "log10 of intensity range p01-p99 and of std", options)
    for orphan in pairing.orphans:
        findings.append(_finding("warning", "orphan_label", f"label {orphan} matches no image"))
    completeness: dict[str, Any] = {
        "images": len(pairing.images),
        "labelled": sum(1 for i in pairing.images if pairing.label_of(i) is not None),
        "orphan_labels": list(pairing.orphans),
    }
    if conversion is not None:
        counts = conversion.get("counts", {})
        completeness["dicom"] = counts
        for entry in conversion.get("skipped", []):
            findings.append(
                _finding(
                    "warning",
                    "series_skipped",
                    f"series {entry.get('series_number')} {entry.get('description')!r} "
                    f"({entry.get('n_files')} files, {entry.get('first_file')}) not converted: {entry['reason']}",
                )
            )
        for note in conversion.get("files_not_converted", []):
            if note["kind"] == "unreadable":
                findings.append(_finding("warning", "unreadable_file", f"{note['path']}: {note['reason']}"))
            elif note["kind"] == "duplicate":
                findings.append(_finding("info", "duplicate_instance", f"{note['path']}: {note['reason']}"))
        for entry in conversion.get("converted", []):
            for issue in entry.get("issues", []):
                if issue["severity"] == "warning":
                    findings.append(_finding("warning", issue["code"], f"{entry['nifti']}: {issue['message']}"))
        findings += _dicom_duplicates(pairing.images)
    if deid_skipped:
        kinds = Counter(re.split(r"[:(]", e["reason"], maxsplit=1)[0].strip() for e in deid_skipped)
        findings.append(
            _finding(
                "warning",
                "not_deidentified",
                f"{len(deid_skipped)} original file(s) were not de-identified and are missing from this "
                f"site's data ({'; '.join(f'{n}× {k}' for k, n in kinds.most_common())}); their paths and "
                "reasons are in the site-private re-identification map",
            )
        )
    consistency = _consistency(rows)
    if len(consistency["dtypes"]) > 1:
        findings.append(
            _finding("info", "mixed_dtypes", f"images are stored as {dict(consistency['dtypes'])}")
        )
    if len(consistency["orientations"]) > 1:
        findings.append(
            _finding("info", "mixed_orientations", f"image axis orientations {dict(consistency['orientations'])}")
        )
    labels = _label_summary(pairing, class_voxels, class_images)
    severities = Counter(f["severity"] for f in findings)
    status = "errors" if severities["error"] else "warnings" if severities["warning"] else "ok"
    flagged = sorted({r["id"] for r in rows if any(i["severity"] == "error" for i in r["issues"])})
    return {
        "stage": "quality",
        "schema": artefacts.SCHEMA_VERSION,
        "site": options.site,
        "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "summary": {
            "status": status,
            "images": len(rows),
            "errors": severities["error"],
            "warnings": severities["warning"],
            "info": severities["info"],
            "excluded_images": flagged,
        },
        "completeness": completeness,
        "consistency": consistency,
        "labels": labels,
        "findings": findings,
        "items": rows,
    }


def _consistency(rows: list[dict]) -> dict[str, Any]:
    spacings = np.array([r["spacing"] for r in rows if r.get("spacing")], dtype=float)
    shapes = np.array([r["shape"][:3] for r in rows if r.get("shape")], dtype=float)
    out: dict[str, Any] = {
        "dtypes": dict(Counter(r["dtype"] for r in rows if "dtype" in r)),
        "orientations": dict(Counter(r["orientation"] for r in rows if "orientation" in r)),
        "modalities": dict(Counter(r.get("modality", "") for r in rows if r.get("modality"))),
    }
    if spacings.size:
        out["spacing_mm"] = {
            "min": spacings.min(axis=0).round(4).tolist(),
            "median": np.median(spacings, axis=0).round(4).tolist(),
            "max": spacings.max(axis=0).round(4).tolist(),
        }
    if shapes.size:
        out["shape"] = {
            "min": shapes.min(axis=0).astype(int).tolist(),
            "median": np.median(shapes, axis=0).tolist(),
            "max": shapes.max(axis=0).astype(int).tolist(),
        }
    return out


def _label_summary(pairing: Pairing, class_voxels: Counter, class_images: Counter) -> dict[str, Any]:
    summary: dict[str, Any] = {"kind": pairing.kind}
    if pairing.kind == LabelKind.NONE:
        return summary
    classes = sorted(set(class_images) | set(class_voxels) | set(pairing.class_names))
    names = {c: pairing.class_names.get(c, "background" if c == 0 and pairing.kind == LabelKind.SEGMENTATION else f"class_{c}") for c in classes}
    if pairing.kind == LabelKind.SEGMENTATION:
        total = sum(class_voxels.values()) or 1
        fg = sum(v for k, v in class_voxels.items() if k != 0) or 1
        summary["classes"] = [
            {
                "value": c,
                "name": names[c],
                "voxels": int(class_voxels[c]),
                "fraction_of_all": round(class_voxels[c] / total, 6),
                "fraction_of_foreground": round(class_voxels[c] / fg, 6) if c != 0 else None,
                "images_with_class": int(class_images[c]),
            }
            for c in classes
        ]
        summary["contiguous"] = classes == list(range(len(classes)))
    else:
        counts = [class_images[c] for c in classes]
        summary["classes"] = [{"value": c, "name": names[c], "images": int(class_images[c])} for c in classes]
        nonzero = [c for c in counts if c]
        summary["imbalance_ratio"] = round(max(nonzero) / min(nonzero), 3) if nonzero else None
    return summary


# --- rendering -------------------------------------------------------------------------

def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def _sections(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    """(title, header, rows) of every table, shared by the Markdown and HTML renderers."""
    s = report["summary"]
    sections = [
        (
            "Summary",
            ["status", "images", "errors", "warnings", "info", "excluded images"],
            [[s["status"], s["images"], s["errors"], s["warnings"], s["info"], ", ".join(s["excluded_images"]) or "-"]],
        )
    ]
    comp = report["completeness"]
    rows = [["images", comp["images"]], ["labelled", comp["labelled"]], ["orphan labels", len(comp["orphan_labels"])]]
    rows += [[f"DICOM {k}", v] for k, v in comp.get("dicom", {}).items()]
    sections.append(("Completeness", ["what", "count"], rows))
    findings = sorted(report["findings"], key=lambda f: ("error", "warning", "info").index(f["severity"]))
    sections.append(("Findings", ["severity", "check", "message"], [[f["severity"], f["code"], f["message"]] for f in findings]))
    cons = report["consistency"]
    rows = [["dtypes", cons["dtypes"]], ["orientations", cons["orientations"]]]
    if cons.get("modalities"):
        rows.append(["modalities", cons["modalities"]])
    for key in ("spacing_mm", "shape"):
        if key in cons:
            rows.append([key, f"min {cons[key]['min']}, median {cons[key]['median']}, max {cons[key]['max']}"])
    sections.append(("Consistency", ["property", "values"], rows))
    lab = report["labels"]
    if lab["kind"] == LabelKind.SEGMENTATION:
        sections.append(
            (
                "Class balance (segmentation)",
                ["value", "name", "voxels", "fraction of all", "fraction of foreground", "images with class"],
                [[c["value"], c["name"], c["voxels"], c["fraction_of_all"], c["fraction_of_foreground"] if c["fraction_of_foreground"] is not None else "-", c["images_with_class"]] for c in lab["classes"]],
            )
        )
    elif lab["kind"] == LabelKind.CLASSIFICATION:
        sections.append(
            (
                f"Class balance (classification, imbalance ratio {lab['imbalance_ratio']})",
                ["value", "name", "images"],
                [[c["value"], c["name"], c["images"]] for c in lab["classes"]],
            )
        )
    sections.append(
        (
            "Images",
            ["id", "shape", "spacing (mm)", "dtype", "orient.", "intensity p01-p99", "label", "issues"],
            [
                [
                    r["id"],
                    "x".join(str(v) for v in r.get("shape", [])),
                    "x".join(f"{v:g}" for v in r.get("spacing", [])),
                    r.get("dtype", "-"),
                    r.get("orientation", "-"),
                    f"{r['intensity']['p01']:.4g}-{r['intensity']['p99']:.4g}" if "intensity" in r else "-",
                    Path(str(r["label"])).name if "label" in r else "-",
                    "; ".join(sorted({i["code"] for i in r["issues"]})) or "ok",
                ]
                for r in report["items"]
            ],
        )
    )
    return sections


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page."""
    lines = [f"# Data quality report: {report['site']}", "", f"Generated {report['generated']}.", ""]
    for title, header, rows in _sections(report):
        lines += [f"## {title}", ""]
        lines += _md_table(header, rows) if rows else ["none"]
        lines.append("")
    return "\n".join(lines)


def render_html(report: dict[str, Any]) -> str:
    """The report as a self-contained HTML page (no scripts, no external files)."""
    colours = {"error": "#fdd", "warning": "#ffd", "info": "#eef", "ok": "#dfd", "errors": "#fdd", "warnings": "#ffd"}
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>Data quality: {esc(report['site'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}"
        "td,th{border:1px solid #bbb;padding:3px 8px;text-align:left;vertical-align:top}th{background:#eee}</style>",
        "</head><body>",
        f"<h1>Data quality report: {esc(report['site'])}</h1><p>Generated {esc(report['generated'])}.</p>",
    ]
    for title, header, rows in _sections(report):
        parts.append(f"<h2>{esc(title)}</h2>")
        if not rows:
            parts.append("<p>none</p>")
            continue
        parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        for row in rows:
            colour = colours.get(str(row[0]), "")
            style = f" style='background:{colour}'" if colour else ""
            parts.append(f"<tr{style}>" + "".join(f"<td>{esc(str(v))}</td>" for v in row) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``quality.json``, ``quality.md`` and ``quality.html``.

    Returns:
        Paths by format.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": artefacts.write_json(out / artefacts.QUALITY_JSON, report),
        "md": out / artefacts.QUALITY_MD,
        "html": out / artefacts.QUALITY_HTML,
    }
    paths["md"].write_text(render_markdown(report), encoding="utf-8")
    paths["html"].write_text(render_html(report), encoding="utf-8")
    return paths


def format_summary(report: dict[str, Any], paths: dict[str, Path] | None = None) -> str:
    """Short text summary for the terminal."""
    s = report["summary"]
    lines = [
        f"quality: {s['status']} - {s['images']} images, {s['errors']} errors, {s['warnings']} warnings, {s['info']} info"
    ]
    for f in report["findings"]:
        if f["severity"] != "info":
            lines.append(f"  {f['severity']}: {f['message']}")
    lab = report["labels"]
    if lab.get("classes"):
        parts = []
        for c in lab["classes"]:
            if "voxels" in c:
                parts.append(f"{c['name']} {c['voxels']} voxels in {c['images_with_class']} images")
            else:
                parts.append(f"{c['name']} {c['images']} images")
        lines.append("  classes: " + "; ".join(parts))
    if paths:
        lines.append("  report: " + ", ".join(str(p) for p in paths.values()))
    return "\n".join(lines)
