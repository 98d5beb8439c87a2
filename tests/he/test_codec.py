"""Codec: parameters, packing, quantisation bounds, and HE FedAvg == plaintext FedAvg within bound."""

from __future__ import annotations

import numpy as np
import pytest
from he_helpers import cnn_weights, local_update

from monai_fl.he.backend import CiphertextAdder
from monai_fl.he.codec import (
    DEFAULT_PLAIN_MODULUS,
    CodecParams,
    Layout,
    ReferenceState,
    Rounding,
    batching_prime,
    ceil_log2,
    decode_aggregate,
    encode_update,
    next_exponent,
    pack_block,
    quantize,
    unpack_block,
    weighted_mean_reference,
)
from monai_fl.he.errors import HECodecError, HEContributionError


def test_default_plain_modulus_is_the_largest_60_bit_batching_prime():
    assert batching_prime(4096, 60) == DEFAULT_PLAIN_MODULUS
    assert DEFAULT_PLAIN_MODULUS % 8192 == 1 and DEFAULT_PLAIN_MODULUS < 2**60


def test_derived_budget(params):
    assert params.fields_per_slot == 3
    assert params.values_per_ciphertext == 3 * 4096
    assert params.max_total_weight == 256
    # A slot whose three fields are all at capacity stays below t: no wrap-around, no carry.
    full = sum(params.field_capacity << (i * params.field_bits) for i in range(3))
    assert full < params.plain_modulus


@pytest.mark.parametrize("bad", [
    {"plain_modulus": DEFAULT_PLAIN_MODULUS + 2},  # not prime / not 1 mod 2N
    {"poly_modulus_degree": 3000},
    {"quant_bits": 20, "field_bits": 20},
    {"quant_bits": 3},
    {"init_range_abs": 0.0},
])
def test_invalid_params_raise(bad):
    with pytest.raises(HECodecError):
        CodecParams(**bad)


def test_params_round_trip_and_id():
    p = CodecParams(rounding="nearest", quant_bits=13)
    assert CodecParams.from_dict(p.to_dict()) == p
    assert p.codec_id != CodecParams().codec_id
    with pytest.raises(HECodecError, match="unknown codec parameter"):
        CodecParams.from_dict({"quantbits": 12})


