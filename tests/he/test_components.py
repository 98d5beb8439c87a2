"""NVFlare components driven directly with Shareables: site filters -> aggregator -> generator -> sites."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from he_helpers import cnn_weights, local_update
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants

from monai_fl.he.codec import CodecParams, Layout, ReferenceState, weighted_mean_reference
from monai_fl.he.errors import HEContributionError, HEKeyError
from monai_fl.he.keys import KEY_ID_FILE, SERVER_CONTEXT_FILE, read_key_id, save_contexts
from monai_fl.he.nvflare_components import (
    CIPHERTEXTS_KEY,
    SITE_CODEC_ID,
    HEAggregator,
    HEDecryptFilter,
    HEEncryptFilter,
    HEMetaKey,
    HEModelPersistor,
    HEShareableGenerator,
    HESiteCodec,
)
from monai_fl.he.package import read_package, write_package


class FakeEngine:
    """Just enough of an NVFlare engine: component lookup and a no-op event bus."""

    def __init__(self, components=None):
        self.components = components or {}

    def get_component(self, cid):
        return self.components.get(cid)

    def fire_event(self, event_type, fl_ctx):
        pass


def make_ctx(engine, identity, **props) -> FLContext:
    ctx = FLContext()
    ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=False)
    ctx.set_prop(ReservedKey.IDENTITY_NAME, identity, private=False, sticky=False)
    for k, v in props.items():
        ctx.set_prop(k, v, private=True, sticky=False)
    return ctx


class Site:
    """One site: codec component, both filters, its own FL context."""

    def __init__(self, name, client_ctx_path, params):
        self.name = name
        self.codec = HESiteCodec(params=params.to_dict(), context_file=str(client_ctx_path), weight_mode="steps")
        self.engine = FakeEngine({SITE_CODEC_ID: self.codec})
        self.ctx = make_ctx(self.engine, name)
        self.codec.handle_event(EventType.START_RUN, self.ctx)
        self.decrypt = HEDecryptFilter()
        self.encrypt = HEEncryptFilter(weighted=True)

    def receive(self, task_data: Shareable) -> dict:
        out = self.decrypt.process(wire(task_data), self.ctx)
        return from_shareable(out).data

    def send(self, weights: dict, steps: int, round_num: int, kind=DataKind.WEIGHTS) -> Shareable:
        result = DXO(kind, weights, {MetaKey.NUM_STEPS_CURRENT_ROUND: steps}).to_shareable()
        result = self.encrypt.process(result, self.ctx)
        result.set_peer_props({ReservedKey.IDENTITY_NAME: self.name})
        result.add_cookie(AppConstants.CONTRIBUTION_ROUND, round_num)
        return wire(result)


def wire(s: Shareable) -> Shareable:
    """Serialize and parse again, as the network would."""
    return Shareable.from_bytes(s.to_bytes())


def only_public_types(obj) -> bool:
    """True if obj holds nothing but ciphertext bytes and plain metadata (no arrays, no floats)."""
    if isinstance(obj, dict):
        return all(isinstance(k, str) and only_public_types(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(only_public_types(v) for v in obj)
    return obj is None or isinstance(obj, (bytes, str, bool, int))


@pytest.fixture(scope="module", autouse=True)
def numpy_decomposers():
    """FOBS needs numpy decomposers to serialize plaintext tensors, as the NVFlare runtime registers.

    FOBS keeps its registry in module globals. The numpy decomposers left registered in this
    process break a later FLARE API admin login here (the challenge reply's certificate decodes
    to None), so the registry is restored afterwards.
    """
    from nvflare.app_common.decomposers import common_decomposers
    from nvflare.fuel.utils.fobs import fobs

    saved = {name: getattr(fobs, name).copy() for name in ("_decomposers", "_dot_handlers", "_type_name_whitelist")}
    common_decomposers.register()
    yield
    for name, value in saved.items():
        setattr(fobs, name, value)
    common_decomposers.register.registered = False


@pytest.fixture()
def setup(tmp_path):
    params = CodecParams()
    client_path, server_path = save_contexts(tmp_path / "site", tmp_path / "server", params)
    server_engine = FakeEngine()
    aggregator = HEAggregator(params=params.to_dict(), context_file=str(server_path))
    generator = HEShareableGenerator(params=params.to_dict())
    aggregator.handle_event(EventType.START_RUN, make_ctx(server_engine, "server"))
    sites = [Site(f"site-{i + 1}", client_path, params) for i in range(3)]
    yield params, aggregator, generator, server_engine, sites
    for s in sites:
        s.codec.handle_event(EventType.END_RUN, s.ctx)


def _server_round(aggregator, generator, engine, global_model, round_num, results):
    ctx = make_ctx(engine, "server", **{AppConstants.GLOBAL_MODEL: global_model, AppConstants.CURRENT_ROUND: round_num})
    accepted = [aggregator.accept(r, ctx) for r in results]
    aggr = aggregator.aggregate(ctx)
    new_global = generator.shareable_to_learnable(aggr, ctx)
    aggregator.reset(ctx)
    return accepted, aggr, new_global


def test_full_round_trip_and_server_sees_ciphertext_only(setup):
    params, aggregator, generator, engine, sites = setup
    rng = np.random.default_rng(0)
    g0 = cnn_weights(rng)
    global_model = make_model_learnable(g0, {})
    state = None
    for round_num, steps in enumerate([(10, 5, 20), (8, 8, 8)]):
        task = generator.learnable_to_shareable(global_model, make_ctx(engine, "server"))
        received = [s.receive(task) for s in sites]
        if round_num == 0:
            assert all(np.array_equal(received[0][k], g0[k]) for k in g0)  # plaintext passes through
            state = ReferenceState.initial(g0, params)
        for r in received[1:]:
            assert all(np.array_equal(received[0][k], r[k]) for k in r)  # every site holds the same model
        locals_ = [local_update(received[i], rng, scale=0.003, steps=steps[i]) for i in range(3)]
        results = [s.send(l, st, round_num) for s, l, st in zip(sites, locals_, steps)]
        for r in results:  # what the server-side aggregator receives
            dxo = from_shareable(r)
            assert set(dxo.data) == {CIPHERTEXTS_KEY}
            assert all(isinstance(c, bytes) and c[:2] == b"\x5e\xa1" for c in dxo.data[CIPHERTEXTS_KEY])
            assert only_public_types(dxo.data) and only_public_types(dxo.meta)
            assert len(dxo.data[CIPHERTEXTS_KEY]) == Layout.from_arrays(g0).num_ciphertexts(params)
        accepted, aggr, global_model = _server_round(aggregator, generator, engine, global_model, round_num, results)
        assert accepted == [True, True, True]
        assert only_public_types(from_shareable(aggr).data)
        assert global_model["meta"][HEMetaKey.VERSION] == round_num + 1
        assert only_public_types(global_model["weights"])  # the server's global model is ciphertext
        # Sites decode the next global model; compare with plaintext FedAvg of the same locals.
        exact = weighted_mean_reference(state, locals_, list(steps))
        bound = state.error_bound(params)
        task = generator.learnable_to_shareable(global_model, make_ctx(engine, "server"))
        decoded = sites[0].receive(task)
        for name in g0:
            ulp = np.spacing(np.abs(exact[name]).astype(np.float32))
            assert np.all(np.abs(decoded[name] - exact[name]) <= bound[name] + ulp), name
        state = sites[0].codec.state
        global_model_for_sites = decoded
        assert global_model_for_sites is not None


def _prime(setup, rng):
    _, _, generator, engine, sites = setup
    g0 = cnn_weights(rng)
    global_model = make_model_learnable(g0, {})
    task = generator.learnable_to_shareable(global_model, make_ctx(engine, "server"))
    received = [s.receive(task) for s in sites]
    return g0, global_model, received


def test_nan_update_is_refused_at_the_site(setup, caplog):
    sites = setup[-1]
    _, _, received = _prime(setup, np.random.default_rng(1))
    bad = dict(received[0])
    bad["fc.bias"] = np.array([np.nan, 1.0], np.float32)
    with caplog.at_level(logging.ERROR), pytest.raises(HEContributionError, match="NaN"):
        sites[0].send(bad, 5, 0)
    assert any("refuses to send its update" in r.getMessage() and "NaN" in r.getMessage() for r in caplog.records)


def test_bad_contributions_are_rejected_and_round_completes(setup, caplog, tmp_path):
    params, aggregator, generator, engine, sites = setup
    rng = np.random.default_rng(2)
    g0, global_model, received = _prime(setup, rng)
    good = [local_update(received[i], rng, scale=0.003, steps=5) for i in range(3)]
    results = [s.send(l, 5, 0) for s, l in zip(sites, good)]

    # A malicious site that skipped its own checks: declares a wrongly shaped model.
    wrong_shape = wire(results[2])
    dxo = from_shareable(wrong_shape)
    layout = [list(x) for x in dxo.meta[HEMetaKey.LAYOUT]]
    for entry in layout:
        if entry[0] == "fc.weight":
            entry[1] = [3, 32 * 7 * 7]
    dxo.meta[HEMetaKey.LAYOUT] = layout
    dxo.meta[HEMetaKey.LAYOUT_HASH] = "0" * 16
    wrong_shape = dxo.update_shareable(wrong_shape)

    garbage = wire(results[2])
    gdxo = from_shareable(garbage)
    gdxo.data = {CIPHERTEXTS_KEY: [b"\x5e\xa1" + b"\x00" * 100] * len(gdxo.data[CIPHERTEXTS_KEY])}
    garbage = gdxo.update_shareable(garbage)

    plaintext = DXO(DataKind.WEIGHTS, good[2]).to_shareable()
    plaintext.set_peer_props({ReservedKey.IDENTITY_NAME: "site-x"})

    with caplog.at_level(logging.ERROR):
        accepted, aggr, new_global = _server_round(
            aggregator, generator, engine, global_model, 0,
            [results[0], wrong_shape, garbage, plaintext, results[1], results[1]])
    assert accepted == [True, False, False, False, True, False]
    messages = [r.getMessage() for r in caplog.records if "REJECTED" in r.getMessage()]
    assert any("fc.weight" in m and "shape" in m for m in messages)
    assert any("invalid ciphertext" in m for m in messages)
    assert any("not encrypted" in m for m in messages)
    assert any("second contribution" in m for m in messages)
    # The round completed with the two valid sites: their FedAvg, within the bound.
    meta = from_shareable(aggr).meta
    assert meta[HEMetaKey.NUM_CONTRIBUTIONS] == 2 and meta[HEMetaKey.TOTAL_WEIGHT] == 10
    state = ReferenceState.initial(g0, params)
    exact = weighted_mean_reference(state, good[:2], [5, 5])
    decoded = sites[2].receive(generator.learnable_to_shareable(new_global, make_ctx(engine, "server")))
    bound = state.error_bound(params)
    for name in g0:
        assert np.all(np.abs(decoded[name] - exact[name]) <= bound[name] + np.spacing(np.float32(4))), name


def test_matching_key_ids_are_accepted(setup):
    _, aggregator, generator, engine, sites = setup
    rng = np.random.default_rng(4)
    _, global_model, received = _prime(setup, rng)
    results = [s.send(local_update(r, rng, scale=0.003), 5, 0) for s, r in zip(sites, received)]
    # every site derived the id from its secret key; the server read it from its kit's file
    assert {from_shareable(r).meta[HEMetaKey.KEY_ID] for r in results} == {aggregator.key_id}
    assert aggregator.key_id == read_key_id(Path(aggregator.context_file).with_name(KEY_ID_FILE))
    accepted, aggr, new_global = _server_round(aggregator, generator, engine, global_model, 0, results)
    assert accepted == [True, True, True]
    assert from_shareable(aggr).meta[HEMetaKey.KEY_ID] == aggregator.key_id
    assert new_global["meta"][HEMetaKey.KEY_ID] == aggregator.key_id
    sites[0].receive(generator.learnable_to_shareable(new_global, make_ctx(engine, "server")))
    assert sites[0].codec.state.version == 1


def test_keys_from_another_provisioning_run_are_rejected(setup, caplog, tmp_path):
    """A site whose kit comes from another key generation (same parameters, another secret key):
    the server refuses its contribution, naming the site and both key ids, and the round goes on
    with the others; were it added, the sum would decrypt to noise at every site."""
    params, aggregator, generator, engine, sites = setup
    other_client, _ = save_contexts(tmp_path / "other_run" / "site", tmp_path / "other_run" / "server", params)
    stranger = Site("site-2", other_client, params)
    try:
        assert stranger.codec.key_id != aggregator.key_id
        rng = np.random.default_rng(5)
        g0, global_model, received = _prime(setup, rng)
        task = generator.learnable_to_shareable(global_model, make_ctx(engine, "server"))
        stranger.receive(task)  # the initial model is plaintext: any site can take it
        locals_ = [local_update(r, rng, scale=0.003) for r in received]
        results = [sites[0].send(locals_[0], 5, 0), stranger.send(locals_[1], 5, 0), sites[2].send(locals_[2], 5, 0)]
        with caplog.at_level(logging.ERROR):
            accepted, aggr, new_global = _server_round(aggregator, generator, engine, global_model, 0, results)
        assert accepted == [True, False, True]
        rejected = [r.getMessage() for r in caplog.records if "REJECTED" in r.getMessage()]
        assert len(rejected) == 1 and rejected[0].endswith(
            f"HE: REJECTED contribution from site-2: site-2 holds HE keys from another provisioning run "
            f"(key id {stranger.codec.key_id}, the server's is {aggregator.key_id}); "
            "re-distribute the kits from one provisioning run"), rejected
        # the round completed with the two sites of this run, and they decode their FedAvg
        meta = from_shareable(aggr).meta
        assert meta[HEMetaKey.NUM_CONTRIBUTIONS] == 2 and meta[HEMetaKey.CONTRIBUTORS] == ["site-1", "site-3"]
        next_task = generator.learnable_to_shareable(new_global, make_ctx(engine, "server"))
        decoded = sites[0].receive(next_task)
        state = ReferenceState.initial(g0, params)
        exact = weighted_mean_reference(state, [locals_[0], locals_[2]], [5, 5])
        bound = state.error_bound(params)
        for name in g0:
            assert np.all(np.abs(decoded[name] - exact[name]) <= bound[name] + np.spacing(np.float32(4))), name
        # the stranger cannot use the aggregate and says why (not "noise budget exhausted")
        with pytest.raises(HEContributionError, match="another provisioning run"):
            stranger.receive(next_task)
    finally:
        stranger.codec.handle_event(EventType.END_RUN, stranger.ctx)


def test_contribution_without_key_id_is_rejected(setup, caplog):
    _, aggregator, generator, engine, sites = setup
    rng = np.random.default_rng(6)
    _, global_model, received = _prime(setup, rng)
    result = sites[0].send(local_update(received[0], rng), 5, 0)
    dxo = from_shareable(result)
    del dxo.meta[HEMetaKey.KEY_ID]
    result = dxo.update_shareable(result)
    ctx = make_ctx(engine, "server", **{AppConstants.GLOBAL_MODEL: global_model, AppConstants.CURRENT_ROUND: 0})
    with caplog.at_level(logging.ERROR):
        assert not aggregator.accept(result, ctx)
    assert any("carries no HE key id" in r.getMessage() for r in caplog.records)


def test_server_needs_its_key_id_file(tmp_path):
    _, server_path = save_contexts(tmp_path / "site", tmp_path / "server")
    (server_path.parent / KEY_ID_FILE).unlink()
    agg = HEAggregator(context_file=str(server_path))
    with pytest.raises(HEKeyError, match="he_key_id.txt not found"):
        agg.handle_event(EventType.START_RUN, make_ctx(FakeEngine(), "server"))


def test_stale_round_and_version_are_rejected(setup, caplog):
    _, aggregator, generator, engine, sites = setup
    rng = np.random.default_rng(3)
    _, global_model, received = _prime(setup, rng)
    late = sites[0].send(local_update(received[0], rng), 5, round_num=7)
    ctx = make_ctx(engine, "server", **{AppConstants.GLOBAL_MODEL: global_model, AppConstants.CURRENT_ROUND: 0})
    with caplog.at_level(logging.ERROR):
        assert not aggregator.accept(late, ctx)
    assert any("round 7" in r.getMessage() for r in caplog.records)
    # No accepted contribution: the global model stays as it was.
    aggr = aggregator.aggregate(ctx)
    assert generator.shareable_to_learnable(aggr, ctx) is global_model


def test_server_refuses_a_secret_context(tmp_path):
    client_path, _ = save_contexts(tmp_path, tmp_path)
    agg = HEAggregator(context_file=str(client_path))
    with pytest.raises(HEKeyError, match="secret key"):
        agg.handle_event(EventType.START_RUN, make_ctx(FakeEngine(), "server"))


def test_package_round_trip_and_persistor_inventory(tmp_path):
    meta = {MetaKey.PROCESSED_ALGORITHM: "x", HEMetaKey.VERSION: 3, HEMetaKey.LAYOUT: [["a", [2], "float32"]]}
    path = write_package(tmp_path / "m.he", meta, [b"abc", b"", b"\x00" * 10])
    assert read_package(path) == (meta, [b"abc", b"", b"\x00" * 10])
    persistor = HEModelPersistor(model=None)
    assert persistor.he_model_file_name == "FL_global_model.he"
    assert SERVER_CONTEXT_FILE == "server_context.tenseal"
