"""De-identification of DICOM files (PS3.15 Annex E Basic Profile)."""
