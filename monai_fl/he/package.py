"""File format of an encrypted global model as the server persists it (no pickle, no decryption).

Layout: ``MAGIC`` | 8-byte little-endian header length | UTF-8 JSON header (the model's HE meta) |
per ciphertext: 8-byte little-endian length | SEAL-serialized ciphertext.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from monai_fl.he.errors import HEContributionError

MAGIC = b"MONAI-FL-HE-1\n"
_LEN = struct.Struct("<Q")


def write_package(path: str | os.PathLike, meta: dict, ciphertexts: list[bytes]) -> Path:
    """Atomically write an encrypted model (temp file in the same folder, then rename)."""
    path = Path(path)
    header = json.dumps({"meta": meta, "num_ciphertexts": len(ciphertexts)}, sort_keys=True).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(_LEN.pack(len(header)))
        f.write(header)
        for ct in ciphertexts:
            f.write(_LEN.pack(len(ct)))
            f.write(ct)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_package(path: str | os.PathLike) -> tuple[dict, list[bytes]]:
    """Inverse of :func:`write_package`.

    Raises:
        HEContributionError: not a package or truncated.
    """
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        raise HEContributionError(f"{path} is not an encrypted monai-fl model")
    pos = len(MAGIC)

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise HEContributionError(f"{path} is truncated")
        chunk = data[pos: pos + n]
        pos += n
        return chunk

    header = json.loads(take(_LEN.unpack(take(_LEN.size))[0]))
    cts = [take(_LEN.unpack(take(_LEN.size))[0]) for _ in range(header["num_ciphertexts"])]
    return header["meta"], cts
