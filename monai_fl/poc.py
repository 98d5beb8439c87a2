"""A provisioned NVFlare system on this machine's loopback: provision, start, submit, collect, stop.

This is a real deployment in miniature: the server and every site run from their own startup kit
(``startup/sub_start.sh --once``, the script a hospital runs) as separate processes in secure mode
(mutual TLS, signed HE contexts); the job is submitted with the FLARE API from the admin kit, as a
researcher would. Used by ``scripts/poc_run.py`` and ``tests/poc/test_poc.py``.

Guarantees the harness keeps:

* every host in the project and in the kits is loopback (checked before anything starts);
* every wait has a deadline;
* :meth:`PocSystem.stop` (also on error, via ``with``) asks the system to shut down through the
  admin API, then kills what is left: each process it started runs in its own process group, and
  every descendant ever seen (NVFlare's job processes run in sessions of their own) is tracked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from monai_fl.config import ExperimentConfig
from monai_fl.errors import MonaiFLError
from monai_fl.provision import (
    Kits,
    check_loopback_kits,
    check_loopback_project,
    configure_server_kit,
    configure_site_kit,
    free_loopback_ports,
    job_component_classes,
    load_project,
    provision_project,
    site_names,
)

POC_PROJECT = "monai_fl_poc"
# The PoC experiment: small enough for 2 shared cores (BreastMNIST 28 px, a 4-channel CNN, 2 sites,
# 2 rounds), but the real job: the same site script, FedAvg workflow and HE filters as the demo.
POC_EXPERIMENT = {
    "name": "poc_breastmnist",
    "dataset": {"name": "breastmnist", "size": 28},
    "partition": {"n_sites": 2, "scheme": "iid", "seed": 0},
    "network": {"name": "cnn", "width": 4},
    "train": {"epochs": 2, "batch_size": 64, "augment": False, "seed": 0, "threads": 1},
    "fl": {"rounds": 2, "local_epochs": 1, "he": True},
}
NVFLARE_DEFAULT_STORAGE = "/tmp/nvflare"  # where a provisioned server kit keeps jobs unless told otherwise
POLL_S = 1.0
TRACK_S = 0.5
# Environment a site must not inherit from the harness: it finds its data through its kit's
# local/monai_fl_site.json, and nothing may route traffic through a proxy.
SCRUBBED_ENV = ("MONAI_FL_SITE_CONFIG", "MONAI_FL_MANIFEST", "MONAI_FL_DATA", "NVFL_WORKSPACE",
                "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def poc_config(**overrides) -> ExperimentConfig:
    """The PoC experiment config; ``overrides`` are ``section={key: value}`` updates."""
    d = json.loads(json.dumps(POC_EXPERIMENT))
    for section, values in overrides.items():
        if isinstance(values, dict):
            d.setdefault(section, {}).update(values)
        else:
            d[section] = values
    return ExperimentConfig.from_dict(d)


class PocError(MonaiFLError):
    """The PoC system failed to start, a job failed, or a deadline passed."""


Log = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# set-up


@dataclass(frozen=True)
class PocSetup:
    """Everything a PoC run needs on disk: kits (configured), the job folder, the site manifest."""

    workdir: Path
    kits: Kits
    project_file: Path
    job_dir: Path
    manifest: Path
    data_root: Path
    he: bool


def prepare_poc(cfg: ExperimentConfig, data_root: str | os.PathLike | None, workdir: str | os.PathLike,
                he: bool | None = None, sites: list[str] | None = None, log: Log = _quiet) -> PocSetup:
    """Provision a loopback project for ``cfg``'s sites, write the site manifest, export the job and
    finish every kit's ``local/`` folder (site config, class allow-list, the server's job store).

    Args:
        cfg: the experiment (its ``partition.n_sites`` sites unless ``sites`` is given).
        data_root: where the MedMNIST file is (searched as ``--data-root`` is; None: ``$MONAI_FL_DATA``).
            Nothing is downloaded: a missing file is an error.
        workdir: run folder: ``provision/``, ``jobs/``, ``manifest.json`` go here.
        he: submit the HE job and provision HE keys (default ``cfg.fl.he``).
        sites: site names (default ``site-1`` … ``site-N``, the manifest's names).
        log: progress messages.
    """
    from monai_fl.data.medmnist import locate
    from monai_fl.experiment import prepare
    from monai_fl.fl.job import export_job

    # Resolve the data folder here, without downloading (a PoC run never leaves loopback), and
    # hand the sites the folder itself: they do not inherit $MONAI_FL_DATA from this process.
    data_dir = locate(cfg.dataset.name, cfg.dataset.size, data_root, download=False).parent
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    he = cfg.fl.he if he is None else he
    sites = sites or site_names(cfg.partition.n_sites)
    fed_port, admin_port = free_loopback_ports(2)
    log(f"provisioning {len(sites)} sites, server localhost:{fed_port} (admin {admin_port}), HE {'on' if he else 'off'}")
    kits, project_file = provision_project(workdir / "provision", sites=sites, name=POC_PROJECT, server_host="localhost",
                                           fed_learn_port=fed_port, admin_port=admin_port, he=he)
    check_loopback_project(load_project(project_file))
    check_loopback_kits(kits)
    manifest = workdir / "manifest.json"
    exp = prepare(cfg, data_dir, manifest)
    missing = sorted(set(sites) - set(exp.sites))
    if missing:
        raise PocError(f"sites {', '.join(missing)} are not in the site manifest {manifest} ({', '.join(exp.sites)})")
    job_dir = export_job(cfg, workdir / "jobs", he=he)
    classes = job_component_classes(job_dir)
    # The job store of this server lives in the run folder, not in NVFlare's shared /tmp/nvflare.
    configure_server_kit(kits.server, workdir / "server_storage", classes["server"])
    for kit in kits.sites.values():
        configure_site_kit(kit, data_dir, manifest, classes["client"])
    return PocSetup(workdir, kits, project_file, job_dir, manifest, data_dir, he)


# ---------------------------------------------------------------------------------------------
# processes


@dataclass
class Participant:
    name: str
    kit: Path
    proc: subprocess.Popen
    log_file: Path

    def tail(self, n_chars: int = 3000) -> str:
        """The end of the participant's console output and NVFlare log."""
        out = []
        for f in (self.log_file, self.kit / "log.txt"):
            try:
                out.append(f"--- {f}\n{f.read_text(errors='replace')[-n_chars:]}")
            except OSError:
                pass
        return "\n".join(out)


def _python_bin_dir() -> str:
    return str(Path(sys.executable).parent)


def child_env(threads: int = 1) -> dict:
    """The environment of a participant: this interpreter's ``python3`` first on PATH, site paths
    and proxies scrubbed, math libraries held to ``threads`` threads (the machine is shared)."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env["PATH"] = _python_bin_dir() + os.pathsep + env.get("PATH", "")
    env["NO_PROXY"] = env["no_proxy"] = "localhost,127.0.0.1"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class PocSystem:
    """Server, sites and an admin session, started from provisioned kits on loopback.

    Use as a context manager: leaving the block stops everything, also after an error.
    """

    def __init__(self, kits: Kits, log_dir: str | os.PathLike, log: Log = _quiet, threads: int = 1):
        check_loopback_kits(kits)
        self.kits = kits
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.env = child_env(threads)
        self.participants: dict[str, Participant] = {}
        self.session = None
        self._seen: dict[int, float] = {}  # pid -> create_time of every process we started or saw below ours
        self._seen_lock = threading.Lock()
        self._stop_tracking = threading.Event()
        self._tracker = threading.Thread(target=self._track_loop, name="poc-process-tracker", daemon=True)
        self._tracker.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- starting ----------------------------------------------------------------------------

    def start(self, name: str, kit: str | os.PathLike) -> Participant:
        """Start one participant from its kit: ``startup/sub_start.sh --once`` in a new session.

        ``--once`` runs NVFlare directly (no restart loop), so stopping it is final.
        """
        kit = Path(kit).resolve()
        script = kit / "startup" / "sub_start.sh"
        if not script.is_file():
            raise PocError(f"{kit} is not a startup kit: {script} is missing")
        log_file = self.log_dir / f"{name}.out"
        with open(log_file, "w") as out:
            proc = subprocess.Popen(["bash", str(script), "--once"], cwd=kit, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self._remember(proc.pid)
        p = Participant(name, kit, proc, log_file)
        self.participants[name] = p
        self.log(f"started {name} (pid {proc.pid}) from {kit}")
        return p

    def start_server(self) -> Participant:
        """Start the server; a kit still using NVFlare's machine-wide job store (``/tmp/nvflare``)
        gets one in this system's log folder first, so that runs never share jobs."""
        resources = self.kits.server / "local" / "resources.json"
        if not resources.is_file() or NVFLARE_DEFAULT_STORAGE in resources.read_text():
            configure_server_kit(self.kits.server, self.log_dir / "server_storage")
            self.log(f"server job store: {self.log_dir / 'server_storage'}")
        return self.start("server", self.kits.server)

    def start_sites(self, names: list[str] | None = None) -> list[Participant]:
        return [self.start(n, self.kits.sites[n]) for n in (names or list(self.kits.sites))]

    # -- readiness ---------------------------------------------------------------------------

    def _check_alive(self, name: str) -> None:
        p = self.participants.get(name)
        if p is not None and p.proc.poll() is not None:
            raise PocError(f"{name} exited (code {p.proc.returncode}) before it was ready:\n{p.tail()}")

    def connect(self, timeout: float = 120.0):
        """Log in with the admin kit once the server answers; returns the FLARE API session."""
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            self._check_alive("server")
            try:
                self.session = new_secure_session(self.kits.admin_name, str(self.kits.admin),
                                                  timeout=min(10.0, max(1.0, deadline - time.monotonic())))
                self.log(f"admin {self.kits.admin_name} logged in")
                return self.session
            except Exception as exc:  # noqa: BLE001 - while the server starts, login fails in several ways
                last = exc
                time.sleep(POLL_S)
        server = self.participants.get("server")
        raise PocError(f"the server did not accept the admin login within {timeout:.0f} s ({last})\n"
                       + (server.tail() if server else ""))

    def connected_sites(self) -> list[str]:
        return sorted(c.name for c in self.session.get_connected_client_list())

    def wait_sites(self, names: list[str] | None = None, timeout: float = 120.0) -> list[str]:
        """Wait until every named site has registered with the server."""
        names = sorted(names or self.kits.sites)
        deadline = time.monotonic() + timeout
        connected: list[str] = []
        while time.monotonic() < deadline:
            for n in names:
                self._check_alive(n)
            connected = self.connected_sites()
            if set(names) <= set(connected):
                self.log(f"sites connected: {', '.join(connected)}")
                return connected
            time.sleep(POLL_S)
        raise PocError(f"sites {', '.join(sorted(set(names) - set(connected)))} did not register within "
                       f"{timeout:.0f} s (connected: {connected or 'none'})\n"
                       + "\n".join(self.participants[n].tail() for n in names if n in self.participants))

    # -- jobs --------------------------------------------------------------------------------

    def submit(self, job_dir: str | os.PathLike) -> str:
        job_id = self.session.submit_job(str(job_dir))
        self.log(f"submitted {Path(job_dir).name} as job {job_id}")
        return job_id

    def wait_job(self, job_id: str, timeout: float) -> dict:
        """Poll the job's status until it ends; on the deadline abort it and raise.

        Returns:
            The final job meta (``status`` is ``FINISHED:COMPLETED`` on success, another
            ``FINISHED:...`` value when it failed or was aborted).
        """
        deadline = time.monotonic() + timeout
        status = last = None
        while time.monotonic() < deadline:
            self._check_alive("server")
            meta = self.session.get_job_meta(job_id)
            status = meta.get("status")
            if status != last:
                self.log(f"job {job_id}: {status}")
                last = status
            if isinstance(status, str) and status.startswith("FINISHED"):
                return meta
            time.sleep(2 * POLL_S)
        try:
            self.session.abort_job(job_id)
        except Exception as exc:  # noqa: BLE001 - the timeout below is the error to report
            self.log(f"abort of job {job_id} failed: {exc}")
        raise PocError(f"job {job_id} did not finish within {timeout:.0f} s (last status {status}); aborted")

    def download(self, job_id: str, dest: str | os.PathLike | None = None) -> Path:
        """Download the job's result (the server's run workspace) from the server."""
        path = Path(self.session.download_job_result(job_id))
        if dest is not None:
            import shutil

            dest = Path(dest)
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(path, dest)
            path = dest
        self.log(f"job {job_id} result: {path}")
        return path

    # -- stopping ----------------------------------------------------------------------------

    def _remember(self, pid: int) -> None:
        try:
            ct = psutil.Process(pid).create_time()
        except psutil.Error:
            return
        with self._seen_lock:
            self._seen.setdefault(pid, ct)

    def _track_once(self) -> None:
        for p in list(self.participants.values()):
            try:
                for child in psutil.Process(p.proc.pid).children(recursive=True):
                    self._remember(child.pid)
            except psutil.Error:
                pass

    def _track_loop(self) -> None:
        while not self._stop_tracking.wait(TRACK_S):
            self._track_once()

    def alive(self) -> list[psutil.Process]:
        """Processes this system started (or that descend from them) that are still running."""
        out = []
        with self._seen_lock:
            seen = dict(self._seen)
        for pid, ct in seen.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == ct and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(proc)
            except psutil.Error:
                pass
        return out

    def socket_addresses(self) -> set[str]:
        """Every local and remote IP address of the inet sockets the system's processes hold now."""
        found = set()
        for proc in self.alive():
            try:
                for c in proc.net_connections(kind="inet"):
                    found.add(c.laddr.ip)
                    if c.raddr:
                        found.add(c.raddr.ip)
            except psutil.Error:
                pass
        return found

    def _signal_all(self, sig: int) -> None:
        own_group = os.getpgrp()
        for proc in self.alive():
            try:
                pgid = os.getpgid(proc.pid)
                # Only groups we created (leaders we started, job processes in their own sessions).
                if pgid != own_group and pgid == proc.pid:
                    os.killpg(pgid, sig)
                else:
                    proc.send_signal(sig)
            except (ProcessLookupError, PermissionError, psutil.Error):
                pass

    def stop(self, grace: float = 30.0) -> None:
        """Shut the system down: admin ``shutdown all``, then SIGTERM and SIGKILL to whatever remains."""
        self._track_once()
        asked = False
        if self.session is not None:
            try:
                self.session.shutdown("all", wait=False)
                asked = True
                self.log("admin: shutdown all")
            except Exception as exc:  # noqa: BLE001 - stopping goes on whatever the server answers
                self.log(f"admin shutdown failed ({exc}); killing the processes")
            try:
                self.session.close()
            except Exception as exc:  # noqa: BLE001
                self.log(f"closing the admin session failed: {exc}")
            self.session = None
        # Give a system that was asked to shut down time to do so; otherwise signal at once.
        deadline = time.monotonic() + (grace if asked else 0.0)
        while time.monotonic() < deadline and any(p.proc.poll() is None for p in self.participants.values()):
            self._track_once()
            time.sleep(POLL_S)
        self._track_once()
        self._stop_tracking.set()
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            if not self.alive():
                break
            self._signal_all(sig)
            end = time.monotonic() + wait
            while time.monotonic() < end and self.alive():
                time.sleep(0.2)
        for p in self.participants.values():
            try:
                p.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        left = self.alive()
        if left:
            self.log(f"still alive after stop: {[p.pid for p in left]}")
        else:
            self.log("all processes stopped")


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class PocResult:
    job_id: str
    status: str
    result_dir: Path | None
    rounds: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)  # site -> metrics of the final global model
    site_models: dict = field(default_factory=dict)  # site -> global_model_final.pt
    wall_time_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "FINISHED:COMPLETED"


