"""workspace/project.yml and monai-fl provision: rendering, standard provisioning, loopback checks,
a site kit's local/ folder. Fast (a few seconds of provisioning); no system is started."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from monai_fl.errors import MonaiFLError
from monai_fl.fl.site_config import SITE_CONFIG_FILE, resolve_site_paths
from monai_fl.he.keys import CLIENT_CONTEXT_FILE, SERVER_CONTEXT_FILE, is_private, load_context
from monai_fl.provision import (
    PROJECT_TEMPLATE,
    SIGNATURE_BUILDER,
    add_provision_subcommand,
    allow_classes,
    check_loopback_kits,
    check_loopback_project,
    configure_server_kit,
    configure_site_kit,
    find_kits,
    free_loopback_ports,
    he_builder,
    is_loopback_host,
    load_project,
    render_project,
)


@pytest.fixture(scope="module")
def standard_kits(tmp_path_factory):
    """``nvflare provision -p workspace/project.yml -w <dir>``, exactly as IT staff run it."""
    ws = tmp_path_factory.mktemp("std")
    nvflare = str(Path(sys.executable).with_name("nvflare"))
    proc = subprocess.run([nvflare, "provision", "-p", str(PROJECT_TEMPLATE), "-w", str(ws)], cwd=ws,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return find_kits(ws, load_project(PROJECT_TEMPLATE))


def test_template_three_sites_admin_he_before_signature():
    project = load_project(PROJECT_TEMPLATE)
    kinds = [p["type"] for p in project["participants"]]
    assert kinds.count("server") == 1 and kinds.count("client") == 3 and kinds.count("admin") == 1
    paths = [b["path"] for b in project["builders"]]
    assert he_builder(project) == "monai_fl.he.provision.HECodecBuilder"
    assert paths.index(he_builder(project)) < paths.index(SIGNATURE_BUILDER)
    check_loopback_project(project)  # the committed file is a loopback trial as is


def test_standard_provisioning_splits_the_he_keys(standard_kits):
    kits = standard_kits
    assert sorted(kits.sites) == ["site-1", "site-2", "site-3"]
    assert not is_private(load_context(kits.server / "startup" / SERVER_CONTEXT_FILE))
    assert not list(kits.server.rglob(CLIENT_CONTEXT_FILE)) and not list(kits.admin.rglob("*.tenseal"))
    for kit in kits.sites.values():
        assert is_private(load_context(kit / "startup" / CLIENT_CONTEXT_FILE))
        assert not (kit / "startup" / SERVER_CONTEXT_FILE).exists()
        assert CLIENT_CONTEXT_FILE in json.loads((kit / "startup" / "signature.json").read_text())
    assert SERVER_CONTEXT_FILE in json.loads((kits.server / "startup" / "signature.json").read_text())
    assert [h for _, h, _ in check_loopback_kits(kits)] == ["localhost"] * 6


def test_render_sites_ports_and_plaintext():
    template = load_project(PROJECT_TEMPLATE)
    project = render_project(template, sites=["site-1", "clinic_b"], name="trial", fed_learn_port=9102,
                             admin_port=9103)
    clients = [p for p in project["participants"] if p["type"] == "client"]
    assert [c["name"] for c in clients] == ["site-1", "clinic_b"]
    assert clients[0]["org"] == "hospital_1" and clients[1]["org"] == "clinic_b"
    server = next(p for p in project["participants"] if p["type"] == "server")
    assert (server["fed_learn_port"], server["admin_port"], project["name"]) == (9102, 9103, "trial")
    assert he_builder(render_project(template, he=False)) is None
    assert template["name"] == "monai_fl"  # the template itself is untouched


@pytest.mark.parametrize("sites, match", [(["site-1", "site-1"], "distinct"), (["bad name"], "invalid")])
def test_render_rejects_bad_site_names(sites, match):
    with pytest.raises(MonaiFLError, match=match):
        render_project(load_project(PROJECT_TEMPLATE), sites=sites)


def test_he_builder_after_signature_is_refused():
    project = load_project(PROJECT_TEMPLATE)
    he = next(b for b in project["builders"] if b["path"] == he_builder(project))
    project["builders"] = [b for b in project["builders"] if b is not he] + [he]
    with pytest.raises(MonaiFLError, match="before"):
        render_project(project)


@pytest.mark.parametrize("host, ok", [("localhost", True), ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True),
                                      ("LOCALHOST.", True), ("0.0.0.0", False), ("10.0.0.5", False),
                                      ("server.hospital.org", False), ("localhost.evil.org", False)])
def test_is_loopback_host(host, ok):
    assert is_loopback_host(host) is ok


def test_non_loopback_project_is_refused():
    project = render_project(load_project(PROJECT_TEMPLATE), server_host="fl.hospital-net.org")
    with pytest.raises(MonaiFLError, match="fl.hospital-net.org"):
        check_loopback_project(project)


def test_free_loopback_ports_are_distinct():
    a, b = free_loopback_ports(2)
    assert a != b and 0 < a < 65536 and 0 < b < 65536


def test_site_kit_local_config(standard_kits, tmp_path, monkeypatch):
    for var in ("MONAI_FL_SITE_CONFIG", "MONAI_FL_MANIFEST", "MONAI_FL_DATA"):
        monkeypatch.delenv(var, raising=False)
    kit = standard_kits.sites["site-3"]
    data, manifest = tmp_path / "data", tmp_path / "manifest.json"
    data.mkdir()
    manifest.write_text("{}")
    with pytest.raises(MonaiFLError, match=str(tmp_path / "nope")):
        configure_site_kit(kit, tmp_path / "nope", manifest)
    path = configure_site_kit(kit, data, manifest, {"monai_fl.fl.model.ConfiguredNetwork"})
    assert path == kit / "local" / SITE_CONFIG_FILE
    paths = resolve_site_paths(kit)  # what the site script reads at run time
    assert (paths.data_root, paths.manifest) == (data.resolve(), manifest.resolve())
    allow = json.loads((kit / "local" / "resources.json").read_text())["class_allow_list"]
    assert "monai_fl.fl.model.ConfiguredNetwork" in allow and "monai_fl.he." in allow
    assert "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather" in allow  # defaults kept
    allow_classes(kit, {"monai_fl.fl.model.ConfiguredNetwork", "monai_fl.he.nvflare_components.HEAggregator"})
    again = json.loads((kit / "local" / "resources.json").read_text())["class_allow_list"]
    assert again == allow  # nothing repeated; monai_fl.he. already covers the HE classes


def test_monai_fl_provision_command(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_provision_subcommand(parser.add_subparsers())
    args = parser.parse_args(["provision", "-w", str(tmp_path), "--sites", "2", "--free-ports", "--name", "cli_trial"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    kits = find_kits(tmp_path, load_project(tmp_path / "project.yml"))
    assert sorted(kits.sites) == ["site-1", "site-2"] and str(kits.root) in out
    ports = {p for _, _, p in check_loopback_kits(kits)}
    assert len(ports) == 2 and not ports & {8002, 8003}
    assert (kits.sites["site-1"] / "startup" / CLIENT_CONTEXT_FILE).is_file()


def test_server_kit_job_store_moved_out_of_tmp(standard_kits, tmp_path):
    path = configure_server_kit(standard_kits.server, tmp_path / "store", {"monai_fl.fl.model.ConfiguredNetwork"})
    text = path.read_text()
    assert "/tmp/nvflare" not in text
    resources = json.loads(text)
    manager = next(c for c in resources["components"] if c["id"] == "job_manager")
    assert manager["args"]["uri_root"] == str(tmp_path / "store" / "jobs-storage")
    assert (tmp_path / "store" / "snapshot-storage").is_dir()
    assert "monai_fl.fl.model.ConfiguredNetwork" in resources["class_allow_list"]
