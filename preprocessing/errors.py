"""Errors raised by the preprocessing stages; all are one-line, user-facing `MonaiFLError`s."""

from monai_fl.errors import DataFormatError, DataNotFoundError, MonaiFLError

__all__ = [
    "DataFormatError",
    "DataNotFoundError",
    "DeidentificationError",
    "MonaiFLError",
    "PrepConfigError",
    "SeriesGeometryError",
]


class SeriesGeometryError(DataFormatError):
    """A DICOM series cannot be stacked into a volume with one affine (gaps, mixed planes, ...)."""


class DeidentificationError(MonaiFLError):
    """De-identification was refused (unsafe output location, burned-in text, bad option)."""


class PrepConfigError(MonaiFLError):
    """Contradictory or invalid preprocessing options."""
