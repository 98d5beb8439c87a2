"""BFV cipher backend for the codec: Microsoft SEAL through TenSEAL's ``tenseal.sealapi`` bindings.

Why SEAL directly rather than ``ts.bfv_vector``: SEAL's symmetric encryption can serialize a fresh
ciphertext as ``c0`` plus the PRNG seed of ``c1`` (the seeded form), which halves what a site
uploads (measured 47.9 kB instead of 90.7 kB per ciphertext); TenSEAL's vector API always writes
both polynomials. The bindings save and load only through file paths, so :class:`ByteBridge`
gives them an anonymous in-memory file (``memfd``), falling back to a private temp file.

The bindings hold the GIL while SEAL encrypts, so threads gain little (0.7-1.4x with 2 threads,
measured in ``benchmarks/he_overhead.py``); :class:`SecretCipher` uses a pool of spawned worker
processes instead (1.7x with 2 workers on 2 cores for DenseNet121; for models of a few
ciphertexts the round trip to the workers costs more than it saves).
"""

from __future__ import annotations

import collections
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from typing import Self

import numpy as np
import tenseal.sealapi as seal

from monai_fl.he.codec import CodecParams
from monai_fl.he.errors import HECodecError, HEContributionError, HEKeyError

# SEAL's serialization header starts with this little-endian magic (SEALHeader::magic 0xA15E).
SEAL_MAGIC = b"\x5e\xa1"
BLOCKS_PER_TASK = 8  # blocks per worker round trip: amortises IPC without hurting streaming


