"""Planes (geometry + rescale) and pixels of one DICOM object: single-frame or multi-frame.

Three layouts are handled:
- single-frame images (CT/MR Image Storage, Secondary Capture carrying patient geometry);
- enhanced multi-frame (``PerFrameFunctionalGroupsSequence``): position, orientation, pixel
  measures and rescale per frame, falling back to the shared functional groups;
- legacy multi-frame with one position (RT Dose, NM): frames are offset along the normal by
  ``GridFrameOffsetVector`` (PS3.3 C.8.8.3.2) or, lacking it, by SpacingBetweenSlices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom

from preprocessing.dicom.geometry import Plane, slice_normal
from preprocessing.errors import DataFormatError, SeriesGeometryError

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass(frozen=True)
class Rescale:
    """Modality LUT as a linear map: stored value * slope + intercept."""

    slope: float = 1.0
    intercept: float = 0.0

    @property
    def identity(self) -> bool:
        """True when values are stored unscaled."""
        return self.slope == 1.0 and self.intercept == 0.0


def _float(value, default: float | None = None) -> float | None:
    if value is None or value == "":
        return default
    return float(value)


def _floats(value) -> tuple[float, ...] | None:
    if value is None or value == "":
        return None
    return tuple(float(v) for v in value)


def _int_or(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def check_supported(ds: pydicom.Dataset, path: str) -> None:
    """Refuse objects whose pixels are not one scalar image per plane.

    Args:
        ds: the dataset.
        path: its file, for the message.

    Raises:
        DataFormatError: DICOM SEG, colour images.
    """
    if str(ds.get("SOPClassUID", "")) == SEG_STORAGE:
        raise DataFormatError(
            f"{path}: DICOM SEG is not converted (frames are per segment; use a SEG reader)"
        )
    samples = _int_or(ds.get("SamplesPerPixel", 1), 1)
    if samples != 1:
        raise DataFormatError(
            f"{path}: colour image ({ds.get('PhotometricInterpretation', '?')}, "
            f"SamplesPerPixel={samples}) is not converted; only greyscale volumes are"
        )


def _group(frame_item, shared, keyword: str):
    """First item of a functional group macro, per-frame first, then shared."""
    for container in (frame_item, shared):
        if container is not None and keyword in container and len(container[keyword].value):
            return container[keyword][0]
    return None


def _rescale_of(item) -> Rescale:
    if item is None:
        return Rescale()
    return Rescale(_float(item.get("RescaleSlope"), 1.0), _float(item.get("RescaleIntercept"), 0.0))


def _enhanced_planes(ds: pydicom.Dataset, path: str) -> tuple[list[Plane], list[Rescale]]:
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    planes, rescales = [], []
    for n, frame in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
        pos = _group(frame, shared, "PlanePositionSequence")
        ori = _group(frame, shared, "PlaneOrientationSequence")
        meas = _group(frame, shared, "PixelMeasuresSequence")
        if pos is None or ori is None or meas is None or "PixelSpacing" not in meas:
            raise SeriesGeometryError(
                f"{path}: frame {n} has no patient geometry (Plane Position/Orientation or "
                f"Pixel Measures functional group missing)"
            )
        content = _group(frame, None, "FrameContentSequence")
        stack_key: tuple = (0,)
        if content is not None:
            stack_key = (
                _int_or(content.get("TemporalPositionIndex"), 0),
                tuple(_int_or(v, 0) for v in (content.get("DimensionIndexValues") or [])),
            )
        planes.append(
            Plane(
                source=f"{path}#frame {n}",
                position=_floats(pos.ImagePositionPatient),
                orientation=_floats(ori.ImageOrientationPatient),
                pixel_spacing=_floats(meas.PixelSpacing),
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                instance_number=n,
                stack_key=stack_key,
                thickness=_float(meas.get("SliceThickness")),
                spacing_between_slices=_float(meas.get("SpacingBetweenSlices")),
            )
        )
        rescales.append(_rescale_of(_group(frame, shared, "PixelValueTransformationSequence")))
    return planes, rescales


def _legacy_planes(ds: pydicom.Dataset, path: str, n_frames: int) -> tuple[list[Plane], list[Rescale]]:
    missing = [
        k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in ds
    ]
    if missing:
        raise SeriesGeometryError(
            f"{path}: no patient geometry ({', '.join(missing)} missing); a volume cannot be placed"
        )
    origin = np.asarray(_floats(ds.ImagePositionPatient))
    orientation = _floats(ds.ImageOrientationPatient)
    normal = slice_normal(orientation)
    thickness = _float(ds.get("SliceThickness"))
    sbs = _float(ds.get("SpacingBetweenSlices"))
    if n_frames == 1:
        offsets = [0.0]
    elif "GridFrameOffsetVector" in ds:
        offsets = [float(v) for v in ds.GridFrameOffsetVector]
        if len(offsets) != n_frames:
            raise SeriesGeometryError(
                f"{path}: GridFrameOffsetVector has {len(offsets)} values for {n_frames} frames"
            )
        if offsets[0] != 0.0:
            # PS3.3 C.8.8.3.2: a non-zero first value means absolute z (only for axial planes)
            offsets = [o - origin[2] for o in offsets]
    elif sbs or thickness:
        offsets = [k * float(sbs or thickness) for k in range(n_frames)]
    else:
        raise SeriesGeometryError(
            f"{path}: {n_frames} frames but no GridFrameOffsetVector, SpacingBetweenSlices or "
            f"SliceThickness to place them"
        )
    planes = [
        Plane(
            source=f"{path}#frame {k + 1}" if n_frames > 1 else path,
            position=tuple(origin + off * normal),
            orientation=orientation,
            pixel_spacing=_floats(ds.PixelSpacing),
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            instance_number=(k + 1) if n_frames > 1 else _int_or(ds.get("InstanceNumber"), 0) or None,
            stack_key=(
                _int_or(ds.get("TemporalPositionIdentifier"), 0),
                _float(ds.get("EchoTime"), 0.0),
                _int_or(ds.get("EchoNumbers"), 0),
                _int_or(ds.get("AcquisitionNumber"), 0),
            ),
            thickness=thickness,
            spacing_between_slices=sbs,
        )
        for k, off in enumerate(offsets)
    ]
    if "DoseGridScaling" in ds:  # RT Dose: stored value * DoseGridScaling = Gy
        rescale = Rescale(float(ds.DoseGridScaling), 0.0)
    else:
        rescale = _rescale_of(ds)
    return planes, [rescale] * n_frames


def planes_of(ds: pydicom.Dataset, path: str) -> tuple[list[Plane], list[Rescale]]:
    """Planes and their modality rescale for every frame of one object.

    Args:
        ds: a dataset (pixels not needed).
        path: its file, used in plane sources and messages.

    Returns:
        (planes, rescales), one entry per frame in stored order.

    Raises:
        SeriesGeometryError: the object has no usable patient geometry.
        DataFormatError: the object is not a greyscale image (see :func:`check_supported`).
    """
    check_supported(ds, path)
    n_frames = _int_or(ds.get("NumberOfFrames", 1), 1)
    if "PerFrameFunctionalGroupsSequence" in ds:
        planes, rescales = _enhanced_planes(ds, path)
        if len(planes) != n_frames:
            raise SeriesGeometryError(
                f"{path}: {len(planes)} per-frame functional groups for NumberOfFrames={n_frames}"
            )
        return planes, rescales
    return _legacy_planes(ds, path, n_frames)


def frame_pixels(ds: pydicom.Dataset, path: str) -> np.ndarray:
    """Stored pixel values as ``(frames, rows, columns)``.

    Args:
        ds: a dataset with pixel data.
        path: its file, for the message.

    Returns:
        The stored (not rescaled) values.

    Raises:
        DataFormatError: the pixel data cannot be decoded (truncated, bad compression...).
    """
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise many types; the file is the problem
        raise DataFormatError(f"{path}: pixel data cannot be decoded ({exc})") from exc
    n_frames = _int_or(ds.get("NumberOfFrames", 1), 1)
    if n_frames == 1 and arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] != n_frames:
        raise DataFormatError(
            f"{path}: decoded pixels have shape {arr.shape}, expected ({n_frames}, rows, columns)"
        )
    return arr
