"""Provisioning: NVFlare startup kits with HE key material, and the site-local settings of a kit.

``workspace/project.yml`` is a standard NVFlare project (``nvflare provision -p ... -w ...`` works on
it as is). This module renders it for other site names, counts or ports, runs NVFlare's own
provisioning command on the result, and finishes each kit's ``local/`` folder, the part of a kit
that the receiving site owns and may edit (``local/`` is not verified against the kit's signature):

* ``local/monai_fl_site.json``: where this site's data and site manifest live
  (:mod:`monai_fl.fl.site_config`); never inside the job, so one job runs at every hospital.
* ``local/resources.json``: NVFlare's defaults plus the ``class_allow_list`` entries for the
  monai-fl job's component classes that are not on NVFlare 2.9's default list.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from monai_fl.errors import MonaiFLError

PROJECT_TEMPLATE = Path(__file__).resolve().parents[1] / "workspace" / "project.yml"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pneumoniamnist_he.yaml"
SIGNATURE_BUILDER = "nvflare.lighter.impl.signature.SignatureBuilder"
# Builders that write HE contexts: ours (the tuned codec's keys) or NVFlare's stock CKKS one.
HE_BUILDER_PREFIXES = ("monai_fl.he.", "nvflare.lighter.impl.he.")
SITE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # NVFlare's client name pattern
ORG_NAME = re.compile(r"^[A-Za-z0-9_]+$")
RESOURCES = "resources.json"
RESOURCES_DEFAULT = "resources.json.default"
CLASS_ALLOW_LIST = "class_allow_list"  # nvflare.app_common.widgets.component_path_authorizer
PROVISION_TIMEOUT_S = 300


# ---------------------------------------------------------------------------------------------
# project.yml


def load_project(path: str | os.PathLike = PROJECT_TEMPLATE) -> dict:
    """Read an NVFlare project file.

    Raises:
        MonaiFLError: missing, not YAML, or without exactly one server.
    """
    path = Path(path)
    if not path.is_file():
        raise MonaiFLError(f"project file {path} does not exist")
    try:
        project = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MonaiFLError(f"project file {path} is not valid YAML ({exc})") from None
    if not isinstance(project, dict) or not isinstance(project.get("participants"), list):
        raise MonaiFLError(f"project file {path} has no 'participants' list")
    if len(_of_type(project, "server")) != 1:
        raise MonaiFLError(f"project file {path} must define exactly one server")
    return project


def _of_type(project: dict, kind: str) -> list[dict]:
    return [p for p in project["participants"] if p.get("type") == kind]


def site_names(n_sites: int) -> list[str]:
    """``site-1`` … ``site-N``: the names the site manifest and the simulator use."""
    if n_sites < 1:
        raise MonaiFLError(f"--sites must be at least 1, got {n_sites}")
    return [f"site-{i}" for i in range(1, n_sites + 1)]


def render_project(
    template: dict,
    sites: list[str] | None = None,
    name: str | None = None,
    server_host: str | None = None,
    fed_learn_port: int | None = None,
    admin_port: int | None = None,
    he: bool = True,
) -> dict:
    """The template with other sites, server host, ports or project name (a copy).

    Args:
        template: a project dict (:func:`load_project`).
        sites: client names (default: the template's). A site the template names keeps its org;
            a new one gets an org derived from its name.
        name: project name (it names the workspace folder, and every kit records it).
        server_host: the server's name = the host clients and admins connect to and the server binds.
        fed_learn_port, admin_port: the server's ports.
        he: keep the HE builder; False drops it (a plaintext system: the HE job cannot run on it).

    Raises:
        MonaiFLError: a bad site name, duplicate names, or the HE builder after SignatureBuilder.
    """
    project = copy.deepcopy(template)
    if name:
        project["name"] = name
    server = _of_type(project, "server")[0]
    if server_host:
        server["name"] = server_host
    if fed_learn_port is not None:
        server["fed_learn_port"] = int(fed_learn_port)
    if admin_port is not None:
        server["admin_port"] = int(admin_port)
    if sites is not None:
        if len(set(sites)) != len(sites):
            raise MonaiFLError(f"site names must be distinct: {', '.join(sites)}")
        for s in sites:
            if not SITE_NAME.match(s):
                raise MonaiFLError(f"site name '{s}' is invalid: use letters, digits, '-' and '_' only")
        known = {p["name"]: p for p in _of_type(project, "client")}
        clients = [dict(known.get(s) or {"name": s, "type": "client", "org": _org_for(s)}) for s in sites]
        others = [p for p in project["participants"] if p.get("type") != "client"]
        server_idx = next(i for i, p in enumerate(others) if p.get("type") == "server")
        project["participants"] = others[:server_idx + 1] + clients + others[server_idx + 1:]
    builders = project.get("builders") or []
    if not he:
        builders = [b for b in builders if not str(b.get("path", "")).startswith(HE_BUILDER_PREFIXES)]
    project["builders"] = builders
    check_builder_order(project)
    return project


def _org_for(site: str) -> str:
    org = re.sub(r"[^A-Za-z0-9_]", "_", site)
    return org if ORG_NAME.match(org) else "site_org"


def he_builder(project: dict) -> str | None:
    """The path of the project's HE builder, or None."""
    for b in project.get("builders") or []:
        if str(b.get("path", "")).startswith(HE_BUILDER_PREFIXES):
            return b["path"]
    return None


def check_builder_order(project: dict) -> None:
    """The HE builder must run before SignatureBuilder, else the contexts are not signed and a
    secure-mode participant refuses to load them."""
    paths = [str(b.get("path", "")) for b in project.get("builders") or []]
    he = [i for i, p in enumerate(paths) if p.startswith(HE_BUILDER_PREFIXES)]
    if he and SIGNATURE_BUILDER in paths and he[0] > paths.index(SIGNATURE_BUILDER):
        raise MonaiFLError(f"the HE builder {paths[he[0]]} must be listed before {SIGNATURE_BUILDER} "
                           "(the contexts would not be signed)")


def write_project(project: dict, path: str | os.PathLike, source: Path | None = None) -> Path:
    """Write a project dict as an NVFlare project file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Rendered by monai-fl provision from {source}.\n" if source else ""
    path.write_text(header + yaml.safe_dump(project, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# loopback


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback IP literal. No name is resolved (no DNS query leaves the host)."""
    host = str(host).strip().rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def free_loopback_ports(n: int = 2) -> list[int]:
    """``n`` distinct TCP ports that are free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def project_hosts(project: dict) -> list[str]:
    """Every host name a participant of ``project`` would connect to or bind."""
    hosts = []
    for p in project["participants"]:
        if p.get("type") == "server":
            hosts += [p["name"]] + ([p["default_host"]] if p.get("default_host") else []) + list(p.get("host_names") or [])
        ct = p.get("connect_to")
        if isinstance(ct, dict) and ct.get("host"):
            hosts.append(ct["host"])
        lh = p.get("listening_host")
        if isinstance(lh, str):
            hosts.append(lh)
        elif isinstance(lh, dict):
            hosts += [h for h in [lh.get("default_host")] + list(lh.get("host_names") or []) if h]
    return hosts


def check_loopback_project(project: dict) -> None:
    """Raise unless every host in the project is loopback (the PoC must never leave this machine)."""
    bad = sorted({h for h in project_hosts(project) if not is_loopback_host(h)})
    if bad:
        raise MonaiFLError(f"project '{project.get('name')}' uses non-loopback host(s) {', '.join(bad)}; "
                           "a PoC run must stay on localhost/127.0.0.1")


# ---------------------------------------------------------------------------------------------
# provisioned kits


@dataclass(frozen=True)
class Kits:
    """The startup kits of one provisioning run (``<workspace>/<project>/prod_NN``)."""

    project: str
    root: Path
    server: Path
    sites: dict[str, Path]
    admin: Path
    admin_name: str

    def all(self) -> list[Path]:
        return [self.server, *self.sites.values(), self.admin]


def provision(project_file: str | os.PathLike, workspace: str | os.PathLike) -> Kits:
    """Run ``nvflare provision -p project_file -w workspace`` (NVFlare's own command) and locate
    the kits it wrote.

    Raises:
        MonaiFLError: provisioning failed (its output is in the message).
    """
    project_file, workspace = Path(project_file).resolve(), Path(workspace).resolve()
    project = load_project(project_file)
    check_builder_order(project)
    workspace.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).with_name("nvflare")), "provision", "-p", str(project_file),
           "-w", str(workspace), "--force"]
    # cwd: NVFlare adds it to sys.path for custom builders; monai_fl's builder is installed anyway.
    proc = subprocess.run(cmd, cwd=workspace, capture_output=True, text=True, timeout=PROVISION_TIMEOUT_S,
                          stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip()
        raise MonaiFLError(f"nvflare provision failed (exit {proc.returncode}) for {project_file}:\n{out[-3000:]}")
    return find_kits(workspace, project)


def find_kits(workspace: str | os.PathLike, project: dict) -> Kits:
    """The newest ``prod_NN`` folder of ``project`` under ``workspace``."""
    base = Path(workspace) / project["name"]
    prods = sorted(base.glob("prod_*"), key=lambda p: int(p.name.split("_")[-1]) if p.name.split("_")[-1].isdigit() else -1)
    if not prods:
        raise MonaiFLError(f"no provisioned kits under {base}")
    root = prods[-1]
    server = _of_type(project, "server")[0]["name"]
    admins = _of_type(project, "admin")
    if not admins:
        raise MonaiFLError(f"project '{project['name']}' has no admin: nobody could submit a job")
    kits = Kits(project=project["name"], root=root, server=root / server,
                sites={p["name"]: root / p["name"] for p in _of_type(project, "client")},
                admin=root / admins[0]["name"], admin_name=admins[0]["name"])
    missing = [str(k) for k in kits.all() if not (k / "startup").is_dir()]
    if missing:
        raise MonaiFLError(f"provisioning did not write these kits: {', '.join(missing)}")
    return kits


def kit_endpoints(kits: Kits) -> list[tuple[Path, str, int]]:
    """(file, host, port) of every address a kit binds to or connects to."""
    found = []

    def split(target: str) -> tuple[str, int]:
        host, _, port = target.rpartition(":")
        return host, int(port)

    server_cfg = kits.server / "startup" / "fed_server.json"
    for s in json.loads(server_cfg.read_text())["servers"]:
        found.append((server_cfg, *split(s["service"]["target"])))
        found.append((server_cfg, s.get("admin_host") or s["admin_server"], int(s["admin_port"])))
    for kit in kits.sites.values():
        cfg = kit / "startup" / "fed_client.json"
        for s in json.loads(cfg.read_text())["servers"]:
            found.append((cfg, *split(s["service"]["target"])))
    admin_cfg = kits.admin / "startup" / "fed_admin.json"
    admin = json.loads(admin_cfg.read_text())["admin"]
    found.append((admin_cfg, admin["host"], int(admin["port"])))
    return found


def check_loopback_kits(kits: Kits) -> list[tuple[Path, str, int]]:
    """Raise unless every address in the kits is loopback; returns the endpoints checked."""
    endpoints = kit_endpoints(kits)
    bad = [f"{f}: {h}:{p}" for f, h, p in endpoints if not is_loopback_host(h)]
    if bad:
        raise MonaiFLError("non-loopback address in the startup kits: " + "; ".join(bad))
    return endpoints


# ---------------------------------------------------------------------------------------------
# a kit's local/ folder


def _walk_paths(node, found: set[str]) -> None:
    if isinstance(node, dict):
        for key in ("path", "class_path"):
            if isinstance(node.get(key), str) and "." in node[key] and "/" not in node[key]:
                found.add(node[key])
        for v in node.values():
            _walk_paths(v, found)
    elif isinstance(node, list):
        for v in node:
            _walk_paths(v, found)


def job_component_classes(job_dir: str | os.PathLike) -> dict[str, set[str]]:
    """The component classes an exported job builds: ``{"server": {...}, "client": {...}}``."""
    out: dict[str, set[str]] = {"server": set(), "client": set()}
    for cfg in Path(job_dir).glob("*/config/config_fed_*.json"):
        side = "server" if cfg.name == "config_fed_server.json" else "client"
        _walk_paths(json.loads(cfg.read_text()), out[side])
    return out


def job_classes_for_config(config: str | os.PathLike | None = None, he: bool = True) -> dict[str, set[str]]:
    """The component classes of the monai-fl job exported from an experiment config."""
    from monai_fl.config import ExperimentConfig
    from monai_fl.fl.job import export_job

    cfg = ExperimentConfig.load(config or DEFAULT_CONFIG)
    with tempfile.TemporaryDirectory(prefix="monai_fl_classes_") as tmp:
        return job_component_classes(export_job(cfg, Path(tmp), he=he))


def allow_classes(kit: str | os.PathLike, classes) -> Path:
    """Add ``classes`` to the kit's ``local/resources.json`` ``class_allow_list`` (created from
    ``resources.json.default`` on first use; entries already allowed are not repeated).

    NVFlare 2.9 checks every component of a job without custom code against this list; a job
    that ships code (BYOC, as the monai-fl job does) needs the submitter's ``byoc`` right instead.
    """
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    local = Path(kit) / "local"
    target = local / RESOURCES
    source = target if target.is_file() else local / RESOURCES_DEFAULT
    if not source.is_file():
        raise MonaiFLError(f"{local} holds neither {RESOURCES} nor {RESOURCES_DEFAULT}: is {kit} a startup kit?")
    resources = json.loads(source.read_text())
    allow = list(resources.get(CLASS_ALLOW_LIST, DEFAULT_CLASS_ALLOW_LIST))
    for c in sorted(classes):
        if "*" not in allow and not any(c == a or (a.endswith(".") and c.startswith(a)) for a in allow):
            allow.append(c)
    resources[CLASS_ALLOW_LIST] = allow
    target.write_text(json.dumps(resources, indent=2) + "\n")
    return target


def configure_server_kit(kit: str | os.PathLike, storage_dir: str | os.PathLike | None = None, classes=()) -> Path:
    """Finish the server kit's ``local/resources.json``: allow-list, and where jobs are stored.

    NVFlare's kit keeps the job store and the snapshots under ``/tmp/nvflare``: shared by every
    server on the machine and lost on reboot. ``storage_dir`` moves both there
    (``<storage_dir>/jobs-storage``, ``<storage_dir>/snapshot-storage``).

    Returns:
        The resources file.
    """
    target = allow_classes(kit, classes)
    if storage_dir is None:
        return target
    storage = Path(storage_dir).resolve()
    resources = json.loads(target.read_text())
    jobs, snapshots = storage / "jobs-storage", storage / "snapshot-storage"
    for comp in resources.get("components", []):
        if comp.get("id") == "job_manager":
            comp.setdefault("args", {})["uri_root"] = str(jobs)
    snap = resources.get("snapshot_persistor", {}).get("args", {}).get("storage", {}).get("args")
    if snap is not None:
        snap["root_dir"] = str(snapshots)
    for d in (jobs, snapshots):
        d.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(resources, indent=2) + "\n")
    return target


def configure_site_kit(kit: str | os.PathLike, data_root: str | os.PathLike | None, manifest: str | os.PathLike,
                       classes=(), check: bool = True) -> Path:
    """Write a site kit's ``local/monai_fl_site.json`` (data and manifest) and its allow-list.

    Args:
        kit: the site's startup kit (the folder holding ``startup/`` and ``local/``).
        data_root: folder with the site's data (None: the site uses ``$MONAI_FL_DATA``).
        manifest: the site manifest naming this site's shard.
        classes: component classes to add to ``local/resources.json``'s allow-list.
        check: refuse paths that do not exist (False writes them anyway: a test of the site's error).

    Returns:
        The site config file.
    """
    from monai_fl.fl.site_config import SITE_CONFIG_FILE, write_site_config

    kit = Path(kit)
    if not (kit / "startup").is_dir():
        raise MonaiFLError(f"{kit} is not a startup kit (no startup/ folder)")
    if check:
        if data_root is not None and not Path(data_root).is_dir():
            raise MonaiFLError(f"site data path {data_root} does not exist")
        if not Path(manifest).is_file():
            raise MonaiFLError(f"site manifest {manifest} does not exist")
    path = write_site_config(kit / "local" / SITE_CONFIG_FILE, data_root, manifest)
    allow_classes(kit, classes)
    return path


# ---------------------------------------------------------------------------------------------
# monai-fl provision


def provision_project(
    workspace: str | os.PathLike,
    template: str | os.PathLike = PROJECT_TEMPLATE,
    sites: list[str] | None = None,
    name: str | None = None,
    server_host: str | None = None,
    fed_learn_port: int | None = None,
    admin_port: int | None = None,
    he: bool = True,
) -> tuple[Kits, Path]:
    """Render the template, write it to ``<workspace>/project.yml`` and provision it.

    Returns:
        (the kits, the project file that was provisioned)
    """
    template = Path(template)
    project = render_project(load_project(template), sites=sites, name=name, server_host=server_host,
                             fed_learn_port=fed_learn_port, admin_port=admin_port, he=he)
    project_file = write_project(project, Path(workspace) / "project.yml", source=template)
    return provision(project_file, workspace), project_file


def cmd_provision(args: argparse.Namespace) -> int:
    if args.sites is not None and args.site_names:
        raise MonaiFLError("give --sites or --site-names, not both")
    sites = ([s.strip() for s in args.site_names.split(",") if s.strip()] if args.site_names
             else site_names(args.sites) if args.sites is not None else None)
    fed_port, admin_port = free_loopback_ports(2) if args.free_ports else (None, None)
    kits, project_file = provision_project(args.workspace, args.project, sites=sites, name=args.name,
                                           server_host=args.server_host, fed_learn_port=args.fed_port or fed_port,
                                           admin_port=args.admin_port or admin_port, he=not args.no_he)
    print(f"project file: {project_file}")
    print(f"startup kits: {kits.root}")
    width = max(len(n) for n in ("server", *kits.sites))
    for label, kit in (("server", kits.server), *kits.sites.items(), ("admin", kits.admin)):
        print(f"  {label:<{width}}  {kit}")
    from monai_fl.he.keys import KEY_ID_FILE, STARTUP_DIR, read_key_id

    key_id_file = kits.server / STARTUP_DIR / KEY_ID_FILE
    if key_id_file.is_file():
        print(f"HE key id: {read_key_id(key_id_file)} (in every kit's {STARTUP_DIR}/{KEY_ID_FILE})")
    classes = job_classes_for_config(args.config, he=not args.no_he)
    print(f"server resources: {configure_server_kit(kits.server, args.server_storage, classes['server'])}")
    if args.manifest:
        for k in kits.sites.values():
            print(f"site config: {configure_site_kit(k, args.data_root, args.manifest, classes['client'])}")
    else:
        print("next: every site writes <kit>/local/monai_fl_site.json with "
              "{\"data_root\": ..., \"manifest\": ...} (see docs/it_staff.md)")
    return 0


def add_provision_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register ``monai-fl provision`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "provision", help="write NVFlare startup kits (server, sites, admin) with HE keys",
        description="Render workspace/project.yml with the chosen sites and ports, run `nvflare provision` on it "
                    "and list the startup kits. The server kit gets the parameters-only HE context, every site kit the "
                    "secret one. Re-running it into the same workspace generates new HE keys but keeps the root CA "
                    "and certificates; a new workspace gets a new root CA too (see docs/it_staff.md).")
    p.add_argument("-w", "--workspace", type=Path, default=Path("runs") / "provision",
                   help="provisioning workspace (default runs/provision); kits land in <w>/<project>/prod_NN")
    p.add_argument("-p", "--project", type=Path, default=PROJECT_TEMPLATE, help="project template (default workspace/project.yml)")
    p.add_argument("--name", help="project name (default: the template's)")
    p.add_argument("--sites", type=int, help="number of sites, named site-1 … site-N")
    p.add_argument("--site-names", help="comma-separated site names (instead of --sites)")
    p.add_argument("--server-host", help="server name = host that sites and admins connect to (default: the template's)")
    p.add_argument("--fed-port", type=int, help="server FL port")
    p.add_argument("--admin-port", type=int, help="server admin port")
    p.add_argument("--free-ports", action="store_true", help="pick two free loopback ports for the server")
    p.add_argument("--no-he", action="store_true", help="leave out the HE builder (plaintext jobs only)")
    p.add_argument("--server-storage", type=Path,
                   help="folder for the server's job store and snapshots (NVFlare's default: /tmp/nvflare)")
    g = p.add_argument_group("trial on one machine: configure every site kit")
    g.add_argument("--manifest", type=Path, help="site manifest: write it into every site kit's local/monai_fl_site.json")
    g.add_argument("--data-root", type=Path, help="data folder for every site kit (with --manifest)")
    p.add_argument("--config", type=Path, help="experiment config whose job's classes go in the kits' allow-lists "
                                                "(default configs/pneumoniamnist_he.yaml)")
    p.set_defaults(func=cmd_provision)
    return p
