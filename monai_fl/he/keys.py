"""Key material for the codec: TenSEAL contexts for sites (secret key) and the server (none).

The files keep NVFlare's names and format (``client_context.tenseal``, ``server_context.tenseal``,
serialized TenSEAL contexts), so provisioning, signing and ``SecurityContentService`` treat them
like the stock HE files. Encryption is SYMMETRIC, as with NVFlare's ``HEBuilder``: every site holds
the same secret key; the server's context holds the BFV parameters only (no secret, public,
relinearisation or Galois key), which is all that adding ciphertexts needs.

The server's context is therefore the same bytes in every provisioning run (it depends on the BFV
parameters only). What tells key generations apart is the **key id** (:func:`key_id`): a short hash
of the secret key. A site derives it from its own context; the server, which holds no key, reads it
from ``he_key_id.txt`` that provisioning writes beside ``server_context.tenseal`` (every kit gets
the file, so IT staff can compare kits). Sites stamp it on every contribution and the server
refuses one whose key id differs from its own (a site holding keys from another provisioning run).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tenseal as ts

from monai_fl.he.backend import ByteBridge, SecretCipher, seal_context
from monai_fl.he.codec import CodecParams
from monai_fl.he.errors import HECodecError, HEKeyError

CLIENT_CONTEXT_FILE = "client_context.tenseal"  # NVFlare's ProvFileName.CLIENT_CONTEXT_TENSEAL
SERVER_CONTEXT_FILE = "server_context.tenseal"  # NVFlare's ProvFileName.SERVER_CONTEXT_TENSEAL
KEY_ID_FILE = "he_key_id.txt"  # beside the context in every kit: which key generation it is from
STARTUP_DIR = "startup"
KEY_ID_LENGTH = 16  # hex digits (64 bits): two provisioning runs never collide in practice
_KEY_ID = re.compile(rf"^[0-9a-f]{{{KEY_ID_LENGTH}}}$")
_KEY_ID_DOMAIN = b"monai-fl/he-key-id/v1\0"


@dataclass(frozen=True)
class ContextBytes:
    """Serialized contexts of one key generation."""

    client: bytes  # parameters + secret key: sites only
    server: bytes  # parameters only (the same bytes in every key generation of one parameter set)
    key_id: str  # identity of this key generation (:func:`key_id` of ``client``)


def generate_contexts(params: CodecParams | None = None) -> ContextBytes:
    """Generate a fresh secret key and serialize the site and server contexts.

    Args:
        params: codec parameters (defaults if None).

    Returns:
        The two serialized contexts (only ``client`` can decrypt) and the generation's key id.
    """
    params = params or CodecParams()
    ctx = ts.context(
        ts.SCHEME_TYPE.BFV,
        poly_modulus_degree=params.poly_modulus_degree,
        plain_modulus=params.plain_modulus,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
        n_threads=1,
    )
    check_matches(ctx, params)
    # Relinearisation/Galois keys are never needed (the server only adds), so none is written.
    client = ctx.serialize(save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    server = ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    # From the bytes the sites will load, so the id the kits carry is the one the sites derive.
    return ContextBytes(client=client, server=server, key_id=key_id(load_context(client)))


def key_id(ctx: ts.Context) -> str:
    """The id of the key generation a site context belongs to: a short hash of its secret key.

    Derived, not stored, so a site's id always matches the key it encrypts with. The hash is of
    the key's raw coefficients (not of its compressed serialization, which could differ between
    library versions). Sixty-four bits of a hash of a secret with thousands of bits of entropy
    reveal nothing usable about it; the id is not secret.

    Raises:
        HEKeyError: the context holds no secret key (the server reads its id with :func:`read_key_id`).
    """
    if not is_private(ctx):
        raise HEKeyError(f"this TenSEAL context holds no secret key: its key id is in {KEY_ID_FILE}")
    poly = ctx.secret_key().data.data()
    n = poly.coeff_count()
    coeffs = np.fromiter((poly.data(i) for i in range(n)), dtype="<u8", count=n)
    return hashlib.sha256(_KEY_ID_DOMAIN + coeffs.tobytes()).hexdigest()[:KEY_ID_LENGTH]


def parse_key_id(text: str | bytes, where: str) -> str:
    """A key id from the content of a ``he_key_id.txt`` file.

    Raises:
        HEKeyError: not a key id.
    """
    value = (text.decode("ascii", errors="replace") if isinstance(text, (bytes, bytearray)) else text).strip()
    if not _KEY_ID.match(value):
        raise HEKeyError(f"{where} does not hold an HE key id ({KEY_ID_LENGTH} hex digits): {value[:40]!r}")
    return value


def read_key_id(path: str | os.PathLike) -> str:
    """The key id in a ``he_key_id.txt`` file.

    Raises:
        HEKeyError: missing or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise HEKeyError(f"HE key id file {path} not found: provision the kits again with this monai-fl version")
    return parse_key_id(path.read_bytes(), str(path))


def key_id_file_for(context_file: str | os.PathLike) -> str:
    """Where the key id of a context file lives: ``he_key_id.txt`` in the same folder."""
    return os.path.join(os.path.dirname(os.fspath(context_file)), KEY_ID_FILE)


