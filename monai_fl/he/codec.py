"""Packed fixed-point BFV codec for FedAvg under homomorphic encryption.

The codec turns a site's model update into a few BFV ciphertexts that a server can only *add*, and
turns the sum back into the next global model at the sites. It is pure: numpy plus a cipher
backend passed in (:mod:`monai_fl.he.backend`); nothing here knows about NVFlare.

Design (details, bit budget and measured figures in ``docs/he.md``):

* **Deltas, not weights.** Every site holds the same reference model ``G_v`` (version ``v``: the
  initial model, then each decoded aggregate applied in turn). A site encodes
  ``delta = local - G_v``; deltas span a far smaller range than weights, so few bits suffice.
* **Fixed point with a shared per-tensor range.** Tensor ``t`` is quantised on the grid
  ``s_t = 2**(e_t - (b - 1))`` over ``[-(2**e_t - s_t), 2**e_t - s_t]`` (``b = quant_bits``), i.e. to
  an integer level ``q`` in ``[0, 2**b - 2]`` with zero exactly representable. The exponent ``e_t``
  is a deterministic function of state every site shares (the initial model, then statistics
  carried *inside* the encrypted aggregate), so all sites use the same grid without talking to
  each other and the server learns nothing about the ranges.
* **Exact integer FedAvg.** A site multiplies its levels by its integer weight ``w`` before
  encryption; the server adds ciphertexts; sites decrypt ``S = sum_k w_k q_k`` and ``W = sum_k w_k``
  (carried encrypted too) and recover the weighted mean ``S / W`` exactly.
* **Several values per slot.** A BFV slot holds an integer modulo the plain modulus ``t`` (about
  60 bits); ``F = fields_per_slot`` values of ``field_bits`` bits each are packed side by side. The
  field width leaves headroom so the sum over all sites can never carry into the next field:
  ``W * (2**b - 2) <= field_capacity``. The codec refuses weights that would break this.

Stream layout of one contribution (values, in order, packed ``N * F`` per ciphertext):
``[w, 1] + [w * q for every element of every tensor, tensors sorted by name] + [m_t per tensor]``
where ``m_t`` (not weighted) is the site's ``max|delta_t|`` relative to its range, fixed point with
``RATIO_BITS`` integer bits. After aggregation the header reads ``[W, K]`` (total weight, number of
contributions) and the tail gives the mean range ratio from which the next exponents follow.

Error bound (asserted in tests): for a tensor whose deltas all lie inside its range, every element
of the decoded weighted mean differs from the exact weighted mean of the sites' deltas by at most
``s_t / 2`` (nearest rounding) or less than ``s_t`` (stochastic rounding), because the weighted
mean of per-site errors is bounded by their maximum. Storing ``G_v + mean`` in the tensor's dtype
adds at most half a unit in the last place of float32. Values outside the range are clipped
(counted and logged by the caller); the range then widens for the next round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import numpy as np

from monai_fl.he.errors import HECodecError, HEContributionError

# Largest prime below 2**60 with p = 1 (mod 2 * 4096): BFV batching needs p = 1 (mod 2N), and a
# prime this large gives 60-bit slots. tests/he/test_codec.py re-derives it.
DEFAULT_PLAIN_MODULUS = 1152921504606830593

# Integer bits of the range ratio m_t = max|delta| / range: ratios up to 2**RATIO_BITS are
# representable, so a range can grow by up to 2**(RATIO_BITS + margin) in one round.
RATIO_BITS = 4
HEADER_VALUES = 2  # [weight, count]


class Rounding(str, Enum):
    """How a delta is rounded to the quantisation grid."""

    NEAREST = "nearest"
    STOCHASTIC = "stochastic"


def is_probable_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24 (the first 13 primes as bases)."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in bases:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def batching_prime(poly_modulus_degree: int, bits: int) -> int:
    """The largest prime below ``2**bits`` that is 1 modulo ``2 * poly_modulus_degree``.

    Args:
        poly_modulus_degree: BFV ring degree N.
        bits: upper bound exponent (the prime is < 2**bits).

    Returns:
        A plain modulus that supports BFV batching.
    """
    step = 2 * poly_modulus_degree
    k = ((1 << bits) - 2) // step
    while k > 0:
        candidate = k * step + 1
        if is_probable_prime(candidate):
            return candidate
        k -= 1
    raise HECodecError(f"no batching prime below 2**{bits} for N={poly_modulus_degree}")


@dataclass(frozen=True)
class CodecParams:
    """All parameters of the codec; sites and server must agree on every one (see ``codec_id``).

    Attributes:
        poly_modulus_degree: BFV ring degree N (slots per ciphertext).
        coeff_mod_bit_sizes: ciphertext modulus primes; their sum sets security (109 bits total
            is SEAL's 128-bit bound for N=4096). The last prime is SEAL's key-switching prime and
            carries no data; the others set the noise room.
        plain_modulus: BFV plain modulus t, prime and 1 mod 2N.
        quant_bits: b, bits per quantised delta (levels 0 .. 2**b - 2).
        field_bits: width of one packed field (quantised value plus headroom for the sum).
        rounding: nearest (deterministic, bound s/2) or stochastic (unbiased, bound s).
        init_range_rel: round-0 range is ``max(init_range_rel * max|G_0|, init_range_abs)``,
            rounded up to a power of two.
        init_range_abs: floor of the round-0 range (tensors initialised to zero).
        range_margin_log2: the next range is ``2**margin`` times the mean observed peak delta.
        small_tensor_size: tensors with fewer elements get ``small_tensor_margin_log2`` extra
            margin: the peak of a handful of values (biases, BatchNorm) varies a lot between
            rounds, and their precision costs no bytes.
        small_tensor_margin_log2: extra margin of small tensors.
        max_shrink_log2: a range shrinks at most by this many powers of two per round.
        min_range_log2: ranges never go below ``2**min_range_log2``.
        max_contributions: most ciphertexts summed into one aggregate; bounded by the noise
            budget (measured: 4 bits of budget left after 300 additions with the defaults).
    """

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (37, 37, 35)
    plain_modulus: int = DEFAULT_PLAIN_MODULUS
    quant_bits: int = 12
    field_bits: int = 20
    rounding: Rounding = Rounding.STOCHASTIC
    init_range_rel: float = 0.5
    init_range_abs: float = 2.0**-3
    range_margin_log2: int = 2
    small_tensor_size: int = 256
    small_tensor_margin_log2: int = 2
    max_shrink_log2: int = 3
    min_range_log2: int = -40
    max_contributions: int = 256

    def __post_init__(self):
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(int(b) for b in self.coeff_mod_bit_sizes))
        object.__setattr__(self, "rounding", Rounding(self.rounding))
        n = self.poly_modulus_degree
        if n < 1024 or n & (n - 1):
            raise HECodecError(f"poly_modulus_degree must be a power of two >= 1024, got {n}")
        t = self.plain_modulus
        if t % (2 * n) != 1 or not is_probable_prime(t):
            raise HECodecError(f"plain_modulus {t} must be a prime = 1 mod {2 * n} (BFV batching)")
        if t.bit_length() > 60:
            raise HECodecError("plain_modulus must be below 2**60 (SEAL limit)")
        if not RATIO_BITS + 2 <= self.quant_bits <= 30:
            raise HECodecError(f"quant_bits must be in [{RATIO_BITS + 2}, 30], got {self.quant_bits}")
        if self.field_bits < self.quant_bits + 1:
            raise HECodecError("field_bits must exceed quant_bits (headroom for the sum over sites)")
        if self.fields_per_slot < 1 or self.max_total_weight < 1:
            raise HECodecError(
                f"field_bits={self.field_bits}, quant_bits={self.quant_bits} leave no room in a "
                f"{t.bit_length()}-bit slot for even one weighted value")
        if not (self.init_range_rel > 0 and self.init_range_abs > 0):
            raise HECodecError("init_range_rel and init_range_abs must be positive")
        if self.max_contributions < 1:
            raise HECodecError("max_contributions must be >= 1")

    # ---- derived quantities -------------------------------------------------------------
    @property
    def fields_per_slot(self) -> int:
        """F: values packed into one slot."""
        return self.plain_modulus.bit_length() // self.field_bits

    @property
    def field_capacity(self) -> int:
        """Largest sum a field may reach so the whole slot stays below t (no wrap, no carry)."""
        f, fb = self.fields_per_slot, self.field_bits
        cap = (1 << fb) - 1
        # A slot whose every field holds `cap` is cap * (2**(fb F) - 1) / (2**fb - 1); shrink cap
        # until that is < t (only the 60-bit case with F * fb == 60 needs it).
        geometric = ((1 << (fb * f)) - 1) // ((1 << fb) - 1)
        return min(cap, (self.plain_modulus - 1) // geometric)

    @property
    def values_per_ciphertext(self) -> int:
        """N * F packed values per ciphertext."""
        return self.poly_modulus_degree * self.fields_per_slot

    @property
    def max_level(self) -> int:
        """Highest quantisation level, 2**b - 2 (an odd number of levels keeps zero exact)."""
        return (1 << self.quant_bits) - 2

    @property
    def zero_level(self) -> int:
        """Level that encodes a zero delta."""
        return (1 << (self.quant_bits - 1)) - 1

    @property
    def max_total_weight(self) -> int:
        """Largest sum of integer site weights one aggregate can hold without carries."""
        return self.field_capacity // self.max_level

    @property
    def ratio_scale(self) -> int:
        """Fixed-point scale of the range ratio m_t."""
        return 1 << (self.quant_bits - RATIO_BITS)

    def to_dict(self) -> dict:
        """JSON-safe form (for job configs)."""
        d = dataclasses.asdict(self)
        d["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        d["rounding"] = self.rounding.value
        return d

    @classmethod
    def from_dict(cls, d: Mapping | None) -> CodecParams:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo must not pass silently)."""
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise HECodecError(f"unknown codec parameter(s): {', '.join(unknown)}")
        return cls(**d)

    @property
    def codec_id(self) -> str:
        """Short hash of every parameter: contributions with another id are rejected."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---- model layout ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one model tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    @property
    def is_integer(self) -> bool:
        return np.issubdtype(np.dtype(self.dtype), np.integer)


@dataclass(frozen=True)
class Layout:
    """The ordered tensors of a model (sorted by name so every party orders them alike)."""

    specs: tuple[TensorSpec, ...]

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Layout:
        specs = []
        for name in sorted(arrays):
            a = arrays[name]
            dtype = np.dtype(a.dtype)
            if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
                raise HECodecError(f"tensor '{name}' has dtype {dtype}; only float and integer tensors are encoded")
            specs.append(TensorSpec(name, tuple(int(s) for s in a.shape), dtype.name))
        return cls(tuple(specs))

    @classmethod
    def from_list(cls, items: Iterable[Sequence]) -> Layout:
        """Inverse of :meth:`to_list`."""
        return cls(tuple(TensorSpec(str(n), tuple(int(s) for s in shape), str(dt)) for n, shape, dt in items))

    def to_list(self) -> list:
        """JSON-safe form: ``[[name, shape, dtype], ...]``."""
        return [[s.name, list(s.shape), s.dtype] for s in self.specs]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def num_params(self) -> int:
        return sum(s.size for s in self.specs)

    @property
    def layout_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_list()).encode()).hexdigest()[:16]

    def stream_length(self) -> int:
        """Values in one contribution's stream: header, every element, one ratio per tensor."""
        return HEADER_VALUES + self.num_params + len(self.specs)

    def num_ciphertexts(self, params: CodecParams) -> int:
        return -(-self.stream_length() // params.values_per_ciphertext)

    def segment_sizes(self) -> list[int]:
        """Sizes of the stream segments: header, each tensor, the ratio tail."""
        return [HEADER_VALUES] + [s.size for s in self.specs] + [len(self.specs)]


# ---- shared reference state -----------------------------------------------------------------
@dataclass
class ReferenceState:
    """What every site holds between rounds: the global model of one version and its ranges.

    Attributes:
        version: number of aggregates applied since the initial model (0 = initial model).
        layout: tensor names, shapes and dtypes.
        weights: the global model ``G_version`` in each tensor's own dtype.
        exponents: per tensor, ``e_t`` with range ``2**e_t`` for the next deltas.
    """

    version: int
    layout: Layout
    weights: dict[str, np.ndarray]
    exponents: dict[str, int]

    @classmethod
    def initial(cls, weights: Mapping[str, np.ndarray], params: CodecParams) -> ReferenceState:
        """Version 0 from the initial global model (identical at every site)."""
        arrays = {k: np.array(v, copy=True) for k, v in weights.items()}
        layout = Layout.from_arrays(arrays)
        exps = {}
        for spec in layout.specs:
            a = arrays[spec.name]
            if spec.is_integer:
                exps[spec.name] = integer_exponent(params)
            else:
                peak = float(np.max(np.abs(a))) if a.size else 0.0
                exps[spec.name] = ceil_log2(max(params.init_range_rel * peak, params.init_range_abs))
        return cls(0, layout, arrays, exps)

    def step(self, name: str, params: CodecParams) -> float:
        """Quantisation step s_t of a tensor."""
        return math.ldexp(1.0, self.exponents[name] - (params.quant_bits - 1))

    def error_bound(self, params: CodecParams) -> dict[str, float]:
        """Per tensor, the documented bound on |decoded mean delta - exact weighted mean delta|.

        Holds for every element whose delta lies inside the tensor's range at every site. The
        float32 rounding of ``G + mean`` comes on top (half an ulp of the result).
        """
        factor = 0.5 if params.rounding == Rounding.NEAREST else 1.0
        return {s.name: (0.5 if s.is_integer else factor * self.step(s.name, params)) for s in self.layout.specs}


def ceil_log2(x: float) -> int:
    """Smallest e with 2**e >= x, exact for floats (frexp, no libm rounding differences)."""
    if not x > 0 or not math.isfinite(x):
        raise HECodecError(f"range must be positive and finite, got {x}")
    mantissa, exponent = math.frexp(x)  # x = mantissa * 2**exponent, 0.5 <= mantissa < 1
    return exponent - 1 if mantissa == 0.5 else exponent


def integer_exponent(params: CodecParams) -> int:
    """Integer tensors use step 1: counts such as BatchNorm's num_batches_tracked stay exact."""
    return params.quant_bits - 1


def next_exponent(exponent: int, ratio_sum: int, count: int, params: CodecParams, size: int | None = None) -> int:
    """Range exponent for the next round from the summed ratios of ``count`` sites.

    The new range is the smallest power of two >= ``2**margin * mean ratio * 2**exponent`` (the
    margin is larger for tensors of fewer than ``small_tensor_size`` elements), shrinking by at
    most ``2**max_shrink_log2``. Integer arithmetic only, so every site gets the same answer on
    any hardware.
    """
    margin = params.range_margin_log2
    if size is not None and size < params.small_tensor_size:
        margin += params.small_tensor_margin_log2
    target = ratio_sum << margin  # margin * sum(m)
    unit = count * params.ratio_scale  # sum(m) / unit = mean ratio

    def covers(d: int) -> bool:  # unit * 2**d >= target, in integers
        return (unit << d) >= target if d >= 0 else unit >= (target << -d)

    d = -params.max_shrink_log2
    while not covers(d):
        d += 1
    return max(exponent + d, params.min_range_log2)


# ---- quantisation -----------------------------------------------------------------------------
def quantize(delta: np.ndarray, step: float, params: CodecParams, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Map deltas to levels ``0 .. 2**b - 2`` on the grid ``step``.

    Args:
        delta: float64 deltas (finite; the caller checks).
        step: grid step, a power of two.
        params: codec parameters (levels, rounding).
        rng: source of the stochastic-rounding dither.

    Returns:
        (levels as int64, number of clipped elements)
    """
    z = params.zero_level
    x = np.asarray(delta, dtype=np.float64).reshape(-1) / step  # exact: step is a power of two
    clipped = int(np.count_nonzero(np.abs(x) > z))
    np.clip(x, -z, z, out=x)
    if params.rounding == Rounding.STOCHASTIC:
        x += rng.random(x.shape)
        np.floor(x, out=x)
        np.minimum(x, z, out=x)
    else:
        np.rint(x, out=x)
    x += z
    return x.astype(np.int64), clipped


def range_ratio(delta: np.ndarray, exponent: int, params: CodecParams) -> int:
    """Fixed-point ``ceil(max|delta| / 2**exponent)``, capped to one quantised level."""
    if delta.size == 0:
        return 0
    peak = float(np.max(np.abs(delta)))
    return int(min(math.ceil(math.ldexp(peak, params.quant_bits - RATIO_BITS - exponent)), params.max_level))


# ---- slot packing -------------------------------------------------------------------------------
def pack_block(values: np.ndarray, params: CodecParams) -> np.ndarray:
    """Pack up to ``N * F`` non-negative values (field f of slot s = value f*N + s) into N slots."""
    n, f, fb = params.poly_modulus_degree, params.fields_per_slot, params.field_bits
    buf = np.zeros(n * f, dtype=np.uint64)
    buf[: values.size] = values
    planes = buf.reshape(f, n)
    slots = planes[0].copy()
    for i in range(1, f):
        slots |= planes[i] << np.uint64(i * fb)
    return slots


def unpack_block(slots: np.ndarray, params: CodecParams) -> np.ndarray:
    """Inverse of :func:`pack_block` on summed slots: ``N * F`` field sums as uint64."""
    n, f, fb = params.poly_modulus_degree, params.fields_per_slot, params.field_bits
    mask = np.uint64((1 << fb) - 1)
    out = np.empty((f, n), dtype=np.uint64)
    for i in range(f):
        out[i] = (slots >> np.uint64(i * fb)) & mask
    return out.reshape(-1)


class BlockEncryptor(Protocol):
    """Encrypts packed slot blocks (uint64 arrays of N) in order, returning serialized ciphertexts."""

    def encrypt_blocks(self, blocks: Iterable[np.ndarray]) -> list[bytes]: ...


class BlockDecryptor(Protocol):
    """Decrypts serialized ciphertexts in order, yielding uint64 slot arrays of length N."""

    def decrypt_blocks(self, ciphertexts: Sequence[bytes]) -> Iterator[np.ndarray]: ...


def _blocks(segments: Iterable[np.ndarray], params: CodecParams) -> Iterator[np.ndarray]:
    """Cut a stream of value arrays into packed blocks of ``N * F`` values (last one padded)."""
    per = params.values_per_ciphertext
    buf = np.empty(per, dtype=np.uint64)
    fill = 0
    for seg in segments:
        seg = np.asarray(seg).reshape(-1)
        pos = 0
        while pos < seg.size:
            take = min(per - fill, seg.size - pos)
            buf[fill: fill + take] = seg[pos: pos + take]
            fill += take
            pos += take
            if fill == per:
                yield pack_block(buf, params)
                fill = 0
    if fill:
        yield pack_block(buf[:fill], params)


@dataclass
class EncodeReport:
    """What a site learns about its own contribution (for its log, never sent)."""

    num_params: int = 0
    num_ciphertexts: int = 0
    clipped: dict[str, int] = field(default_factory=dict)

    @property
    def total_clipped(self) -> int:
        return sum(self.clipped.values())


def check_update(state: ReferenceState, update: Mapping[str, np.ndarray]) -> None:
    """Refuse an update that does not match the reference layout or is not finite.

    Raises:
        HEContributionError: with a message naming the offending tensor.
    """
    expected = set(state.layout.names)
    got = set(update)
    if got != expected:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise HEContributionError(
            f"update tensors differ from the global model: missing {missing[:5]}, unexpected {extra[:5]}")
    for spec in state.layout.specs:
        a = update[spec.name]
        if tuple(a.shape) != spec.shape:
            raise HEContributionError(f"tensor '{spec.name}' has shape {tuple(a.shape)}, the global model has {spec.shape}")
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            raise HEContributionError(f"tensor '{spec.name}' contains {bad} NaN/Inf value(s)")


def encode_update(
    state: ReferenceState,
    update: Mapping[str, np.ndarray],
    *,
    is_delta: bool,
    weight: int,
    params: CodecParams,
    encryptor: BlockEncryptor,
    rng: np.random.Generator | None = None,
) -> tuple[list[bytes], EncodeReport]:
    """Quantise, weight, pack and encrypt one site's update against the shared reference.

    Args:
        state: the reference model and ranges every site shares.
        update: local model weights (``is_delta=False``) or deltas against ``state.weights``.
        is_delta: whether ``update`` already holds deltas.
        weight: the site's integer FedAvg weight, ``1 <= weight <= params.max_total_weight``.
        params: codec parameters.
        encryptor: cipher backend holding the secret key.
        rng: dither source for stochastic rounding (a fresh OS-seeded one if None).

    Returns:
        (serialized ciphertexts, report with per-tensor clip counts)

    Raises:
        HEContributionError: wrong tensors/shapes, NaN/Inf, or a weight outside the budget.
    """
    if not isinstance(weight, (int, np.integer)) or not 1 <= int(weight) <= params.max_total_weight:
        raise HEContributionError(f"weight must be an integer in [1, {params.max_total_weight}], got {weight!r}")
    weight = int(weight)
    check_update(state, update)
    rng = rng or np.random.default_rng()
    report = EncodeReport(num_params=state.layout.num_params)
    ratios: list[int] = []

    def segments() -> Iterator[np.ndarray]:
        yield np.array([weight, 1], dtype=np.uint64)
        w = np.uint64(weight)
        for spec in state.layout.specs:
            local = np.asarray(update[spec.name], dtype=np.float64)
            delta = local if is_delta else local - state.weights[spec.name]
            exponent = state.exponents[spec.name]
            levels, clipped = quantize(delta, state.step(spec.name, params), params, rng)
            if clipped:
                report.clipped[spec.name] = clipped
            ratios.append(0 if spec.is_integer else range_ratio(delta, exponent, params))
            yield levels.astype(np.uint64) * w
        yield np.array(ratios, dtype=np.uint64)

    ciphertexts = encryptor.encrypt_blocks(_blocks(segments(), params))
    report.num_ciphertexts = len(ciphertexts)
    expected = state.layout.num_ciphertexts(params)
    if len(ciphertexts) != expected:  # a programming error, never user input
        raise HECodecError(f"encoded {len(ciphertexts)} ciphertexts, layout needs {expected}")
    return ciphertexts, report


class _StreamReader:
    """Walks the decrypted value stream and hands each segment (header, tensors, tail) out whole."""

    def __init__(self, sizes: Sequence[int], consume: Callable[[int, np.ndarray], None]):
        self.sizes = list(sizes)
        self.consume = consume
        self.index = 0
        self.parts: list[np.ndarray] = []
        self.have = 0

    def feed(self, values: np.ndarray) -> None:
        pos = 0
        while pos < values.size and self.index < len(self.sizes):
            need = self.sizes[self.index] - self.have
            take = min(need, values.size - pos)
            self.parts.append(values[pos: pos + take])
            self.have += take
            pos += take
            if self.have == self.sizes[self.index]:
                seg = self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts)
                self.consume(self.index, seg)
                self.index += 1
                self.parts, self.have = [], 0
        if pos < values.size and np.any(values[pos:]):
            raise HEContributionError("padding after the last segment is not zero: corrupted aggregate")

    @property
    def done(self) -> bool:
        return self.index == len(self.sizes)


def decode_aggregate(
    state: ReferenceState,
    ciphertexts: Sequence[bytes],
    *,
    params: CodecParams,
    decryptor: BlockDecryptor,
    expected_count: int | None = None,
    expected_weight: int | None = None,
) -> ReferenceState:
    """Decrypt a sum of contributions made against ``state`` and return the next state.

    Args:
        state: the reference the contributions were encoded against.
        ciphertexts: the aggregate (one contribution decodes too: K = 1).
        params: codec parameters.
        decryptor: cipher backend holding the secret key.
        expected_count: K as announced by the server in plaintext; checked against the encrypted K.
        expected_weight: W as announced; checked against the encrypted W.

    Returns:
        ``ReferenceState`` of version ``state.version + 1``.

    Raises:
        HEContributionError: wrong number of ciphertexts, or decrypted header/fields impossible
            for an honest sum (tampering, or more weight than the fields can hold).
    """
    layout = state.layout
    if len(ciphertexts) != layout.num_ciphertexts(params):
        raise HEContributionError(
            f"aggregate has {len(ciphertexts)} ciphertexts, the model layout needs {layout.num_ciphertexts(params)}")
    specs = layout.specs
    new_weights: dict[str, np.ndarray] = {}
    header: dict[str, int] = {}
    ratio_sums: list[int] = []

    def consume(index: int, seg: np.ndarray) -> None:
        if index == 0:
            total_weight, count = int(seg[0]), int(seg[1])
            if not (1 <= count <= params.max_contributions and count <= total_weight <= params.max_total_weight):
                raise HEContributionError(f"decrypted header W={total_weight}, K={count} is impossible: corrupted aggregate")
            if expected_count is not None and count != expected_count:
                raise HEContributionError(f"aggregate holds {count} contributions, the server announced {expected_count}")
            if expected_weight is not None and total_weight != expected_weight:
                raise HEContributionError(f"aggregate holds weight {total_weight}, the server announced {expected_weight}")
            header.update(W=total_weight, K=count)
            return
        if index == len(specs) + 1:
            ratio_sums.extend(int(v) for v in seg)
            return
        spec = specs[index - 1]
        total = header["W"]
        if seg.size and int(seg.max()) > total * params.max_level:
            raise HEContributionError(f"tensor '{spec.name}' decrypts above W * max level: corrupted aggregate")
        step = state.step(spec.name, params)
        mean_delta = (seg.astype(np.float64) / total - params.zero_level) * step
        base = state.weights[spec.name]
        if spec.is_integer:
            new = base + np.rint(mean_delta).astype(base.dtype)
        else:
            new = (base.astype(np.float64) + mean_delta.reshape(spec.shape)).astype(base.dtype)
        new_weights[spec.name] = new.reshape(spec.shape)

    reader = _StreamReader(layout.segment_sizes(), consume)
    for slots in decryptor.decrypt_blocks(ciphertexts):
        reader.feed(unpack_block(slots, params))
    if not reader.done:
        raise HEContributionError("aggregate ended before the model layout was complete")

    exponents = {}
    for spec, ratio_sum in zip(specs, ratio_sums):
        if spec.is_integer:
            exponents[spec.name] = state.exponents[spec.name]
        else:
            exponents[spec.name] = next_exponent(state.exponents[spec.name], ratio_sum, header["K"], params, spec.size)
    return ReferenceState(state.version + 1, layout, new_weights, exponents)


def weighted_mean_reference(
    state: ReferenceState, updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[int], *, is_delta: bool = False
) -> dict[str, np.ndarray]:
    """Plaintext FedAvg of the same updates (float64), the ground truth the tests compare with."""
    total = float(sum(weights))
    out = {}
    for spec in state.layout.specs:
        base = state.weights[spec.name].astype(np.float64)
        acc = np.zeros(spec.shape, dtype=np.float64)
        for upd, w in zip(updates, weights):
            a = np.asarray(upd[spec.name], dtype=np.float64)
            acc += w * (a if is_delta else a - base)
        out[spec.name] = base + acc / total
    return out
