"""Provisioned kits: contexts written and signed, server kit without a secret, allow-list extended."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from monai_fl.he.keys import (
    CLIENT_CONTEXT_FILE,
    KEY_ID_FILE,
    SERVER_CONTEXT_FILE,
    is_private,
    key_id,
    load_context,
    read_key_id,
)
from monai_fl.he.provision import ALLOW_LIST_PREFIX, write_site_resources

PROJECT = """
api_version: 3
name: he_kits
description: test
participants:
  - {name: server1, type: server, org: org, fed_learn_port: 8002}
  - {name: site-1, type: client, org: org}
  - {name: site-2, type: client, org: org}
  - {name: admin@org.com, type: admin, org: org, role: project_admin}
builders:
  - path: nvflare.lighter.impl.workspace.WorkspaceBuilder
  - path: nvflare.lighter.impl.static_file.StaticFileBuilder
    args: {config_folder: config}
  - path: monai_fl.he.provision.HECodecBuilder
    args: {params: {}}
  - path: nvflare.lighter.impl.cert.CertBuilder
  - path: nvflare.lighter.impl.signature.SignatureBuilder
"""


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Path:
    from nvflare.lighter.provision import prepare_builders, prepare_project
    from nvflare.lighter.provisioner import Provisioner

    root = tmp_path_factory.mktemp("prov")
    project_dict = yaml.safe_load(PROJECT)
    project = prepare_project(project_dict)
    Provisioner(str(root), prepare_builders(project_dict)).provision(project)
    return max((root / "he_kits").glob("prod_*"))


def test_contexts_in_kits_and_signed(kits):
    server_startup = kits / "server1" / "startup"
    assert not is_private(load_context(server_startup / SERVER_CONTEXT_FILE))
    assert not list((kits / "server1").rglob(CLIENT_CONTEXT_FILE))  # no secret anywhere in the server kit
    assert SERVER_CONTEXT_FILE in json.loads((server_startup / "signature.json").read_text())
    for site in ("site-1", "site-2"):
        startup = kits / site / "startup"
        assert is_private(load_context(startup / CLIENT_CONTEXT_FILE))
        assert CLIENT_CONTEXT_FILE in json.loads((startup / "signature.json").read_text())
    a = (kits / "site-1" / "startup" / CLIENT_CONTEXT_FILE).read_bytes()
    assert a == (kits / "site-2" / "startup" / CLIENT_CONTEXT_FILE).read_bytes()  # one shared key


def test_every_kit_names_the_key_generation(kits):
    """he_key_id.txt, signed, in every kit; the server's equals the id the sites derive from their key."""
    derived = key_id(load_context(kits / "site-1" / "startup" / CLIENT_CONTEXT_FILE))
    for p in ("server1", "site-1", "site-2"):
        startup = kits / p / "startup"
        assert read_key_id(startup / KEY_ID_FILE) == derived
        assert KEY_ID_FILE in json.loads((startup / "signature.json").read_text())


def test_allow_list_extended_in_every_kit(kits):
    for p in ("server1", "site-1", "site-2"):
        resources = json.loads((kits / p / "local" / "resources.json.default").read_text())
        allow = resources["class_allow_list"]
        assert ALLOW_LIST_PREFIX in allow
        assert "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather" in allow


def test_write_site_resources(tmp_path):
    path = write_site_resources(tmp_path / "local")
    data = json.loads(path.read_text())
    assert path.name == "resources.json" and ALLOW_LIST_PREFIX in data["class_allow_list"]
    assert len(data["class_allow_list"]) > 50  # the default list is kept, not replaced
    write_site_resources(tmp_path / "local")
    assert json.loads(path.read_text())["class_allow_list"].count(ALLOW_LIST_PREFIX) == 1


def test_allow_list_admits_the_he_components(tmp_path):
    """NVFlare's own authorizer: refused under the default list, admitted after write_site_resources."""
    from nvflare.apis.fl_exception import UnsafeComponentError
    from nvflare.app_common.widgets.component_path_authorizer import ComponentPathAuthorizer

    class Workspace:
        def __init__(self, path):
            self.path = path

        def get_resources_file_path(self):
            return str(self.path) if self.path.exists() else None

    config = {"path": "monai_fl.he.nvflare_components.HEAggregator", "args": {}}
    local = tmp_path / "local"
    with pytest.raises(UnsafeComponentError, match="not in allow_list"):
        ComponentPathAuthorizer().authorize_component_config(config, workspace=Workspace(local / "resources.json"))
    path = write_site_resources(local)
    ComponentPathAuthorizer().authorize_component_config(config, workspace=Workspace(path))
