import filecmp
import json
from pathlib import Path

import pytest

from monai_fl.config import ExperimentConfig
from monai_fl.fl.job import JOB_CONFIG_NAME, SITE_SCRIPT, export_job

REPO = Path(__file__).resolve().parents[2]


def _tiny() -> ExperimentConfig:
    return ExperimentConfig.from_dict({"name": "tiny", "dataset": {"name": "breastmnist"},
                                       "partition": {"n_sites": 2, "scheme": "iid"}, "network": {"name": "cnn", "width": 4},
                                       "fl": {"rounds": 3, "he": False}})


def test_plain_job_layout_and_wiring(tmp_path):
    job = export_job(_tiny(), tmp_path, he=False)
    assert job.name == "tiny_plain"
    custom = job / "app" / "custom"
    # Only the entry script and the config travel; the site runs the installed monai_fl package.
    assert sorted(p.name for p in custom.iterdir()) == sorted([SITE_SCRIPT.name, JOB_CONFIG_NAME])
    assert ExperimentConfig.load(custom / JOB_CONFIG_NAME) == _tiny()
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    flows = {w["path"].rsplit(".", 1)[1]: w["args"] for w in server["workflows"]}
    assert flows["ScatterAndGather"]["num_rounds"] == 3 and flows["ScatterAndGather"]["min_clients"] == 2
    assert "GlobalModelEval" in flows
    comps = {c["id"]: c for c in server["components"]}
    assert comps["persistor"]["args"]["model"]["path"] == "monai_fl.fl.model.ConfiguredNetwork"
    assert comps["persistor"]["args"]["model"]["args"]["config"] == _tiny().to_dict()
    assert "model_selector" not in comps, "no best-model selection on test shards"
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    ex = client["executors"][0]["executor"]["args"]
    assert ex["task_script_path"] == SITE_SCRIPT.name and ex["task_script_args"] == f"--config {JOB_CONFIG_NAME}"


def _committed_jobs():
    return sorted(p for p in (REPO / "jobs").iterdir() if (p / "meta.json").is_file()) if (REPO / "jobs").is_dir() else []


@pytest.mark.parametrize("job", _committed_jobs(), ids=lambda p: p.name)
def test_committed_job_folders_equal_a_fresh_export(job, tmp_path):
    """jobs/ is a build artefact of configs/: regenerate with `monai-fl export-jobs --config configs/...`."""
    cfg = ExperimentConfig.load(job / "app" / "custom" / JOB_CONFIG_NAME)
    fresh = export_job(cfg, tmp_path, he=job.name.endswith("_he"))
    assert fresh.name == job.name

    def same(a: Path, b: Path) -> None:
        cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
        assert not cmp.left_only and not cmp.right_only, (a, cmp.left_only, cmp.right_only)
        for f in cmp.common_files:
            assert (a / f).read_bytes() == (b / f).read_bytes(), f"{a / f} differs from a fresh export"
        for d in cmp.common_dirs:
            same(a / d, b / d)

    same(job, fresh)


def _config_named(name: str) -> ExperimentConfig | None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = ExperimentConfig.load(path)
        if cfg.name == name:
            return cfg
    return None


@pytest.mark.parametrize("job", _committed_jobs(), ids=lambda p: p.name)
def test_committed_jobs_carry_the_current_config(job):
    """A job exported before its config changed would still equal its own fresh export."""
    shipped = ExperimentConfig.load(job / "app" / "custom" / JOB_CONFIG_NAME)
    assert _config_named(shipped.name) == shipped, (
        f"{job.name} is stale: run `monai-fl export-jobs --config configs/<{shipped.name}>.yaml`")


def test_every_config_has_its_jobs():
    names = {p.name for p in _committed_jobs()}
    for path in sorted((REPO / "configs").glob("*.yaml")):
        name = ExperimentConfig.load(path).name
        assert {f"{name}_plain", f"{name}_he"} <= names, f"jobs for {path.name} are not in jobs/"