def test_pack_unpack_and_carry_free_sum(params):
    rng = np.random.default_rng(1)
    cap = params.field_capacity
    values = [rng.integers(0, cap // 4 + 1, size=params.values_per_ciphertext).astype(np.uint64) for _ in range(4)]
    packed = [pack_block(v, params) for v in values]
    assert np.array_equal(unpack_block(packed[0], params), values[0])
    # Adding packed slots (what the server does, mod t) equals packing the field sums.
    total = np.zeros(params.poly_modulus_degree, dtype=object)
    for p in packed:
        total = (total + p.astype(object)) % params.plain_modulus
    assert np.array_equal(unpack_block(total.astype(np.uint64), params), sum(values))


@pytest.mark.parametrize("rounding,bound", [(Rounding.NEAREST, 0.5), (Rounding.STOCHASTIC, 1.0)])
def test_quantize_error_bound(rounding, bound):
    p = CodecParams(rounding=rounding)
    rng = np.random.default_rng(2)
    step = 2.0**-10
    delta = rng.uniform(-1, 1, size=100_000) * (p.zero_level * step)
    levels, clipped = quantize(delta, step, p, rng)
    assert clipped == 0 and levels.min() >= 0 and levels.max() <= p.max_level
    err = np.abs((levels - p.zero_level) * step - delta)
    assert err.max() <= bound * step
    zero, _ = quantize(np.zeros(5), step, p, rng)
    assert np.all(zero == p.zero_level)  # a frozen parameter stays exactly unchanged
    _, clipped = quantize(np.array([10.0, -10.0, 0.0]), step, p, rng)
    assert clipped == 2


def test_stochastic_rounding_is_unbiased():
    p = CodecParams()
    rng = np.random.default_rng(3)
    step = 1.0
    delta = np.full(200_000, 0.3)
    levels, _ = quantize(delta, step, p, rng)
    assert abs(float(np.mean(levels - p.zero_level)) - 0.3) < 0.01


def test_ranges_are_exact_powers_of_two_and_adapt(params):
    assert ceil_log2(0.25) == -2 and ceil_log2(0.26) == -1 and ceil_log2(1.0) == 0
    r = params.ratio_scale
    assert (params.range_margin_log2, params.max_shrink_log2, params.small_tensor_margin_log2) == (2, 3, 2)
    # 3 sites whose deltas reach the range (ratio 1.0): mean 1, margin 4 -> range grows 4x.
    assert next_exponent(-5, 3 * r, 3, params) == -3
    # Deltas a quarter of the range: 4 * 0.25 = 1 -> range kept.
    assert next_exponent(-5, 3 * r // 4, 3, params) == -5
    # Deltas 1/16 of the range -> range / 4; small tensors keep 4x more margin.
    assert next_exponent(-5, 3 * r // 16, 3, params) == -7
    assert next_exponent(-5, 3 * r // 16, 3, params, size=16) == -5
    # Ranges grow fast but shrink at most 8x per round, so a quiet round cannot collapse them.
    assert next_exponent(-5, 0, 3, params) == -5 - params.max_shrink_log2
    assert next_exponent(params.min_range_log2, 0, 1, params) == params.min_range_log2


def _he_fedavg(state, updates, weights, params, cipher, is_delta=False):
    adder = CiphertextAdder(params)
    rng = np.random.default_rng(11)
    contributions = []
    for u, w in zip(updates, weights):
        cts, report = encode_update(state, u, is_delta=is_delta, weight=w, params=params, encryptor=cipher, rng=rng)
        assert report.total_clipped == 0
        contributions.append(cts)
    aggregate = adder.sum(contributions)
    return decode_aggregate(state, aggregate, params=params, decryptor=cipher,
                            expected_count=len(updates), expected_weight=sum(weights))


@pytest.mark.parametrize("rounding", list(Rounding))
def test_he_fedavg_equals_plaintext_fedavg_within_bound(rounding, contexts, cipher):
    params = CodecParams(rounding=rounding)
    rng = np.random.default_rng(4)
    g0 = cnn_weights(rng)
    state = ReferenceState.initial(g0, params)
    # Round 0 has wide initial ranges; round 1 uses ranges learnt from round 0's encrypted stats.
    for _ in range(2):
        updates = [local_update(state.weights, rng, scale=0.004, steps=s) for s in (10, 7, 12)]
        weights = [10, 7, 12]
        new = _he_fedavg(state, updates, weights, params, cipher)
        exact = weighted_mean_reference(state, updates, weights)
        bound = state.error_bound(params)
        for spec in state.layout.specs:
            got = new.weights[spec.name].astype(np.float64)
            ulp = np.spacing(np.abs(exact[spec.name]).astype(np.float32)).astype(np.float64)
            tol = bound[spec.name] + (0.0 if spec.is_integer else ulp)
            assert np.all(np.abs(got - exact[spec.name]) <= tol), spec.name
            assert new.weights[spec.name].dtype == g0[spec.name].dtype
        assert new.version == state.version + 1
        state = new
    # Learnt ranges are tighter than the initial ones for the weights (deltas << weights).
    assert state.exponents["conv2.weight"] < ReferenceState.initial(g0, params).exponents["conv2.weight"]


def test_deltas_and_weights_encode_the_same(params, cipher):
    rng = np.random.default_rng(5)
    state = ReferenceState.initial(cnn_weights(rng), params)
    local = local_update(state.weights, rng, scale=0.004)
    deltas = {k: v.astype(np.float64) - state.weights[k] for k, v in local.items()}
    a = _he_fedavg(state, [local], [1], params, cipher)
    b = _he_fedavg(state, [deltas], [1], params, cipher, is_delta=True)
    for k in a.weights:
        assert np.allclose(a.weights[k], b.weights[k], atol=2 * state.error_bound(params)[k])
    assert a.exponents == b.exponents


def test_every_site_decodes_identically(params, cipher):
    """Two sites decoding the same aggregate reach bit-identical models and ranges."""
    rng = np.random.default_rng(6)
    state = ReferenceState.initial(cnn_weights(rng), params)
    cts, _ = encode_update(state, local_update(state.weights, rng), is_delta=False, weight=3,
                           params=params, encryptor=cipher)
    a = decode_aggregate(state, cts, params=params, decryptor=cipher)
    b = decode_aggregate(state, cts, params=params, decryptor=cipher)
    assert a.exponents == b.exponents
    assert all(np.array_equal(a.weights[k], b.weights[k]) for k in a.weights)


@pytest.mark.parametrize("mutate,match", [
    (lambda u: u.__setitem__("fc.bias", np.array([np.nan, 0.0], np.float32)), "NaN"),
    (lambda u: u.__setitem__("fc.weight", np.zeros((3, 32 * 7 * 7), np.float32)), "shape"),
    (lambda u: u.pop("conv1.bias"), "missing"),
    (lambda u: u.__setitem__("extra", np.zeros(1, np.float32)), "unexpected"),
])
def test_bad_updates_are_refused(mutate, match, params, cipher):
    rng = np.random.default_rng(7)
    state = ReferenceState.initial(cnn_weights(rng), params)
    u = local_update(state.weights, rng)
    mutate(u)
    with pytest.raises(HEContributionError, match=match):
        encode_update(state, u, is_delta=False, weight=1, params=params, encryptor=cipher)


def test_weight_outside_budget_is_refused(params, cipher):
    state = ReferenceState.initial(cnn_weights(np.random.default_rng(8)), params)
    for w in (0, params.max_total_weight + 1, 1.5):
        with pytest.raises(HEContributionError, match="weight"):
            encode_update(state, state.weights, is_delta=False, weight=w, params=params, encryptor=cipher)


def test_decode_checks_announced_count_and_length(params, cipher):
    rng = np.random.default_rng(9)
    state = ReferenceState.initial(cnn_weights(rng), params)
    cts, _ = encode_update(state, local_update(state.weights, rng), is_delta=False, weight=2,
                           params=params, encryptor=cipher)
    with pytest.raises(HEContributionError, match="announced"):
        decode_aggregate(state, cts, params=params, decryptor=cipher, expected_count=2)
    with pytest.raises(HEContributionError, match="ciphertexts"):
        decode_aggregate(state, cts + cts, params=params, decryptor=cipher)


def test_layout_is_sorted_and_hash_sensitive_to_shape():
    a = Layout.from_arrays({"b": np.zeros(2), "a": np.zeros((1, 2))})
    assert a.names == ["a", "b"]
    b = Layout.from_arrays({"b": np.zeros(3), "a": np.zeros((1, 2))})
    assert a.layout_hash != b.layout_hash
    assert Layout.from_list(a.to_list()) == a
