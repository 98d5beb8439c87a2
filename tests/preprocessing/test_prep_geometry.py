"""Pure geometry: slice normal, ordering, spacing findings, tilt and the RAS affine."""

from __future__ import annotations

import math

import numpy as np
import pytest

from preprocessing.dicom.geometry import IssueCode, Plane, Severity, assess_planes, ras_affine, slice_normal

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def planes_at(zs, orientation=AXIAL, rows=4, columns=6, spacing=(0.5, 0.8), numbers=None, keys=None, xy=None):
    """Planes at heights ``zs`` along (0, 0, 1); optional per-plane overrides."""
    out = []
    for k, z in enumerate(zs):
        x, y = xy[k] if xy else (-100.0, -120.0)
        out.append(
            Plane(
                source=f"f{k}.dcm",
                position=(x, y, float(z)),
                orientation=orientation[k] if isinstance(orientation, list) else orientation,
                pixel_spacing=spacing[k] if isinstance(spacing, list) else spacing,
                rows=rows[k] if isinstance(rows, list) else rows,
                columns=columns,
                instance_number=numbers[k] if numbers else k + 1,
                stack_key=keys[k] if keys else (),
                thickness=2.0,
            )
        )
    return out


@pytest.mark.parametrize(
    "orientation, normal",
    [
        (AXIAL, (0, 0, 1)),
        ((1, 0, 0, 0, 0, -1), (0, 1, 0)),  # coronal
        ((0, 1, 0, 0, 0, -1), (-1, 0, 0)),  # sagittal
    ],
)
def test_slice_normal(orientation, normal):
    np.testing.assert_allclose(slice_normal(orientation), normal, atol=1e-12)


def test_slice_normal_rejects_parallel_cosines():
    with pytest.raises(ValueError, match="parallel"):
        slice_normal((1, 0, 0, 1, 0, 0))


def test_affine_known_values():
    # i follows the row cosine with the column spacing (PixelSpacing[1]); LPS -> RAS flips x, y
    aff = ras_affine((-100, -120, 50), AXIAL, (0.5, 0.8), (0, 0, 2.5))
    expected = np.array([[-0.8, 0, 0, 100], [0, -0.5, 0, 120], [0, 0, 2.5, 50], [0, 0, 0, 1]])
    np.testing.assert_allclose(aff, expected)


def test_shuffled_slices_are_sorted_along_normal():
    zs = [10.0, 0.0, 7.5, 2.5, 5.0]
    geo = assess_planes(planes_at(zs))
    assert geo.ok and geo.issues == []
    assert [zs[i] for i in geo.order] == [0.0, 2.5, 5.0, 7.5, 10.0]
    assert geo.spacing == pytest.approx((0.8, 0.5, 2.5))
    np.testing.assert_allclose(geo.affine[:3, 3], (100, 120, 0.0))


@pytest.mark.parametrize(
    "zs, code, severity, text",
    [
        ([0, 2.5, 7.5, 10, 12.5], IssueCode.MISSING_SLICES, Severity.ERROR, "1 slice(s) absent"),
        ([0, 2.5, 10, 12.5, 15], IssueCode.MISSING_SLICES, Severity.ERROR, "2 slice(s) absent"),
        ([0, 2.5, 5, 8.3, 10.8], IssueCode.UNEVEN_SPACING, Severity.ERROR, "uneven slice spacing"),
    ],
    ids=["one-missing", "two-missing", "uneven"],
)
def test_spacing_findings(zs, code, severity, text):
    geo = assess_planes(planes_at(zs))
    found = [i for i in geo.issues if i.code is code]
    assert found and found[0].severity is severity and text in found[0].message
    assert not geo.ok


def test_missing_slice_message_names_the_gap():
    geo = assess_planes(planes_at([0, 2.5, 7.5, 10]))
    (issue,) = geo.issues
    assert "between 2.500 and 7.500 mm" in issue.message and "typical step 2.500 mm" in issue.message


def test_jitter_below_tolerance_is_accepted():
    # real positions jitter by ~1e-5 mm (6.500001, 6.499993 in the TCIA series)
    geo = assess_planes(planes_at([0, 6.500001, 12.999994, 19.499998]))
    assert geo.ok and geo.spacing[2] == pytest.approx(6.5, abs=1e-5)


def test_mixed_orientations_are_an_error():
    tilted = (1.0, 0.0, 0.0, 0.0, math.cos(0.2), math.sin(0.2))
    geo = assess_planes(planes_at([0, 1, 2], orientation=[AXIAL, AXIAL, tilted]))
    (issue,) = geo.issues
    assert issue.code is IssueCode.MIXED_ORIENTATION and "f2.dcm" in issue.message and not geo.ok


@pytest.mark.parametrize(
    "kwargs, code, name",
    [
        ({"rows": [4, 4, 5]}, IssueCode.INCONSISTENT_SIZE, "f2.dcm is 5x6"),
        ({"spacing": [(0.5, 0.8), (0.5, 0.8), (0.6, 0.8)]}, IssueCode.INCONSISTENT_SPACING, "f2.dcm"),
    ],
)
def test_inconsistent_sizes_are_errors(kwargs, code, name):
    geo = assess_planes(planes_at([0, 1, 2], **kwargs))
    assert [i.code for i in geo.issues] == [code] and name in geo.issues[0].message and not geo.ok


def test_gantry_tilt_gives_exact_sheared_affine():
    step_z, tilt = 5.0, math.radians(15)
    xy = [(-100.0, -120.0 + k * step_z * math.tan(tilt)) for k in range(6)]
    geo = assess_planes(planes_at([k * step_z for k in range(6)], xy=xy))
    (issue,) = geo.issues
    assert issue.code is IssueCode.GANTRY_TILT and issue.severity is Severity.WARNING and geo.ok
    assert geo.tilt_deg == pytest.approx(15.0, abs=1e-6)
    # the slice axis is the measured step (RAS: y flipped), so every voxel stays where it was
    np.testing.assert_allclose(geo.affine[:3, 2], (0, -step_z * math.tan(tilt), step_z), atol=1e-9)


def test_duplicate_positions_without_distinct_volumes_are_an_error():
    geo = assess_planes(planes_at([0, 2.5, 2.5, 5]))
    assert [i.code for i in geo.issues] == [IssueCode.DUPLICATE_POSITIONS] and not geo.ok


def test_two_echoes_become_a_4d_series():
    zs = [0, 0, 2.5, 2.5, 5, 5]
    keys = [(0, 10.0), (0, 80.0)] * 3
    geo = assess_planes(planes_at(zs, keys=keys))
    assert geo.ok and geo.n_volumes == 2 and geo.n_slices == 3
    # volume index slowest: first the three echo-1 planes, then the echo-2 planes
    assert [keys[i] for i in geo.order] == [(0, 10.0)] * 3 + [(0, 80.0)] * 3
    assert [zs[i] for i in geo.order] == [0, 2.5, 5] * 2


def test_single_slice_uses_slice_thickness():
    geo = assess_planes(planes_at([3.0]))
    assert geo.ok and geo.n_slices == 1 and geo.spacing[2] == 2.0
    np.testing.assert_allclose(geo.affine[:3, 2], (0, 0, 2.0))


def test_instance_number_gap_is_a_warning():
    geo = assess_planes(planes_at([0, 2.5, 5, 7.5], numbers=[1, 2, 4, 5]))
    (issue,) = geo.issues
    assert issue.code is IssueCode.INSTANCE_NUMBER_GAP and issue.severity is Severity.WARNING and geo.ok