def read_job_result(result_dir: str | os.PathLike) -> tuple[list[dict], dict]:
    """Per-round metrics the sites reported, and each site's metrics of the final global model,
    from a downloaded job result (the same files the simulator writes)."""
    result_dir = Path(result_dir)
    rounds, final = [], {}
    for f in sorted(result_dir.rglob("round_metrics.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            rounds.append({"round": rec["round"],
                           "sites": {s["name"]: {m["name"]: m["value"] for m in s["metrics"]} for s in rec["sites"]}})
    for f in sorted(result_dir.rglob("cross_val_results.json")):
        for site, by_model in json.loads(f.read_text()).items():
            if by_model:
                final[site] = next(iter(by_model.values()))
    return rounds, final


def site_final_models(kits: Kits, job_id: str) -> dict[str, Path]:
    """The decrypted final global model each site saved in its own workspace for ``job_id``."""
    from monai_fl.fl.client import final_model_path

    paths = {s: final_model_path(k, job_id) for s, k in kits.sites.items()}
    return {s: p for s, p in paths.items() if p.is_file()}


def run_job(system: PocSystem, setup: PocSetup, timeout: float) -> PocResult:
    """Submit the set-up's job on a running system, wait for it and collect what came back."""
    t0 = time.perf_counter()
    job_id = system.submit(setup.job_dir)
    meta = system.wait_job(job_id, timeout)
    result_dir = system.download(job_id, setup.workdir / "results" / job_id)
    rounds, final = read_job_result(result_dir)
    return PocResult(job_id, meta.get("status", ""), result_dir, rounds, final, site_final_models(setup.kits, job_id),
                     time.perf_counter() - t0)


def run_poc(cfg: ExperimentConfig, data_root: str | os.PathLike | None, workdir: str | os.PathLike,
            he: bool | None = None, start_timeout: float = 180.0, job_timeout: float = 600.0,
            log: Log = _quiet) -> tuple[PocSetup, PocResult]:
    """Provision, start the server and every site, run ``cfg``'s job once, stop everything.

    Returns:
        (the set-up on disk, the job's result). Raises :class:`PocError` on failure; every
        process is stopped either way.
    """
    setup = prepare_poc(cfg, data_root, workdir, he=he, log=log)
    with PocSystem(setup.kits, setup.workdir / "logs", log=log) as system:
        system.start_server()
        system.connect(start_timeout)
        system.start_sites()
        system.wait_sites(timeout=start_timeout)
        result = run_job(system, setup, job_timeout)
    return setup, result
