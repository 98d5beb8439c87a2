"""End-to-end PoC on loopback: provisioned kits, server and two sites as real processes, the HE job
submitted with the FLARE API, and the bad inputs (missing data path, another project's kit).

One system is started for the module (≈ 2-3 min on 2 cores in all). Run only these tests with
``pytest -m poc``; ``python scripts/poc_run.py`` is the same run as a script.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest
import torch

from monai_fl.fl.model import ConfiguredNetwork
from monai_fl.fl.site_config import SITE_CONFIG_FILE
from monai_fl.he.keys import CLIENT_CONTEXT_FILE, SERVER_CONTEXT_FILE, is_private, load_context
from monai_fl.poc import PocSystem, poc_config, prepare_poc, run_job
from monai_fl.provision import (
    check_loopback_kits,
    check_loopback_project,
    configure_site_kit,
    is_loopback_host,
    kit_endpoints,
    load_project,
    provision_project,
)

# Deadlines: about 2x or more the phases measured on 2 shared cores (whole system up in ≈ 8 s,
# the HE job ≈ 30 s, the failing job ≈ 20 s), so a hang fails in minutes with the harness's own
# message. The per-test timeout covers the worst case, a test whose set-up starts the system and
# runs the HE job (provisioning, 2 x START_TIMEOUT, JOB_TIMEOUT: ≈ 215 s).
pytestmark = [pytest.mark.poc, pytest.mark.timeout(300)]

START_TIMEOUT = 60.0  # each of: the server accepts the admin login; every site registered
JOB_TIMEOUT = 90.0
FAILED_JOB_TIMEOUT = 60.0
FOREIGN_WATCH_S = 25.0


@pytest.fixture(scope="module")
def cfg():
    return poc_config()


@pytest.fixture(scope="module")
def poc(tmp_path_factory, data_root, cfg):
    if not (data_root / "medmnist" / "breastmnist.npz").is_file():
        pytest.skip(f"{data_root}/medmnist/breastmnist.npz absent")
    workdir = tmp_path_factory.mktemp("poc")
    setup = prepare_poc(cfg, data_root, workdir, log=print)
    system = PocSystem(setup.kits, workdir / "logs", log=print)
    try:
        system.start_server()
        system.connect(START_TIMEOUT)
        system.start_sites()
        system.wait_sites(timeout=START_TIMEOUT)
        yield setup, system
    finally:
        system.stop()


@pytest.fixture(scope="module")
def he_run(poc):
    """The HE job, run once; later tests reuse its result. While it runs, the IP addresses of every
    socket of every process of the system are sampled (``he_run.addresses``)."""
    import threading

    setup, system = poc
    addresses: set[str] = set()
    done = threading.Event()

    def sample():
        while not done.wait(0.5):
            addresses.update(system.socket_addresses())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = run_job(system, setup, JOB_TIMEOUT)
    finally:
        done.set()
        sampler.join()
    result.addresses = addresses
    return result


def _files(root: Path):
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def _secret_key_bytes(site_context: Path) -> bytes:
    from monai_fl.he.backend import ByteBridge

    bridge = ByteBridge()
    try:
        return bridge.dump(load_context(site_context).secret_key().data)
    finally:
        bridge.close()


def _assert_no_secret(root: Path, site_context: Path) -> None:
    """No file under ``root`` is or holds the sites' secret key: none is named like the site context,
    none contains its bytes or the serialized secret key, none deserializes to a private context."""
    context_bytes, secret = site_context.read_bytes(), _secret_key_bytes(site_context)
    import tenseal as ts

    for f in _files(root):
        assert f.name != CLIENT_CONTEXT_FILE, f
        data = f.read_bytes()
        assert context_bytes not in data and secret not in data, f"{f} holds the sites' secret key"
        if f.suffix == ".tenseal":
            assert not ts.context_from(data).is_private(), f"{f} is a private TenSEAL context"


def test_every_address_is_loopback(poc):
    setup, _ = poc
    check_loopback_project(load_project(setup.project_file))
    endpoints = check_loopback_kits(setup.kits)
    assert len(endpoints) == 2 + len(setup.kits.sites) + 1  # server FL + admin, each site, the admin kit
    assert all(is_loopback_host(h) for _, h, _ in kit_endpoints(setup.kits))
    # the server binds to 127.0.0.1 only: its listening sockets are all loopback
    server = psutil.Process(poc[1].participants["server"].proc.pid)
    listening = [c.laddr for c in server.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(is_loopback_host(a.ip) for a in listening), listening


def test_every_socket_during_the_job_is_loopback(he_run):
    assert he_run.addresses, "no socket was sampled"
    assert all(is_loopback_host(a) for a in he_run.addresses), sorted(he_run.addresses)


def test_server_kit_holds_no_secret_key_sites_share_one(poc):
    setup, _ = poc
    kits = setup.kits
    server_ctx = load_context(kits.server / "startup" / SERVER_CONTEXT_FILE)
    assert not is_private(server_ctx)
    signed = json.loads((kits.server / "startup" / "signature.json").read_text())
    assert SERVER_CONTEXT_FILE in signed
    site_contexts = [k / "startup" / CLIENT_CONTEXT_FILE for k in kits.sites.values()]
    for ctx in site_contexts:
        assert is_private(load_context(ctx))
        assert CLIENT_CONTEXT_FILE in json.loads((ctx.parent / "signature.json").read_text())
    assert len({c.read_bytes() for c in site_contexts}) == 1
    _assert_no_secret(kits.server, site_contexts[0])
    _assert_no_secret(kits.admin, site_contexts[0])


def test_site_config_is_in_the_kit_not_in_the_job(poc):
    setup, _ = poc
    for kit in setup.kits.sites.values():
        site_cfg = json.loads((kit / "local" / SITE_CONFIG_FILE).read_text())
        assert Path(site_cfg["manifest"]) == setup.manifest
        allow = json.loads((kit / "local" / "resources.json").read_text())["class_allow_list"]
        assert "nvflare.app_common.executors.client_api_executor.ClientAPIExecutor" in allow
    job_text = "".join(p.read_text(errors="replace") for p in _files(setup.job_dir))
    assert str(setup.data_root) not in job_text and str(setup.manifest) not in job_text


def test_he_job_returns_global_model_and_metrics(poc, he_run, cfg):
    setup, _ = poc
    assert he_run.status == "FINISHED:COMPLETED", he_run
    sites = sorted(setup.kits.sites)
    # per-round metrics every site reported for the global model it received
    assert [r["round"] for r in he_run.rounds] == list(range(cfg.fl.rounds))
    for rec in he_run.rounds:
        assert sorted(rec["sites"]) == sites
        assert {"auc", "acc", "train_loss"} <= set(rec["sites"]["site-1"])
    # every site evaluated the final global model
    assert sorted(he_run.final) == sites
    for m in he_run.final.values():
        assert 0.0 <= m["auc"] <= 1.0 and m["n"] > 0
    # ... and, on the pooled test set, every site saw the same model
    assert len({round(m["pooled_auc"], 12) for m in he_run.final.values()}) == 1
    # the global model came back to the sites (decrypted there); all hold the same one
    assert sorted(he_run.site_models) == sites
    states = [torch.load(p, map_location="cpu", weights_only=True) for p in he_run.site_models.values()]
    ConfiguredNetwork(cfg.to_dict()).load_state_dict(states[0])
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    # the job is stored in this run's folder (not in NVFlare's default, machine-wide /tmp/nvflare)
    assert (setup.workdir / "server_storage" / "jobs-storage" / he_run.job_id).is_dir()
    # the server kept only the encrypted model and never held the secret key, also after the run
    server_models = [p.name for p in _files(he_run.result_dir) if p.suffix in (".pt", ".he")]
    assert "FL_global_model.he" in server_models and "FL_global_model.pt" not in server_models
    site_ctx = next(iter(setup.kits.sites.values())) / "startup" / CLIENT_CONTEXT_FILE
    _assert_no_secret(setup.kits.server, site_ctx)
    _assert_no_secret(he_run.result_dir, site_ctx)


def test_foreign_project_kit_is_refused(poc, he_run, tmp_path):
    """Clients from another project (another root CA) aimed at this server never register.

    ``site-9`` uses its kit as provisioned: it refuses the server's certificate. ``site-8`` also
    trusts this project's root CA (appended to its ``rootCA.pem``), so it accepts the server; the
    server must then refuse the client certificate its CA never signed (mutual TLS).
    """
    setup, system = poc
    server_cfg = json.loads((setup.kits.server / "startup" / "fed_server.json").read_text())["servers"][0]
    fed_port = int(server_cfg["service"]["target"].rpartition(":")[2])
    foreign, _ = provision_project(tmp_path / "foreign", sites=["site-8", "site-9"], name="other_hospital_net",
                                   server_host="localhost", fed_learn_port=fed_port,
                                   admin_port=int(server_cfg["admin_port"]), he=False)
    our_ca = setup.kits.server / "startup" / "rootCA.pem"
    assert (foreign.sites["site-9"] / "startup" / "rootCA.pem").read_bytes() != our_ca.read_bytes()
    bundle = foreign.sites["site-8"] / "startup" / "rootCA.pem"
    bundle.write_bytes(bundle.read_bytes() + our_ca.read_bytes())
    with PocSystem(foreign, tmp_path / "logs", log=print) as intruders:
        started = intruders.start_sites(["site-8", "site-9"])
        deadline = time.monotonic() + FOREIGN_WATCH_S
        while time.monotonic() < deadline:
            connected = system.connected_sites()
            assert "site-8" not in connected and "site-9" not in connected
            time.sleep(2)
        logs = {p.name: p.tail(20000) for p in started}
    assert not {"site-8", "site-9"} & set(system.connected_sites())
    assert intruders.alive() == []
    # site-9 cannot verify the server (unknown CA); site-8 can, and the server drops it in the handshake
    assert "CERTIFICATE_VERIFY_FAILED" in logs["site-9"], logs["site-9"][-2000:]
    assert "CERTIFICATE_VERIFY_FAILED" not in logs["site-8"]
    assert "Server disconnected" in logs["site-8"] or "Connection reset by peer" in logs["site-8"], logs["site-8"][-2000:]
    # the legitimate sites are unaffected
    assert set(setup.kits.sites) <= set(system.connected_sites())


def test_missing_data_path_is_reported_and_job_ends(poc, he_run):
    setup, system = poc
    kit = setup.kits.sites["site-2"]
    site_cfg = kit / "local" / SITE_CONFIG_FILE
    original = site_cfg.read_text()
    missing = setup.workdir / "no" / "such" / "data"
    configure_site_kit(kit, missing, setup.manifest, check=False)
    try:
        t0 = time.monotonic()
        job_id = system.submit(setup.job_dir)
        meta = system.wait_job(job_id, FAILED_JOB_TIMEOUT)  # raises if it does not end in time
        elapsed = time.monotonic() - t0
    finally:
        site_cfg.write_text(original)
    assert meta["status"].startswith("FINISHED") and meta["status"] != "FINISHED:COMPLETED", meta["status"]
    assert elapsed < FAILED_JOB_TIMEOUT
    # the site's own log names the path and says what is wrong
    logs = "".join(f.read_text(errors="replace") for f in (kit / job_id).rglob("log.txt"))
    assert f"site data path {missing} " in logs and "does not exist" in logs
    # the system survives a failed job: both sites still connected
    assert set(setup.kits.sites) <= set(system.connected_sites())


def test_stop_leaves_no_process(poc):
    _, system = poc
    system.stop()
    assert system.alive() == []
    assert all(p.proc.poll() is not None for p in system.participants.values())
    assert [c for c in psutil.Process().children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE] == []


def test_failed_start_still_stops_everything(tmp_path):
    """The server cannot open its admin port (taken): the harness raises within its deadline and
    leaves no process behind."""
    import socket

    from monai_fl.poc import PocError
    from monai_fl.provision import free_loopback_ports

    fed_port, admin_port = free_loopback_ports(2)
    kits, _ = provision_project(tmp_path / "busy", sites=["site-1"], name="busy_port", server_host="localhost",
                                fed_learn_port=fed_port, admin_port=admin_port, he=False)
    t0 = time.monotonic()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", admin_port))
        blocker.listen()
        with pytest.raises(PocError, match="did not accept the admin login"), \
                PocSystem(kits, tmp_path / "logs", log=print) as system:
            system.start_server()
            system.connect(timeout=15)
    assert time.monotonic() - t0 < 90
    # the harness gave this unconfigured kit a job store of its own (not NVFlare's /tmp/nvflare)
    assert (tmp_path / "logs" / "server_storage" / "jobs-storage").is_dir()
    assert system.alive() == []
    assert [c for c in psutil.Process().children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE] == []