def load_context(source: str | os.PathLike | bytes) -> ts.Context:
    """Load a serialized TenSEAL context from a file or from bytes.

    Raises:
        HEKeyError: missing or unreadable.
    """
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        where = "<bytes>"
    else:
        where = str(source)
        if not Path(source).is_file():
            raise HEKeyError(f"TenSEAL context not found: {where}")
        data = Path(source).read_bytes()
    try:
        return ts.context_from(data)
    except Exception as e:
        raise HEKeyError(f"cannot read TenSEAL context {where}: {e}") from e


def is_private(ctx: ts.Context) -> bool:
    """True if the context holds a secret key (can decrypt)."""
    return bool(ctx.is_private())


def check_matches(ctx: ts.Context, params: CodecParams) -> None:
    """Raise unless the context's BFV parameters are exactly the codec's.

    SEAL's parms_id hashes scheme, degree, every modulus prime and the plain modulus, so equal ids
    mean equal parameters.

    Raises:
        HECodecError: the key file belongs to another parameter set (or another scheme).
    """
    theirs = list(ctx.data.seal_context().first_parms_id())
    ours = list(seal_context(params).first_parms_id())
    if theirs != ours:
        raise HECodecError(
            "TenSEAL context does not match the codec parameters (another scheme, degree, moduli or "
            "plain modulus): regenerate the contexts with these parameters")


def require_server_context(ctx: ts.Context, params: CodecParams) -> None:
    """The server's check at start-up: parameters match and no secret key is present.

    Raises:
        HEKeyError: the context can decrypt; the server must never hold such a key.
    """
    check_matches(ctx, params)
    if is_private(ctx):
        raise HEKeyError("the server context holds a secret key; refusing to run (the server must not be able to decrypt)")


def secret_cipher(ctx: ts.Context, params: CodecParams, workers: int = 1) -> SecretCipher:
    """A site's encrypt/decrypt backend from its context.

    Raises:
        HEKeyError: the context holds no secret key (e.g. the server's).
    """
    check_matches(ctx, params)
    if not is_private(ctx):
        raise HEKeyError("this TenSEAL context holds no secret key: it cannot encrypt or decrypt for a site")
    bridge = ByteBridge()
    try:
        secret = bridge.dump(ctx.secret_key().data)
    finally:
        bridge.close()
    return SecretCipher(params, secret, workers=workers)


def save_contexts(
    client_dir: str | os.PathLike, server_dir: str | os.PathLike, params: CodecParams | None = None
) -> tuple[Path, Path]:
    """Generate keys and write ``client_context.tenseal`` and ``server_context.tenseal``, each with
    ``he_key_id.txt`` beside it.

    Returns:
        (client file, server file)
    """
    ctxs = generate_contexts(params)
    client_path = Path(client_dir) / CLIENT_CONTEXT_FILE
    server_path = Path(server_dir) / SERVER_CONTEXT_FILE
    for path, data in ((client_path, ctxs.client), (server_path, ctxs.server)):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_key_material(path, data)
        write_key_id(path.parent, ctxs.key_id)
    return client_path, server_path


def write_key_id(folder: str | os.PathLike, value: str) -> Path:
    """Write ``<folder>/he_key_id.txt`` with mode 0644 (not secret: readable by all)."""
    path = Path(folder) / KEY_ID_FILE
    write_key_material(path, (parse_key_id(value, "key id") + "\n").encode(), mode=0o644)
    return path


def write_key_material(path: str | os.PathLike, data: bytes, mode: int = 0o600) -> None:
    """Write a kit file with an explicit mode (0600 by default: a context file is key material)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@dataclass(frozen=True)
class SimulatorContexts:
    """Where :func:`write_simulator_contexts` put the two files."""

    client_context: Path
    server_context: Path

    @property
    def client_context_arg(self) -> str:
        """Value for ``attach_he(client_context_file=...)``: the NVFlare default name when the file
        is in the simulator's startup folder, else its absolute path."""
        if self.client_context.parent == self.server_context.parent:
            return CLIENT_CONTEXT_FILE
        return str(self.client_context)


def write_simulator_contexts(
    sim_workspace_dir: str | os.PathLike,
    params: CodecParams | None = None,
    client_key_dir: str | os.PathLike | None = None,
) -> SimulatorContexts:
    """Provision HE contexts for the NVFlare simulator before running a job in it.

    The simulator keeps ``<ws>/startup`` across its workspace clean-up, serves it to the server and
    copies it into every site's folder. By default both files go there, with ``he_key_id.txt`` (the
    simulator is no security boundary). With ``client_key_dir`` the secret context is written there
    instead, so the server's workspace never holds it; pass ``result.client_context_arg`` to
    ``attach_he(client_context_file=...)`` so sites load it from that absolute path.

    Args:
        sim_workspace_dir: the simulator workspace (``job.simulator_run(workspace=...)``).
        params: codec parameters (defaults if None).
        client_key_dir: optional directory outside the workspace for the secret context.

    Returns:
        The two file paths.
    """
    startup = Path(sim_workspace_dir) / STARTUP_DIR
    startup.mkdir(parents=True, exist_ok=True)
    client_dir = Path(client_key_dir) if client_key_dir is not None else startup
    stale = startup / CLIENT_CONTEXT_FILE
    if client_key_dir is not None and stale.exists():
        stale.unlink()  # a secret left by an earlier run must not stay where the server reads
    client_path, server_path = save_contexts(client_dir, startup, params)
    return SimulatorContexts(client_context=client_path.resolve(), server_context=server_path.resolve())