class ByteBridge:
    """Moves SEAL objects to and from ``bytes`` through an in-memory file; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._tmp = None
        try:
            self._fd = os.memfd_create("monai_fl_he", os.MFD_CLOEXEC)
            self.path = f"/proc/self/fd/{self._fd}"
        except (AttributeError, OSError):  # not Linux: a private temp file instead
            self._fd = None
            self._tmp = tempfile.TemporaryDirectory(prefix="monai_fl_he_")
            self.path = os.path.join(self._tmp.name, "object.bin")

    def dump(self, obj) -> bytes:
        """``obj.save(path)`` and return the bytes written."""
        with self._lock:
            obj.save(self.path)
            if self._fd is not None:
                return os.pread(self._fd, os.fstat(self._fd).st_size, 0)
            with open(self.path, "rb") as f:
                return f.read()

    def load(self, obj, context, data: bytes):
        """``obj.load(context, path)`` from ``data``; returns ``obj``."""
        with self._lock:
            if self._fd is not None:
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, data, 0)
            else:
                with open(self.path, "wb") as f:
                    f.write(data)
            obj.load(context, self.path)
        return obj

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def seal_context(params: CodecParams) -> seal.SEALContext:
    """The SEAL context of the codec parameters, refusing anything below 128-bit security."""
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.BFV)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    parms.set_coeff_modulus(seal.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bit_sizes)))
    parms.set_plain_modulus(params.plain_modulus)
    context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        raise HECodecError(f"BFV parameters rejected by SEAL: {context.parameters_error_message()}")
    return context


class CiphertextAdder:
    """Server side: validates serialized ciphertexts and adds them. Holds no key of any kind."""

    def __init__(self, params: CodecParams):
        self.params = params
        self.context = seal_context(params)
        self.evaluator = seal.Evaluator(self.context)
        self.bridge = ByteBridge()
        self._parms_id = self.context.first_parms_id()

    def load(self, data) -> seal.Ciphertext:
        """Parse one ciphertext of this parameter set.

        Raises:
            HEContributionError: not bytes, not a SEAL ciphertext, other parameters, or not a
                fresh/summed two-polynomial BFV ciphertext at the data level.
        """
        if not isinstance(data, (bytes, bytearray)):
            raise HEContributionError(f"expected ciphertext bytes, got {type(data).__name__}")
        if bytes(data[:2]) != SEAL_MAGIC:
            raise HEContributionError("payload is not a SEAL ciphertext (bad magic)")
        ct = seal.Ciphertext()
        try:
            self.bridge.load(ct, self.context, bytes(data))
        except Exception as e:  # SEAL raises ValueError/RuntimeError/logic_error variants
            raise HEContributionError(f"invalid ciphertext for these parameters: {e}") from e
        if ct.size() != 2 or ct.parms_id() != self._parms_id or ct.is_ntt_form():
            raise HEContributionError("ciphertext is not a 2-polynomial BFV ciphertext at the data level")
        return ct

    def add_inplace(self, accumulator: seal.Ciphertext, ct: seal.Ciphertext) -> None:
        self.evaluator.add_inplace(accumulator, ct)

    def dump(self, ct: seal.Ciphertext) -> bytes:
        return self.bridge.dump(ct)

    def sum(self, contributions: Sequence[Sequence[bytes]]) -> list[bytes]:
        """Element-wise sum of equally long lists of ciphertexts (one list per site)."""
        if not contributions:
            return []
        acc = [self.load(c) for c in contributions[0]]
        for other in contributions[1:]:
            if len(other) != len(acc):
                raise HEContributionError(f"contribution has {len(other)} ciphertexts, expected {len(acc)}")
            for a, c in zip(acc, other):
                self.add_inplace(a, self.load(c))
        return [self.dump(a) for a in acc]


class _SealSecret:
    """Encrypt/decrypt with a secret key inside one process (parent or pool worker)."""

    def __init__(self, params: CodecParams, secret_key: bytes):
        self.params = params
        self.context = seal_context(params)
        self.bridge = ByteBridge()
        sk = seal.SecretKey()
        try:
            self.bridge.load(sk, self.context, secret_key)
        except Exception as e:
            raise HEKeyError(f"secret key does not match the codec parameters: {e}") from e
        self.encryptor = seal.Encryptor(self.context, sk)
        self.decryptor = seal.Decryptor(self.context, sk)
        self.encoder = seal.BatchEncoder(self.context)

    def encrypt(self, slots: np.ndarray) -> bytes:
        pt = seal.Plaintext()
        self.encoder.encode(slots.tolist(), pt)
        # The Serializable from encrypt_symmetric saves c1 as a seed: half the bytes.
        return self.bridge.dump(self.encryptor.encrypt_symmetric(pt))

    def load(self, data: bytes) -> seal.Ciphertext:
        if not isinstance(data, (bytes, bytearray)) or bytes(data[:2]) != SEAL_MAGIC:
            raise HEContributionError("payload is not a SEAL ciphertext")
        ct = seal.Ciphertext()
        try:
            return self.bridge.load(ct, self.context, bytes(data))
        except Exception as e:
            raise HEContributionError(f"invalid ciphertext for these parameters: {e}") from e

    def decrypt(self, data: bytes) -> np.ndarray:
        ct = self.load(data)
        if self.decryptor.invariant_noise_budget(ct) <= 0:
            raise HEContributionError(
                "ciphertext noise budget exhausted: too many contributions were added, or they were encrypted under "
                "keys from different provisioning runs")
        pt = seal.Plaintext()
        self.decryptor.decrypt(ct, pt)
        return np.asarray(self.encoder.decode_uint64(pt), dtype=np.uint64)

    def noise_budget(self, data: bytes) -> int:
        return self.decryptor.invariant_noise_budget(self.load(data))

    def close(self) -> None:
        self.bridge.close()


# Per-process state of pool workers only, set once by the pool initializer: a worker serves one
# cipher for its whole life, and pickling the key with every task would cost more than the task.
_WORKER_STATE: dict = {}


def _worker_init(params: dict, secret_key: bytes) -> None:
    _WORKER_STATE["cipher"] = _SealSecret(CodecParams.from_dict(params), secret_key)


def _worker_encrypt(blocks: np.ndarray) -> list[bytes]:
    cipher = _WORKER_STATE["cipher"]
    return [cipher.encrypt(b) for b in blocks]


def _worker_decrypt(ciphertexts: list[bytes]) -> np.ndarray:
    cipher = _WORKER_STATE["cipher"]
    return np.stack([cipher.decrypt(c) for c in ciphertexts])


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class SecretCipher:
    """Client side: encrypts packed blocks and decrypts aggregates (implements the codec protocols).

    Args:
        params: codec parameters.
        secret_key: SEAL-serialized secret key (see :func:`monai_fl.he.keys.secret_cipher`).
        workers: processes for encryption/decryption; 1 works in the calling process. Workers are
            spawned on first use and live until :meth:`close`.
    """

    def __init__(self, params: CodecParams, secret_key: bytes, workers: int = 1):
        self.params = params
        self.workers = max(1, int(workers))
        self._secret_key = secret_key
        self._local = _SealSecret(params, secret_key)  # also validates the key now
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: NVFlare clients run threads, and forking a threaded process can deadlock.
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=get_context("spawn"),
                initializer=_worker_init, initargs=(self.params.to_dict(), self._secret_key))
        return self._pool

    def _ordered(self, tasks: Iterable[tuple], fn) -> Iterator:
        """Run ``fn(*task)`` on the pool keeping order and at most 2 tasks per worker in flight."""
        pool = self._executor()
        pending: collections.deque[Future] = collections.deque()
        for task in tasks:
            pending.append(pool.submit(fn, task))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def encrypt_blocks(self, blocks: Iterable[np.ndarray]) -> list[bytes]:
        if self.workers == 1:
            return [self._local.encrypt(b) for b in blocks]
        out: list[bytes] = []
        for res in self._ordered((np.stack(b) for b in _batched(blocks, BLOCKS_PER_TASK)), _worker_encrypt):
            out.extend(res)
        return out

    def decrypt_blocks(self, ciphertexts: Sequence[bytes]) -> Iterator[np.ndarray]:
        if self.workers == 1:
            for c in ciphertexts:
                yield self._local.decrypt(c)
            return
        for res in self._ordered(_batched(ciphertexts, BLOCKS_PER_TASK), _worker_decrypt):
            yield from res

    def encrypt_slots(self, slots: np.ndarray) -> bytes:
        """Encrypt one block of N slot values in this process."""
        return self._local.encrypt(slots)

    def decrypt_slots(self, data: bytes) -> np.ndarray:
        """Decrypt one ciphertext in this process."""
        return self._local.decrypt(data)

    def noise_budget(self, data: bytes) -> int:
        """Remaining invariant noise budget (bits) of a ciphertext."""
        return self._local.noise_budget(data)

    def close(self) -> None:
        """Stop worker processes and release the in-memory file."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._local.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
