"""Pure geometry of DICOM image planes: slice ordering, spacing checks and the NIfTI affine.

Conventions (DICOM PS3.3 C.7.6.2):
- ``ImagePositionPatient`` (IPP) is the centre of the first transmitted pixel, in the patient
  LPS frame (x to the patient's Left, y Posterior, z Superior), in mm.
- ``ImageOrientationPatient`` (IOP) holds the row direction cosine (direction of increasing
  column index) then the column direction cosine (increasing row index).
- ``PixelSpacing`` is ``[spacing between rows, spacing between columns]``.

Our voxel array is ``pixel_array.T`` stacked along the slice normal, shape
``(columns, rows, slices)``; so voxel axis i follows the row cosine with step PixelSpacing[1],
axis j the column cosine with step PixelSpacing[0], axis k the sorted slice positions.
NIfTI is RAS, so the LPS affine is pre-multiplied by diag(-1, -1, 1, 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class Severity(str, Enum):
    """How a geometry finding affects conversion."""

    ERROR = "error"  # the series is not converted
    WARNING = "warning"  # converted, but somebody should look
    INFO = "info"


class IssueCode(str, Enum):
    """Stable identifiers of geometry findings (used in summaries and tests)."""

    NO_GEOMETRY = "no_geometry"
    MIXED_ORIENTATION = "mixed_orientation"
    INCONSISTENT_SIZE = "inconsistent_size"
    INCONSISTENT_SPACING = "inconsistent_pixel_spacing"
    MISSING_SLICES = "missing_slices"
    UNEVEN_SPACING = "uneven_spacing"
    DUPLICATE_POSITIONS = "duplicate_positions"
    GANTRY_TILT = "gantry_tilt"
    SINGLE_SLICE = "single_slice"
    INSTANCE_NUMBER_GAP = "instance_number_gap"
    SPACING_TAG_MISMATCH = "spacing_tag_mismatch"


@dataclass(frozen=True)
class GeometryIssue:
    """One finding about a series' geometry, with a message that names what is wrong."""

    code: IssueCode
    severity: Severity
    message: str

    def as_dict(self) -> dict[str, str]:
        """JSON-ready form."""
        return {"code": self.code.value, "severity": self.severity.value, "message": self.message}


@dataclass(frozen=True)
class Plane:
    """Geometry and identity of one 2-D image plane (a single-frame instance or one frame).

    Attributes:
        source: file path, with ``#frame N`` (1-based) for a frame of a multi-frame object.
        position: ImagePositionPatient (LPS, mm).
        orientation: ImageOrientationPatient (6 direction cosines).
        pixel_spacing: (between rows, between columns) in mm.
        rows: Rows.
        columns: Columns.
        instance_number: InstanceNumber (or frame number), used to break ties and find gaps.
        stack_key: identifies the volume of a plane that shares its position with others
            (temporal index, echo, acquisition); equal keys at one position are duplicates.
        thickness: SliceThickness in mm, if any.
        spacing_between_slices: SpacingBetweenSlices in mm, if any.
    """

    source: str
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    instance_number: int | None = None
    stack_key: tuple = ()
    thickness: float | None = None
    spacing_between_slices: float | None = None


