import json
import subprocess
import sys

import pytest

from monai_fl.cli import main


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "monai_fl.cli", *args], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("cmd", [[], ["partition"], ["baseline"]])
def test_help_is_clear(cmd):
    r = _run(*cmd, "--help")
    assert r.returncode == 0
    assert "usage: monai-fl" in r.stdout


@pytest.mark.parametrize(
    "args, msg",
    [
        (["partition", "--dataset", "nosuchmnist"], "unknown dataset 'nosuchmnist'"),
        (["partition", "--data-root", "/nonexistent/folder"], "--data-root /nonexistent/folder is not a folder"),
        (["partition", "--scheme", "dirichlet:zero"], "dirichlet needs a positive number"),
    ],
)
def test_bad_input_gives_one_error_line_not_a_traceback(args, msg, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("monai-fl: error:") and msg in err[0]


def test_malformed_manifest_gives_one_error_line(tmp_path, medmnist_dir, capsys):
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({"format": "monai-fl/site-manifest", "dataset": "pneumoniamnist"}))
    assert main(["baseline", "classical", "--data-root", str(medmnist_dir), "--manifest", str(bad),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lacks the field" in err[0] and str(bad) in err[0]


def test_partition_writes_a_manifest_every_run_reads(tmp_path, medmnist_dir, capsys):
    out = tmp_path / "m.json"
    assert main(["partition", "--dataset", "breastmnist", "--data-root", str(medmnist_dir), "--sites", "3",
                 "--scheme", "dirichlet:0.5", "--seed", "1", "--manifest", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["dataset"] == "breastmnist" and m["scheme"] == "dirichlet:0.5" and m["seed"] == 1
    assert sum(s["n_train"] for s in m["sites"].values()) == 546 + 78
    assert "site-3" in capsys.readouterr().out


@pytest.mark.slow
def test_baselines_share_the_manifest(tmp_path, medmnist_dir):
    manifest = tmp_path / "manifest.json"
    common = ["--dataset", "breastmnist", "--data-root", str(medmnist_dir), "--manifest", str(manifest),
              "--network", "cnn", "--width", "8", "--epochs", "1"]
    assert main(["baseline", "local", *common, "--out", str(tmp_path / "local")]) == 0
    first = manifest.read_text()
    assert main(["baseline", "centralized", *common, "--out", str(tmp_path / "cent")]) == 0
    assert manifest.read_text() == first
    local = json.loads((tmp_path / "local" / "results.json").read_text())
    cent = json.loads((tmp_path / "cent" / "results.json").read_text())
    assert local["manifest"] == cent["manifest"] == str(manifest)
    assert set(local["methods"]["local"]["per_site_model"]) == {"site-1", "site-2", "site-3"}
    assert 0 <= cent["methods"]["centralized"]["pooled"]["auc"] <= 1
    assert (tmp_path / "cent" / "centralized_model.pt").exists()
    assert cent["task"] == "classification" and (tmp_path / "cent" / "report.html").exists()


REPO_CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"


def test_partition_works_for_segmentation_and_never_overwrites(tmp_path, data_root, capsys):
    if not (data_root / "msd" / "Task04_Hippocampus" / "dataset.json").is_file():
        pytest.skip("Hippocampus data absent")
    out = tmp_path / "seg_manifest.json"
    args = ["partition", "--config", str(REPO_CONFIGS / "hippocampus_seg.yaml"), "--manifest", str(out)]
    assert main(args) == 0
    m = json.loads(out.read_text())
    assert m["n_pool"] == 260 and len(m["test_indices"]) == 52
    assert sum(s["n_train"] for s in m["sites"].values()) == 208
    assert "site-3" in capsys.readouterr().out
    before = out.read_text()
    assert main(args) == 2
    assert "never overwritten" in capsys.readouterr().err and out.read_text() == before


def test_classical_baseline_refuses_segmentation(tmp_path, capsys):
    assert main(["baseline", "classical", "--config", str(REPO_CONFIGS / "hippocampus_seg.yaml"),
                 "--out", str(tmp_path)]) == 2
    assert "classification only" in capsys.readouterr().err
