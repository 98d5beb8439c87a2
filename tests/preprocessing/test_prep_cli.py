"""The ``prep`` command line: registration, one-line errors, and the full chain on the real study."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
from prep_helpers import bundled

from preprocessing.cli import add_prep_subcommands, main


def test_prep_registers_all_stages():
    parser = argparse.ArgumentParser(prog="monai-fl")
    add_prep_subcommands(parser.add_subparsers(dest="command"))
    for stage in ("convert", "deid", "quality", "datalist", "all"):
        args = parser.parse_args(["prep", stage, "--help"][:2] + _minimal(stage))
        assert callable(args.func) and args.prep_command == stage


def _minimal(stage: str) -> list[str]:
    return {
        "convert": ["in", "-o", "out"],
        "deid": ["in", "-o", "out", "--reid-map", "m.json"],
        "quality": ["--images", "img", "-o", "q"],
        "datalist": ["--images", "img", "-o", "d.json"],
        "all": ["in", "-o", "out", "--no-deid"],
    }[stage]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["convert", "{tmp}/missing", "-o", "{tmp}/out"], "error: DICOM input folder {tmp}/missing does not exist"),
        (["quality", "--images", "{tmp}", "-o", "{tmp}/q", "--labels", "{tmp}", "--label-series", "x"], "error: give one label source"),
        (["deid", "{tmp}", "-o", "{tmp}/out", "--reid-map", "{tmp}/out/m.json", "--keep-private", "12:x"], "error: safe private attribute"),
        (["datalist", "--conversion", "{tmp}", "-o", "{tmp}/d.json"], "error: conversion summary {tmp}/conversion.json does not exist"),
    ],
)
def test_user_errors_are_one_line_with_exit_2(tmp_path, capsys, argv, message):
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message.format(tmp=tmp_path)) and err.count("\n") == 1


def test_convert_prints_summary(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    shutil.copy(bundled("MR_small.dcm"), tmp_path / "in" / "mr.dcm")
    shutil.copy(bundled("rtplan.dcm"), tmp_path / "in" / "plan.dcm")
    assert main(["convert", str(tmp_path / "in"), "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "2 files: 1 image series, 1 converted, 0 skipped" in out
    assert "non_image: plan.dcm: no pixel data (RT Plan Storage)" in out
    assert "64x64x1 @ 0.3125x0.3125x0.8 mm" in out


def test_all_stages_on_the_real_study(tmp_path, dicom_study, capsys):
    out, reid = tmp_path / "site", tmp_path / "private" / "reid.json"
    code = main([
        "all", str(dicom_study), "-o", str(out), "--reid-map", str(reid), "--keep", "SeriesDescription",
        "--label-series", "Mask", "--label-names", "0=background,1=tumour", "--site", "PGBM",
    ])
    text = capsys.readouterr().out
    assert code == 0
    assert "de-identified 125 of 126 files for 1 patient(s)" in text
    assert "scanned 125 files: 5 image series, 5 converted, 0 skipped" in text
    assert (out / "deid_summary.json").is_file()
    assert "quality: ok - 4 images, 0 errors" in text
    assert "4 training, 0 test (unlabelled), 0 excluded" in text
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["labels"] == {"0": "background", "1": "tumour"}
    assert all(t["image"].startswith("./nifti/P0001_") for t in dataset["training"])
    assert (out / "quality.html").is_file() and (out / "quality.md").is_file()
    assert "PGBM-001" not in (out / "conversion.json").read_text()  # identifiers stay in the map
    assert "PGBM-001" in reid.read_text()
