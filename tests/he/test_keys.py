"""Key material: the server's context cannot decrypt; contexts must match the codec parameters."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
from he_helpers import cnn_weights

from monai_fl.he.backend import CiphertextAdder
from monai_fl.he.codec import CodecParams, ReferenceState, encode_update
from monai_fl.he.errors import HECodecError, HEContributionError, HEKeyError
from monai_fl.he.keys import (
    CLIENT_CONTEXT_FILE,
    KEY_ID_FILE,
    SERVER_CONTEXT_FILE,
    check_matches,
    generate_contexts,
    is_private,
    key_id,
    load_context,
    read_key_id,
    require_server_context,
    save_contexts,
    secret_cipher,
    write_simulator_contexts,
)


def test_server_context_is_not_private_and_cannot_decrypt(contexts, params):
    server = load_context(contexts.server)
    client = load_context(contexts.client)
    assert is_private(client) and not is_private(server)
    require_server_context(server, params)
    with pytest.raises(HEKeyError, match="no secret key"):
        secret_cipher(server, params)
    # The TenSEAL API refuses too: a vector encrypted by a site cannot be decrypted with it.
    vec = ts.bfv_vector(client, [1, 2, 3])
    with pytest.raises(ValueError, match="secret"):
        ts.bfv_vector_from(server, vec.serialize()).decrypt()
    with pytest.raises(ValueError):
        server.secret_key()
    # Parameters only: no public, relinearisation or Galois key material either.
    assert not server.data.has_relin_keys() and not server.data.has_galois_keys()
    assert len(contexts.server) < 200


def test_server_refuses_a_private_context(contexts, params):
    with pytest.raises(HEKeyError, match="secret key"):
        require_server_context(load_context(contexts.client), params)


def test_only_the_bfv_parameters_must_match_the_kits(contexts, params):
    """Kits provisioned with the default codec serve a job with other quantisation settings (the
    demo job's quant_bits 13): only degree, coefficient moduli and plain modulus enter the keys."""
    job = CodecParams(quant_bits=13, field_bits=21, rounding="nearest", max_contributions=16)
    assert job.codec_id != params.codec_id
    require_server_context(load_context(contexts.server), job)
    secret_cipher(load_context(contexts.client), job).close()
    with pytest.raises(HECodecError, match="does not match"):
        require_server_context(load_context(contexts.server), CodecParams(poly_modulus_degree=8192,
                                                                          coeff_mod_bit_sizes=(43, 43, 44, 44, 44)))


def test_context_of_other_parameters_is_rejected(contexts):
    other = CodecParams(coeff_mod_bit_sizes=(36, 36, 37))
    with pytest.raises(HECodecError, match="does not match"):
        check_matches(load_context(contexts.server), other)


def test_unreadable_context(tmp_path):
    with pytest.raises(HEKeyError, match="not found"):
        load_context(tmp_path / "missing.tenseal")
    bad = tmp_path / "bad.tenseal"
    bad.write_bytes(b"not a context")
    with pytest.raises(HEKeyError, match="cannot read"):
        load_context(bad)


def test_key_id_names_the_key_generation(contexts, params, tmp_path):
    """The server context is the same bytes in every generation (parameters only): only the key id,
    a hash of the secret key, tells two provisioning runs apart."""
    other = generate_contexts(params)
    assert other.server == contexts.server
    assert other.key_id != contexts.key_id
    assert key_id(load_context(contexts.client)) == contexts.key_id  # derived again from the file's bytes
    assert len(contexts.key_id) == 16 and int(contexts.key_id, 16) >= 0
    with pytest.raises(HEKeyError, match="no secret key"):
        key_id(load_context(contexts.server))
    client_path, server_path = save_contexts(tmp_path / "site", tmp_path / "server", params)
    written = read_key_id(server_path.with_name(KEY_ID_FILE))
    assert read_key_id(client_path.with_name(KEY_ID_FILE)) == written == key_id(load_context(client_path))
    (tmp_path / "bad.txt").write_text("not an id\n")
    with pytest.raises(HEKeyError, match="does not hold an HE key id"):
        read_key_id(tmp_path / "bad.txt")


def test_simulator_contexts(tmp_path, params):
    ws = tmp_path / "ws"
    both = write_simulator_contexts(ws, params)
    assert both.client_context == (ws / "startup" / CLIENT_CONTEXT_FILE).resolve()
    assert both.client_context_arg == CLIENT_CONTEXT_FILE
    assert (both.client_context.stat().st_mode & 0o777) == 0o600
    split = write_simulator_contexts(ws, params, client_key_dir=tmp_path / "site_keys")
    assert not (ws / "startup" / CLIENT_CONTEXT_FILE).exists()  # stale secret removed
    assert is_private(load_context(split.client_context))
    assert not is_private(load_context(ws / "startup" / SERVER_CONTEXT_FILE))
    assert split.client_context_arg == str(split.client_context)
    assert read_key_id(ws / "startup" / KEY_ID_FILE) == key_id(load_context(split.client_context))


def test_adder_accepts_only_valid_ciphertexts(contexts, params, cipher):
    adder = CiphertextAdder(params)
    state = ReferenceState.initial(cnn_weights(np.random.default_rng(0)), params)
    cts, _ = encode_update(state, state.weights, is_delta=False, weight=1, params=params, encryptor=cipher)
    adder.load(cts[0])
    for bad, match in [(np.zeros(4), "bytes"), (b"\x00" * 100, "magic"), (cts[0][:500], "invalid")]:
        with pytest.raises(HEContributionError, match=match):
            adder.load(bad)
    other = CodecParams(coeff_mod_bit_sizes=(36, 36, 37))
    with pytest.raises(HEContributionError):
        CiphertextAdder(other).load(cts[0])


def test_seeded_upload_is_half_the_summed_size(params, cipher):
    state = ReferenceState.initial(cnn_weights(np.random.default_rng(1)), params)
    cts, _ = encode_update(state, state.weights, is_delta=False, weight=1, params=params, encryptor=cipher)
    total = CiphertextAdder(params).sum([cts, cts])
    assert len(cts[0]) < 0.6 * len(total[0])
    assert cipher.noise_budget(total[0]) > 0
