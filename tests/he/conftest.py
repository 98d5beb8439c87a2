"""Fixtures shared by the HE tests: one key generation and one site cipher per session."""

from __future__ import annotations

import pytest

from monai_fl.he.codec import CodecParams
from monai_fl.he.keys import generate_contexts, load_context, secret_cipher


@pytest.fixture(scope="session")
def params() -> CodecParams:
    return CodecParams()


@pytest.fixture(scope="session")
def contexts(params):
    return generate_contexts(params)


@pytest.fixture(scope="session")
def cipher(contexts, params):
    c = secret_cipher(load_context(contexts.client), params, workers=1)
    yield c
    c.close()