@dataclass
class SeriesGeometry:
    """Result of :func:`assess_planes`: plane order, affine and findings.

    Attributes:
        order: indices into the input planes, in volume order; for 4-D series the volume index
            varies slowest (``order[v * n_slices + k]``).
        n_slices: slices per volume.
        n_volumes: volumes (1 unless several planes share each position).
        affine: 4x4 RAS affine (voxel -> mm) of the ``(columns, rows, slices)`` array.
        spacing: (column step, row step, slice step) in mm.
        tilt_deg: angle between the slice stacking direction and the plane normal.
        issues: findings; any ERROR means the series must not be converted.
    """

    order: list[int]
    n_slices: int
    n_volumes: int
    affine: np.ndarray
    spacing: tuple[float, float, float]
    tilt_deg: float = 0.0
    issues: list[GeometryIssue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no finding prevents conversion."""
        return not any(i.severity is Severity.ERROR for i in self.issues)


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of an image plane (row cosine x column cosine), in LPS.

    Args:
        orientation: the six direction cosines of ImageOrientationPatient.

    Returns:
        A unit 3-vector.

    Raises:
        ValueError: the cosines are degenerate (zero or parallel vectors).
    """
    iop = np.asarray(orientation, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        raise ValueError(f"ImageOrientationPatient {list(iop)} has parallel or zero cosines")
    return normal / norm


def orientation_mismatch(planes: Sequence[Plane], tol: float = 1e-3) -> GeometryIssue | None:
    """Report planes whose orientation differs from the first plane's.

    Args:
        planes: the planes of one series.
        tol: largest accepted difference of any direction cosine (1e-3 is about 0.06 degrees;
            real series written with 6 decimals differ by 1e-6).

    Returns:
        A MIXED_ORIENTATION error naming the first odd file, or None.
    """
    ref = np.asarray(planes[0].orientation, dtype=float)
    odd = [p for p in planes if np.max(np.abs(np.asarray(p.orientation) - ref)) > tol]
    if not odd:
        return None
    distinct = {tuple(np.round(p.orientation, 3)) for p in planes}
    return GeometryIssue(
        IssueCode.MIXED_ORIENTATION,
        Severity.ERROR,
        f"mixed orientations: {len(distinct)} different ImageOrientationPatient values "
        f"({len(odd)} of {len(planes)} planes differ from {planes[0].source}, e.g. "
        f"{odd[0].source}: {[round(v, 4) for v in odd[0].orientation]})",
    )


def size_mismatch(planes: Sequence[Plane], spacing_tol: float = 1e-4) -> list[GeometryIssue]:
    """Report planes with a different matrix size or pixel spacing than the first plane.

    Args:
        planes: the planes of one series.
        spacing_tol: accepted PixelSpacing difference in mm.

    Returns:
        Zero, one or two errors (size, spacing).
    """
    issues = []
    first = planes[0]
    odd_size = [p for p in planes if (p.rows, p.columns) != (first.rows, first.columns)]
    if odd_size:
        sizes = sorted({(p.rows, p.columns) for p in planes})
        issues.append(
            GeometryIssue(
                IssueCode.INCONSISTENT_SIZE,
                Severity.ERROR,
                f"inconsistent image sizes (rows x columns) {sizes}: {odd_size[0].source} is "
                f"{odd_size[0].rows}x{odd_size[0].columns}, {first.source} is "
                f"{first.rows}x{first.columns}",
            )
        )
    odd_px = [
        p
        for p in planes
        if max(abs(a - b) for a, b in zip(p.pixel_spacing, first.pixel_spacing)) > spacing_tol
    ]
    if odd_px:
        issues.append(
            GeometryIssue(
                IssueCode.INCONSISTENT_SPACING,
                Severity.ERROR,
                f"inconsistent PixelSpacing: {odd_px[0].source} has "
                f"{list(odd_px[0].pixel_spacing)}, {first.source} has {list(first.pixel_spacing)}",
            )
        )
    return issues


def _fmt(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


def spacing_findings(
    distances: np.ndarray, rel_tol: float = 0.01, abs_tol: float = 1e-3
) -> tuple[float, list[GeometryIssue]]:
    """Check sorted slice distances (along the normal) for gaps and uneven steps.

    A step of about k times the typical step (k >= 2) is reported as k-1 missing slices; any
    other deviation beyond the tolerance as uneven spacing. Both are errors: stacking such a
    series with one affine would misplace every slice after the gap.

    Args:
        distances: ascending positions of unique slices along the normal (mm), length >= 2.
        rel_tol: accepted step deviation relative to the typical step.
        abs_tol: accepted absolute deviation in mm (for very thin slices).

    Returns:
        (mean step over the series, findings).
    """
    steps = np.diff(distances)
    typical = float(np.median(steps))
    tol = max(rel_tol * typical, abs_tol)
    issues: list[GeometryIssue] = []
    gaps = []
    uneven = []
    for idx, step in enumerate(steps):
        if abs(step - typical) <= tol:
            continue
        ratio = step / typical
        n_missing = round(ratio) - 1
        if n_missing >= 1 and abs(step - (n_missing + 1) * typical) <= tol * (n_missing + 1):
            gaps.append((idx, n_missing, step))
        else:
            uneven.append((idx, step))
    if gaps:
        total = sum(g[1] for g in gaps)
        where = "; ".join(
            f"{n} missing between {distances[i]:.3f} and {distances[i + 1]:.3f} mm "
            f"(step {s:.3f} mm)"
            for i, n, s in gaps
        )
        issues.append(
            GeometryIssue(
                IssueCode.MISSING_SLICES,
                Severity.ERROR,
                f"missing slices: {total} slice(s) absent, typical step {typical:.3f} mm; {where}",
            )
        )
    if uneven:
        issues.append(
            GeometryIssue(
                IssueCode.UNEVEN_SPACING,
                Severity.ERROR,
                f"uneven slice spacing: steps range {float(steps.min()):.3f}-"
                f"{float(steps.max()):.3f} mm (typical {typical:.3f} mm, tolerance "
                f"{tol:.3f} mm); odd steps at slice index "
                f"{', '.join(str(i) for i, _ in uneven[:5])}",
            )
        )
    mean_step = float((distances[-1] - distances[0]) / (len(distances) - 1))
    return mean_step, issues


def tilt_angle_deg(first: np.ndarray, last: np.ndarray, normal: np.ndarray) -> float:
    """Angle between the stacking direction (first -> last position) and the plane normal.

    Args:
        first: position of the first slice (LPS).
        last: position of the last slice (LPS).
        normal: unit plane normal.

    Returns:
        Angle in degrees (0 for an orthogonal stack such as MR or an untilted CT).
    """
    step = np.asarray(last, float) - np.asarray(first, float)
    length = float(np.linalg.norm(step))
    if length == 0:
        return 0.0
    cos = abs(float(np.dot(step, normal))) / length
    return math.degrees(math.acos(min(1.0, cos)))


def lps_affine(
    origin: Sequence[float],
    orientation: Sequence[float],
    pixel_spacing: Sequence[float],
    slice_step: Sequence[float],
) -> np.ndarray:
    """LPS affine of a ``(columns, rows, slices)`` array.

    Args:
        origin: IPP of the first slice.
        orientation: IOP (row cosine, column cosine).
        pixel_spacing: (between rows, between columns).
        slice_step: vector from one slice centre to the next (normal * spacing, or the measured
            step for a tilted stack, which makes the affine sheared but exact).

    Returns:
        4x4 affine mapping (i, j, k, 1) to LPS mm.
    """
    iop = np.asarray(orientation, dtype=float)
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * float(pixel_spacing[1])
    affine[:3, 1] = iop[3:] * float(pixel_spacing[0])
    affine[:3, 2] = np.asarray(slice_step, dtype=float)
    affine[:3, 3] = np.asarray(origin, dtype=float)
    return affine


def ras_affine(*args, **kwargs) -> np.ndarray:
    """Same as :func:`lps_affine`, converted to the RAS frame used by NIfTI."""
    return LPS_TO_RAS @ lps_affine(*args, **kwargs)


def _stack_groups(planes: Sequence[Plane], dist: np.ndarray, tol: float) -> list[list[int]]:
    """Group plane indices by position along the normal (ascending)."""
    order = sorted(range(len(planes)), key=lambda i: dist[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and abs(dist[i] - dist[groups[-1][0]]) <= tol:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def assess_planes(
    planes: Sequence[Plane],
    rel_tol: float = 0.01,
    tilt_tol_deg: float = 0.05,
    orientation_tol: float = 1e-3,
    single_slice_thickness: float | None = None,
) -> SeriesGeometry:
    """Order planes along the slice normal, check the stack and build its RAS affine.

    Findings (see :class:`IssueCode`): mixed orientations, inconsistent sizes or pixel spacing,
    missing slices, uneven spacing, unequal duplicates of a position are errors; gantry tilt
    (affine becomes sheared but exact), a single slice (slice step from SliceThickness) and
    InstanceNumber gaps are warnings.

    Args:
        planes: planes of one series (any order).
        rel_tol: relative tolerance of slice steps.
        tilt_tol_deg: angle above which a stack counts as tilted.
        orientation_tol: see :func:`orientation_mismatch`.
        single_slice_thickness: slice extent for a one-slice series (defaults to the plane's
            SliceThickness, then SpacingBetweenSlices, then 1 mm with a warning).

    Returns:
        A :class:`SeriesGeometry`; check ``.ok`` before using the affine.
    """
    if not planes:
        raise ValueError("no planes to assess")
    issues: list[GeometryIssue] = []
    first = planes[0]
    mixed = orientation_mismatch(planes, orientation_tol)
    if mixed:
        issues.append(mixed)
    issues.extend(size_mismatch(planes))
    normal = slice_normal(first.orientation)
    positions = np.array([p.position for p in planes], dtype=float)
    dist = positions @ normal
    px = first.pixel_spacing
    if issues:  # no point sorting planes that cannot form one volume
        return SeriesGeometry(
            list(range(len(planes))), len(planes), 1, np.eye(4), (px[1], px[0], 0.0), 0.0, issues
        )

    dup_tol = max(1e-3, 1e-3 * float(np.ptp(dist)) / max(len(planes) - 1, 1))
    groups = [
        sorted(g, key=lambda i: (planes[i].stack_key, planes[i].instance_number or 0, i))
        for g in _stack_groups(planes, dist, dup_tol)
    ]
    sizes = {len(g) for g in groups}
    n_volumes = 1
    if sizes != {1}:
        keys_differ = all(len({planes[i].stack_key for i in g}) == len(g) for g in groups)
        if len(sizes) == 1 and keys_differ:
            n_volumes = sizes.pop()
            issues.append(
                GeometryIssue(
                    IssueCode.DUPLICATE_POSITIONS,
                    Severity.INFO,
                    f"{n_volumes} planes at each of {len(groups)} positions (echoes, time points "
                    f"or acquisitions): written as a 4-D volume",
                )
            )
        else:
            worst = max(groups, key=len)
            issues.append(
                GeometryIssue(
                    IssueCode.DUPLICATE_POSITIONS,
                    Severity.ERROR,
                    f"duplicate slice positions: {len(worst)} planes at "
                    f"{dist[worst[0]]:.3f} mm along the normal "
                    f"({', '.join(planes[i].source for i in worst[:3])}); "
                    f"position counts {sorted(len(g) for g in groups)[-3:]} are not uniform",
                )
            )
    # one representative plane per position, ascending along the normal
    reps = [g[0] for g in groups]
    rep_dist = np.array([dist[i] for i in reps])
    n_slices = len(reps)
    tilt = 0.0
    if n_slices == 1:
        thickness = (
            single_slice_thickness or first.thickness or first.spacing_between_slices or None
        )
        if thickness is None:
            thickness = 1.0
            issues.append(
                GeometryIssue(
                    IssueCode.SINGLE_SLICE,
                    Severity.WARNING,
                    "single slice without SliceThickness: slice extent set to 1 mm",
                )
            )
        step_vec = normal * float(thickness)
        step = float(thickness)
    else:
        step, spacing_issues = spacing_findings(rep_dist, rel_tol)
        normal_step = step  # SpacingBetweenSlices is measured along the normal, even when tilted
        issues.extend(spacing_issues)
        p0, p1 = positions[reps[0]], positions[reps[-1]]
        tilt = tilt_angle_deg(p0, p1, normal)
        if tilt > tilt_tol_deg:
            # The measured step keeps every voxel where the scanner put it (sheared affine);
            # resampling to an orthogonal grid is left to the task's spacing transform.
            step_vec = (p1 - p0) / (n_slices - 1)
            step = float(np.linalg.norm(step_vec))
            issues.append(
                GeometryIssue(
                    IssueCode.GANTRY_TILT,
                    Severity.WARNING,
                    f"gantry tilt: slices are stacked {tilt:.2f} degrees off the plane normal; "
                    f"the affine is sheared (exact positions kept, not resampled)",
                )
            )
        else:
            step_vec = normal * step
        sbs = first.spacing_between_slices
        if sbs and abs(abs(sbs) - abs(normal_step)) > max(rel_tol * abs(normal_step), 1e-3):
            issues.append(
                GeometryIssue(
                    IssueCode.SPACING_TAG_MISMATCH,
                    Severity.INFO,
                    f"SpacingBetweenSlices {sbs:g} mm differs from the positions' step "
                    f"{normal_step:.4f} mm; the positions are used",
                )
            )
    numbers = sorted(planes[i].instance_number for i in reps if planes[i].instance_number)
    if all(len(g) == 1 for g in groups) and len(numbers) == n_slices > 1:
        missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
        if missing:
            issues.append(
                GeometryIssue(
                    IssueCode.INSTANCE_NUMBER_GAP,
                    Severity.WARNING,
                    f"InstanceNumber gap: {len(missing)} number(s) absent "
                    f"(e.g. {missing[:5]}) between {numbers[0]} and {numbers[-1]}",
                )
            )
    affine = ras_affine(positions[reps[0]], first.orientation, px, step_vec)
    order = [groups[k][v] for v in range(n_volumes) for k in range(n_slices)] if (
        n_volumes > 1 and all(len(g) == n_volumes for g in groups)
    ) else [i for g in groups for i in g]
    return SeriesGeometry(
        order=order,
        n_slices=n_slices,
        n_volumes=n_volumes,
        affine=affine,
        spacing=(float(px[1]), float(px[0]), abs(step)),
        tilt_deg=tilt,
        issues=issues,
    )
