"""Provisioning: HE contexts in the startup kits, and the site allow-list for the HE components.

``HECodecBuilder`` replaces NVFlare's ``HEBuilder`` for this codec. In ``project.yml`` list it after
``StaticFileBuilder`` (it extends the ``local/resources.json.default`` that builder writes) and
before ``SignatureBuilder`` (so the context files and resources are signed; unsigned context files
are refused in secure mode)::

    builders:
      - path: nvflare.lighter.impl.workspace.WorkspaceBuilder
      - path: nvflare.lighter.impl.static_file.StaticFileBuilder
        args: {config_folder: config}
      - path: monai_fl.he.provision.HECodecBuilder
        args: {params: {}}          # CodecParams fields; {} = defaults (see below)
      - path: nvflare.lighter.impl.cert.CertBuilder
      - path: nvflare.lighter.impl.signature.SignatureBuilder

NVFlare 2.9 builds a job component only if its class path matches the site's
``class_allow_list`` (``local/resources.json``, falling back to ``resources.json.default``), unless
the job ships custom code (BYOC) and the submitter may use it. Jobs that run the installed
``monai_fl`` package (``job.set_app_packages(["monai_fl"])``) need the prefix ``monai_fl.he.`` on
that list at every participant: the builder adds it to every kit, :func:`write_site_resources`
adds it to an existing site or a simulator workspace.

Of the ``params``, only the BFV parameters shape the keys: ``poly_modulus_degree``,
``coeff_mod_bit_sizes`` and ``plain_modulus`` must equal the job's (both sides check the context
against them); the job's other codec fields (``quant_bits``, ``field_bits``, ...) may differ.

Every kit also gets ``he_key_id.txt``: the id of this run's key generation
(:func:`monai_fl.he.keys.key_id`). The server reads its own to refuse contributions encrypted
under keys from another provisioning run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
from nvflare.lighter.constants import ProvFileName
from nvflare.lighter.spec import Builder, Project, ProvisionContext

from monai_fl.he.codec import CodecParams
from monai_fl.he.errors import HEError
from monai_fl.he.keys import CLIENT_CONTEXT_FILE, SERVER_CONTEXT_FILE, generate_contexts, write_key_id, write_key_material

ALLOW_LIST_PREFIX = "monai_fl.he."  # package prefix: every class in monai_fl.he
CLASS_ALLOW_LIST = "class_allow_list"
RESOURCES_JSON = "resources.json"


def extend_class_allow_list(resources: dict, prefixes: Iterable[str] = (ALLOW_LIST_PREFIX,)) -> dict:
    """Add class-path prefixes to a resources dict, starting from NVFlare's default list.

    A site's own ``class_allow_list`` *replaces* the built-in default, so a missing list is first
    filled with the default before the prefixes are appended (otherwise every stock component
    would be refused).
    """
    allow = list(resources.get(CLASS_ALLOW_LIST, DEFAULT_CLASS_ALLOW_LIST))
    for p in prefixes:
        if p not in allow:
            allow.append(p)
    resources[CLASS_ALLOW_LIST] = allow
    return resources


def write_site_resources(local_dir: str | os.PathLike, prefixes: Iterable[str] = (ALLOW_LIST_PREFIX,)) -> Path:
    """Allow the HE component classes at one participant (or in a simulator workspace).

    Updates ``<local_dir>/resources.json`` if present, else ``resources.json.default`` if present,
    else creates ``resources.json``. For the simulator pass ``<workspace>/local``: the simulator
    copies it into every participant's ``local`` folder.

    Returns:
        The file written.
    """
    local = Path(local_dir)
    local.mkdir(parents=True, exist_ok=True)
    target = local / RESOURCES_JSON
    if not target.exists() and (local / ProvFileName.RESOURCES_JSON_DEFAULT).exists():
        target = local / ProvFileName.RESOURCES_JSON_DEFAULT
    resources = json.loads(target.read_text()) if target.exists() else {"format_version": 2}
    if not isinstance(resources, dict):
        raise HEError(f"{target} must hold a JSON object")
    target.write_text(json.dumps(extend_class_allow_list(resources, prefixes), indent=2) + "\n")
    return target


class HECodecBuilder(Builder):
    def __init__(self, params: dict | None = None, allow_list_prefixes: list[str] | None = None):
        """Write the codec's contexts into the kits and allow its component classes.

        One secret key is generated per provisioning run and shared by all sites (symmetric
        encryption, like NVFlare's ``HEBuilder``). The server kit gets a parameters-only context.
        Every kit gets ``he_key_id.txt`` naming the key generation.

        Args:
            params: ``CodecParams`` fields (defaults if None); the job's ``poly_modulus_degree``,
                ``coeff_mod_bit_sizes`` and ``plain_modulus`` must be the same (the other fields
                do not enter the keys).
            allow_list_prefixes: class-path prefixes added to every participant's
                ``local/resources.json.default`` (default ``["monai_fl.he."]``; ``[]`` to skip).
        """
        self.params = params
        self.allow_list_prefixes = allow_list_prefixes
        self._codec = CodecParams.from_dict(params)
        self._contexts = None

    def initialize(self, project: Project, ctx: ProvisionContext):
        self._contexts = generate_contexts(self._codec)

    def build(self, project: Project, ctx: ProvisionContext):
        server = project.get_server()
        kits = [(server, SERVER_CONTEXT_FILE, self._contexts.server)] if server else []
        kits += [(client, CLIENT_CONTEXT_FILE, self._contexts.client) for client in project.get_clients()]
        for participant, name, data in kits:
            kit = Path(ctx.get_kit_dir(participant))
            write_key_material(kit / name, data)
            write_key_id(kit, self._contexts.key_id)
        prefixes = [ALLOW_LIST_PREFIX] if self.allow_list_prefixes is None else list(self.allow_list_prefixes)
        if not prefixes:
            return
        for participant in ([server] if server else []) + list(project.get_clients()):
            resources_file = Path(ctx.get_local_dir(participant)) / ProvFileName.RESOURCES_JSON_DEFAULT
            if not resources_file.exists():
                raise HEError(f"{resources_file} is missing: list HECodecBuilder after StaticFileBuilder in project.yml")
            resources = json.loads(resources_file.read_text())
            resources_file.write_text(json.dumps(extend_class_allow_list(resources, prefixes), indent=2) + "\n")

    def finalize(self, project: Project, ctx: ProvisionContext):
        self._contexts = None  # do not keep the secret key in memory longer than needed
