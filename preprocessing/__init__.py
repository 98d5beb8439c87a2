"""Site preprocessing: DICOM de-identification and conversion, data-quality report, datalists.

Stages live in submodules and hand each other files; ``preprocessing.cli`` is the thin CLI.
"""
