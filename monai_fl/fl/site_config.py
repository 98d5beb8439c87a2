"""Where a site's data and manifest live: site-local config or environment, never the job.

Resolution order for a site:
1. ``$MONAI_FL_SITE_CONFIG`` (a JSON file),
2. ``<site workspace>/local/monai_fl_site.json`` (in a startup kit, the folder IT staff edit),
3. ``$MONAI_FL_DATA`` and ``$MONAI_FL_MANIFEST``.
The JSON holds ``{"data_root": "...", "manifest": "..."}``; relative paths are relative to the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from monai_fl.errors import MonaiFLError
from monai_fl.keys import DATA_ENV

SITE_CONFIG_ENV = "MONAI_FL_SITE_CONFIG"
MANIFEST_ENV = "MONAI_FL_MANIFEST"
SITE_CONFIG_FILE = "monai_fl_site.json"


@dataclass(frozen=True)
class SitePaths:
    data_root: Path | None
    manifest: Path
    source: str


def resolve_site_paths(workspace_root: str | os.PathLike | None = None) -> SitePaths:
    """Find this site's data root and site manifest.

    Args:
        workspace_root: the site's NVFlare workspace (its ``local/`` folder is searched).

    Raises:
        MonaiFLError: nothing configured, or a configured path does not exist (named in the message).
    """
    candidates = []
    if os.environ.get(SITE_CONFIG_ENV):
        candidates.append(Path(os.environ[SITE_CONFIG_ENV]))
    if workspace_root is not None:
        candidates.append(Path(workspace_root) / "local" / SITE_CONFIG_FILE)
    for path in candidates:
        if path.is_file():
            return _from_file(path)
        if path == Path(os.environ.get(SITE_CONFIG_ENV, "\0")):
            raise MonaiFLError(f"{SITE_CONFIG_ENV}={path}: file does not exist")
    manifest = os.environ.get(MANIFEST_ENV)
    if not manifest:
        where = " or ".join(str(c) for c in candidates) or f"${SITE_CONFIG_ENV}"
        raise MonaiFLError(f"no site configuration: write {where} with {{\"data_root\": ..., \"manifest\": ...}} "
                           f"or set {MANIFEST_ENV} (and {DATA_ENV})")
    data = os.environ.get(DATA_ENV)
    return _checked(Path(data) if data else None, Path(manifest), f"environment ({MANIFEST_ENV})")


def _from_file(path: Path) -> SitePaths:
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MonaiFLError(f"site config {path} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict) or "manifest" not in cfg:
        raise MonaiFLError(f"site config {path} must be a JSON object with \"manifest\" (and \"data_root\")")
    base = path.parent
    data_root = (base / cfg["data_root"]).resolve() if cfg.get("data_root") else None
    return _checked(data_root, (base / cfg["manifest"]).resolve(), str(path))


def _checked(data_root: Path | None, manifest: Path, source: str) -> SitePaths:
    if data_root is not None and not data_root.is_dir():
        raise MonaiFLError(f"site data path {data_root} (from {source}) does not exist")
    if not manifest.is_file():
        raise MonaiFLError(f"site manifest {manifest} (from {source}) does not exist")
    return SitePaths(data_root, manifest, source)


def write_site_config(path: str | os.PathLike, data_root: str | os.PathLike | None, manifest: str | os.PathLike) -> Path:
    """Write a site-local config file (used by the simulator runner and by IT staff's kits)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"manifest": str(Path(manifest).resolve())}
    if data_root is not None:
        body["data_root"] = str(Path(data_root).resolve())
    path.write_text(json.dumps(body, indent=1))
    return path
