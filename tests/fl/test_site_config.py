import json

import pytest

from monai_fl.errors import MonaiFLError
from monai_fl.fl.site_config import (
    MANIFEST_ENV,
    SITE_CONFIG_ENV,
    SITE_CONFIG_FILE,
    resolve_site_paths,
    write_site_config,
)


@pytest.fixture
def clean_env(monkeypatch):
    for var in (SITE_CONFIG_ENV, MANIFEST_ENV, "MONAI_FL_DATA"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_site_local_file_in_the_workspace_is_used(clean_env, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "m.json").write_text("{}")
    ws = tmp_path / "site-1"
    (ws / "local").mkdir(parents=True)
    (ws / "local" / SITE_CONFIG_FILE).write_text(json.dumps({"data_root": "../../data", "manifest": "../../m.json"}))
    paths = resolve_site_paths(ws)
    assert paths.data_root == (tmp_path / "data").resolve()
    assert paths.manifest == (tmp_path / "m.json").resolve()
    assert str(ws / "local" / SITE_CONFIG_FILE) in paths.source


def test_env_file_wins_over_workspace_file(clean_env, tmp_path):
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "b.json").write_text("{}")
    env_file = write_site_config(tmp_path / "env_site.json", None, tmp_path / "a.json")
    write_site_config(tmp_path / "ws" / "local" / SITE_CONFIG_FILE, None, tmp_path / "b.json")
    clean_env.setenv(SITE_CONFIG_ENV, str(env_file))
    assert resolve_site_paths(tmp_path / "ws").manifest == (tmp_path / "a.json").resolve()


def test_missing_data_path_is_named(clean_env, tmp_path):
    (tmp_path / "m.json").write_text("{}")
    cfg = write_site_config(tmp_path / "site.json", tmp_path / "no_such_data", tmp_path / "m.json")
    clean_env.setenv(SITE_CONFIG_ENV, str(cfg))
    with pytest.raises(MonaiFLError, match=f"site data path {tmp_path / 'no_such_data'} .*does not exist"):
        resolve_site_paths()


def test_missing_manifest_is_named(clean_env, tmp_path):
    clean_env.setenv(MANIFEST_ENV, str(tmp_path / "gone.json"))
    with pytest.raises(MonaiFLError, match=f"site manifest {tmp_path / 'gone.json'} .*does not exist"):
        resolve_site_paths()


def test_nothing_configured_says_what_to_write(clean_env, tmp_path):
    with pytest.raises(MonaiFLError, match="no site configuration") as exc:
        resolve_site_paths(tmp_path / "ws")
    assert SITE_CONFIG_FILE in str(exc.value)
