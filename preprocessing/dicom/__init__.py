"""DICOM discovery, geometry and conversion to NIfTI."""
