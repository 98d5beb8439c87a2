"""HE overhead: this project's packed BFV codec vs NVFlare's stock CKKS HE vs plaintext FedAvg.

Every method runs its real NVFlare code path on the same model weights and the same three
simulated site updates, from the site's plaintext weights to bytes on the wire and back:

* ``plaintext``: DXO of fp32 numpy arrays -> FOBS bytes -> ``InTimeAccumulateWeightedAggregator``.
* ``nvflare_stock``: ``HEModelEncryptor`` (CKKS N=8192, coeff [60, 40, 40], scale 2^40, the
  ``HEBuilder`` defaults) -> FOBS bytes (with NVFlare's ``CKKSVectorDecomposer``) ->
  ``HEInTimeAccumulateWeightedAggregator`` -> ``HEModelDecryptor``. Streamed one tensor at a time
  (same operations, bounded memory: a whole DenseNet121 message is about 1 GiB per site).
* ``codec``: ``HESiteCodec`` encode -> FOBS bytes -> ``HEAggregator`` -> ``HESiteCodec`` decode,
  with 1 and 2 worker processes.

Measured per model: bytes/param on the wire (upload = one site's update, download = the
aggregate; ``bytes_per_param`` is their mean: one model each way per site and round), encrypt and
decrypt throughput (plaintext weights <-> wire bytes, serialization included), server aggregation
time for 3 sites (wire bytes in -> wire bytes out), the error against exact FedAvg, and peak RSS of
the measuring process (each measurement runs in a fresh process).

Models: ``small_cnn`` = ``monai.networks.nets.Classifier(in_shape=(1, 28, 28), classes=2,
channels=(16, 32, 64), strides=(2, 2, 2))`` (97 k params) and ``densenet121`` =
``monai.networks.nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)`` (7.0 M params).

Usage::

    python benchmarks/he_overhead.py            # both models -> benchmarks/results/he_overhead.json
    python benchmarks/he_overhead.py --quick    # small CNN only, one repetition -> he_overhead_quick.json

The simulator figures (3-site DenseNet121 round time and peak RSS) are filled in by the job
benchmarks: :func:`merge_section` adds a section to the same JSON without re-running this.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

RESULTS_FILE = Path(__file__).resolve().parent / "results" / "he_overhead.json"
SITE_STEPS = (10, 20, 30)  # NUM_STEPS_CURRENT_ROUND of the three sites = their FedAvg weights
DELTA_SCALE = 1e-3  # std of the simulated local-training change of every float parameter
MODELS = ("small_cnn", "densenet121")
# Measured on request (--models, or benchmarks/fl_hippocampus.py): the segmentation config's network.
EXTRA_MODELS = ("hippocampus_unet",)
SEG_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "hippocampus_seg.yaml"
TARGETS = {"bytes_per_param_max": 8.0, "encrypt_mparams_per_s_min": 10.0}
STOCK_CKKS = {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40], "scale_bits": 40}


# ---- inputs ---------------------------------------------------------------------------------
def model_weights(name: str) -> dict[str, np.ndarray]:
    """Initial weights of a benchmark model as numpy arrays (seeded)."""
    import torch
    from monai.networks.nets import Classifier, DenseNet121

    torch.manual_seed(0)
    if name == "small_cnn":
        net = Classifier(in_shape=(1, 28, 28), classes=2, channels=(16, 32, 64), strides=(2, 2, 2))
    elif name == "densenet121":
        net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
    elif name == "hippocampus_unet":
        from monai_fl.config import ExperimentConfig
        from monai_fl.experiment import model_for_config

        net = model_for_config(ExperimentConfig.load(SEG_CONFIG))
    else:
        raise ValueError(f"unknown model {name}")
    return {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}


def site_updates(weights: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Three sites' locally trained weights: small Gaussian changes, counters advanced by the steps."""
    rng = np.random.default_rng(1)
    out = []
    for steps in SITE_STEPS:
        local = {}
        for k, v in weights.items():
            if np.issubdtype(v.dtype, np.integer):
                local[k] = v + steps
            else:
                local[k] = (v + rng.normal(scale=DELTA_SCALE, size=v.shape)).astype(v.dtype)
        out.append(local)
    return out


def exact_fedavg(updates, weights=SITE_STEPS) -> dict[str, np.ndarray]:
    total = float(sum(weights))
    return {k: sum(w * u[k].astype(np.float64) for u, w in zip(updates, weights)) / total for k in updates[0]}


def max_error(got: dict, exact: dict, integer: bool = False) -> float:
    """Largest |got - exact| over the float tensors (or, with ``integer``, the integer ones)."""
    errs = [float(np.max(np.abs(np.asarray(got[k], np.float64) - exact[k]))) for k in exact
            if np.issubdtype(np.asarray(got[k]).dtype, np.integer) == integer]
    return max(errs, default=0.0)


def _over_bound(got: dict, exact: dict, bound: dict) -> float:
    """Largest error / (codec bound + float32 half-ulp slack) over all tensors; <= 1 holds the bound."""
    return max(float(np.max(np.abs(np.asarray(got[k], np.float64) - exact[k]))) /
               (bound[k] + float(np.max(np.spacing(np.abs(exact[k]).astype(np.float32))))) for k in exact)


def peak_rss_mib() -> dict:
    return {"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


# ---- fake NVFlare runtime pieces (components are driven directly) -----------------------------
class _Engine:
    def __init__(self, components=None):
        self.components = components or {}

    def get_component(self, cid):
        return self.components.get(cid)

    def fire_event(self, event_type, fl_ctx):
        pass


def _ctx(engine, identity, **props):
    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.apis.fl_context import FLContext

    ctx = FLContext()
    ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=False)
    ctx.set_prop(ReservedKey.IDENTITY_NAME, identity, private=False, sticky=False)
    for k, v in props.items():
        ctx.set_prop(k, v, private=True, sticky=False)
    return ctx


def _as_result(shareable, site: str, round_num: int = 0):
    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.app_common.app_constant import AppConstants

    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, round_num)
    return shareable


def _register_decomposers():
    from nvflare.app_common.decomposers import common_decomposers
    from nvflare.app_opt.he import decomposers

    common_decomposers.register()
    decomposers.register()


# ---- the three methods ----------------------------------------------------------------------------
def measure_plaintext(model: str, reps: int = 1) -> dict:
    """fp32 DXO through FOBS and NVFlare's InTimeAccumulateWeightedAggregator."""
    from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
    from nvflare.apis.event_type import EventType
    from nvflare.apis.shareable import Shareable
    from nvflare.app_common.aggregators.intime_accumulate_model_aggregator import InTimeAccumulateWeightedAggregator
    from nvflare.app_common.app_constant import AppConstants

    _register_decomposers()
    g0 = model_weights(model)
    updates = site_updates(g0)
    n = sum(v.size for v in g0.values())
    enc_t, dec_t, agg_t = [], [], []
    for _ in range(reps + 1):  # the first pass warms up; min() over passes is reported
        t0 = time.perf_counter()
        wires = [DXO(DataKind.WEIGHTS, u, {MetaKey.NUM_STEPS_CURRENT_ROUND: s}).to_shareable().to_bytes()
                 for u, s in zip(updates, SITE_STEPS)]
        enc_t.append((time.perf_counter() - t0) / len(updates))
        agg = InTimeAccumulateWeightedAggregator(expected_data_kind=DataKind.WEIGHTS)
        ctx = _ctx(_Engine(), "server", **{AppConstants.CURRENT_ROUND: 0})
        agg.handle_event(EventType.START_RUN, ctx)
        t0 = time.perf_counter()
        for i, w in enumerate(wires):
            assert agg.accept(_as_result(Shareable.from_bytes(w), f"site-{i + 1}"), ctx)
        down = agg.aggregate(ctx).to_bytes()
        agg_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = from_shareable(Shareable.from_bytes(down)).data
        dec_t.append(time.perf_counter() - t0)
    up = len(wires[0])
    return {
        "num_params": n, "upload_bytes_per_param": up / n, "download_bytes_per_param": len(down) / n,
        "bytes_per_param": (up + len(down)) / 2 / n,
        "serialize_mparams_per_s": n / min(enc_t) / 1e6, "deserialize_mparams_per_s": n / min(dec_t) / 1e6,
        "encrypt_mparams_per_s": None, "decrypt_mparams_per_s": None,
        "server_aggregation_s": min(agg_t), "max_abs_error": max_error(result, exact_fedavg(updates)),
        "peak_rss_mib": peak_rss_mib(),
    }


def _stock_context():
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=STOCK_CKKS["poly_modulus_degree"],
                     coeff_mod_bit_sizes=STOCK_CKKS["coeff_mod_bit_sizes"],
                     encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    ctx.generate_relin_keys()  # as HEBuilder does
    ctx.global_scale = 2 ** STOCK_CKKS["scale_bits"]
    # The site's context as loaded from client_context.tenseal (HEBuilder's serialization).
    return ts.context_from(ctx.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False,
                                         save_relin_keys=True))


def measure_stock(model: str, threads: int = 1) -> dict:
    """NVFlare's HE classes, one tensor at a time (every op of a round, bounded memory)."""
    from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
    from nvflare.apis.event_type import EventType
    from nvflare.apis.shareable import Shareable
    from nvflare.app_common.app_constant import AppConstants
    from nvflare.app_opt.he.intime_accumulate_model_aggregator import HEInTimeAccumulateWeightedAggregator
    from nvflare.app_opt.he.model_decryptor import HEModelDecryptor
    from nvflare.app_opt.he.model_encryptor import HEModelEncryptor

    _register_decomposers()
    ts_ctx = _stock_context()
    g0 = model_weights(model)
    updates = site_updates(g0)
    exact = exact_fedavg(updates)
    n = sum(v.size for v in g0.values())
    site_ctx = _ctx(_Engine(), "site-1")
    server_ctx = _ctx(_Engine(), "server", **{AppConstants.CURRENT_ROUND: 0})

    def encryptor(steps):
        enc = HEModelEncryptor(weigh_by_local_iter=True)
        enc.tenseal_context, enc.encrypt_layers, enc.n_iter = ts_ctx, [True], steps
        return enc

    encs = [encryptor(s) for s in SITE_STEPS]
    dec = HEModelDecryptor()
    dec.tenseal_context = ts_ctx
    agg = HEInTimeAccumulateWeightedAggregator(expected_data_kind=DataKind.WEIGHTS, weigh_by_local_iter=False)
    agg.handle_event(EventType.START_RUN, server_ctx)
    totals = {"enc": 0.0, "agg": 0.0, "dec": 0.0, "up": 0, "down": 0, "enc_cpu": 0.0, "dec_cpu": 0.0}
    err = 0.0

    def encrypt_one(args):  # plaintext tensor of one site -> wire bytes
        site, name = args
        dxo = DXO(DataKind.WEIGHTS, {name: updates[site][name].copy()}, {MetaKey.NUM_STEPS_CURRENT_ROUND: SITE_STEPS[site]})
        return encs[site]._process(dxo, site_ctx).to_shareable().to_bytes()

    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    names = list(g0)
    for name in names:
        t0, c0 = time.perf_counter(), time.process_time()
        jobs = [(i, name) for i in range(len(SITE_STEPS))]
        wires = list(pool.map(encrypt_one, jobs)) if pool else [encrypt_one(j) for j in jobs]
        totals["enc"] += (time.perf_counter() - t0) / len(SITE_STEPS)
        totals["enc_cpu"] += (time.process_time() - c0) / len(SITE_STEPS)
        totals["up"] += len(wires[0])
        t0 = time.perf_counter()
        for i, w in enumerate(wires):
            assert agg.accept(_as_result(Shareable.from_bytes(w), f"site-{i + 1}"), server_ctx)
        down = agg.aggregate(server_ctx).to_bytes()
        agg.reset(server_ctx)
        totals["agg"] += time.perf_counter() - t0
        totals["down"] += len(down)
        t0, c0 = time.perf_counter(), time.process_time()
        dxo = from_shareable(Shareable.from_bytes(down))
        out = dec.decryption(dxo.data, dxo.get_meta_prop(MetaKey.PROCESSED_KEYS), site_ctx)
        totals["dec"] += time.perf_counter() - t0
        totals["dec_cpu"] += time.process_time() - c0
        if not np.issubdtype(g0[name].dtype, np.integer):
            got = np.asarray(out[name], np.float64).reshape(-1)
            err = max(err, float(np.max(np.abs(got - exact[name].reshape(-1)))))
    if pool:
        pool.shutdown()
    return {
        "num_params": n, "threads": threads,
        "upload_bytes_per_param": totals["up"] / n, "download_bytes_per_param": totals["down"] / n,
        "bytes_per_param": (totals["up"] + totals["down"]) / 2 / n,
        "encrypt_mparams_per_s": n / totals["enc"] / 1e6, "decrypt_mparams_per_s": n / totals["dec"] / 1e6,
        "encrypt_mparams_per_cpu_s": n / totals["enc_cpu"] / 1e6 if threads == 1 else None,
        "decrypt_mparams_per_cpu_s": n / totals["dec_cpu"] / 1e6 if threads == 1 else None,
        "server_aggregation_s": totals["agg"], "max_abs_error": err, "peak_rss_mib": peak_rss_mib(),
        "note": "streamed per tensor; a real round buffers whole messages (upload_bytes_per_param * params per site)",
    }


def measure_codec(model: str, workers: int = 1, reps: int = 1, codec: dict | None = None) -> dict:
    """This project's components: HESiteCodec -> FOBS bytes -> HEAggregator -> HESiteCodec.

    ``codec``: overrides of the codec's defaults, as a config's ``fl.he_codec``."""
    import tempfile

    from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
    from nvflare.apis.event_type import EventType
    from nvflare.apis.shareable import Shareable
    from nvflare.app_common.abstract.model import make_model_learnable
    from nvflare.app_common.app_constant import AppConstants

    from monai_fl.he.codec import CodecParams
    from monai_fl.he.keys import save_contexts
    from monai_fl.he.nvflare_components import (
        SITE_CODEC_ID,
        HEAggregator,
        HEShareableGenerator,
        HESiteCodec,
    )

    _register_decomposers()
    params = CodecParams.from_dict(codec or {})
    g0 = model_weights(model)
    updates = site_updates(g0)
    exact = exact_fedavg(updates)
    n = sum(v.size for v in g0.values())
    with tempfile.TemporaryDirectory() as tmp:
        client_file, server_file = save_contexts(tmp, tmp, params)
        site = HESiteCodec(params=params.to_dict(), context_file=str(client_file), workers=workers,
                           max_sites=len(SITE_STEPS))
        site_ctx = _ctx(_Engine({SITE_CODEC_ID: site}), "site-1")
        site.handle_event(EventType.START_RUN, site_ctx)
        aggregator = HEAggregator(params=params.to_dict(), context_file=str(server_file))
        server_ctx0 = _ctx(_Engine(), "server")
        aggregator.handle_event(EventType.START_RUN, server_ctx0)
        generator = HEShareableGenerator(params=params.to_dict())
        global_model = make_model_learnable(g0, {})
        # Round 0: the plaintext initial model reaches the site (becomes its reference).
        task = generator.learnable_to_shareable(global_model, server_ctx0)
        site.decode(from_shareable(Shareable.from_bytes(task.to_bytes())), site_ctx)
        reference = site.state
        # Untimed first pass: starts worker processes and warms lazy imports and allocators.
        site.cipher.encrypt_blocks([np.zeros(params.poly_modulus_degree, np.uint64)] * (2 * workers))
        enc_t, dec_t, agg_t, enc_cpu, dec_cpu = [], [], [], [], []
        for rep in range(reps + 1):
            site.state = reference
            t0, c0 = time.perf_counter(), time.process_time()
            wires = []
            for u, s in zip(updates, SITE_STEPS):
                dxo = site.encode(DXO(DataKind.WEIGHTS, u, {MetaKey.NUM_STEPS_CURRENT_ROUND: s}), site_ctx, True)
                wires.append(dxo.to_shareable().to_bytes())
            enc_t.append((time.perf_counter() - t0) / len(updates) if rep else float("inf"))
            enc_cpu.append((time.process_time() - c0) / len(updates) if rep else float("inf"))
            ctx = _ctx(_Engine(), "server", **{AppConstants.GLOBAL_MODEL: global_model, AppConstants.CURRENT_ROUND: 0})
            t0 = time.perf_counter()
            for i, w in enumerate(wires):
                assert aggregator.accept(_as_result(Shareable.from_bytes(w), f"site-{i + 1}"), ctx)
            down = aggregator.aggregate(ctx).to_bytes()
            agg_t.append(time.perf_counter() - t0 if rep else float("inf"))
            aggregator.reset(ctx)
            new_global = generator.shareable_to_learnable(Shareable.from_bytes(down), ctx)
            task = generator.learnable_to_shareable(new_global, ctx).to_bytes()
            t0, c0 = time.perf_counter(), time.process_time()
            result = site.decode(from_shareable(Shareable.from_bytes(task)), site_ctx).data
            dec_t.append(time.perf_counter() - t0 if rep else float("inf"))
            dec_cpu.append(time.process_time() - c0 if rep else float("inf"))
        ratio = _over_bound(result, exact, reference.error_bound(params))
        # Round 1: ranges learnt from round 0's encrypted statistics (the steady state).
        state1 = site.state
        updates1 = site_updates(state1.weights)
        exact1 = exact_fedavg(updates1)
        ctx = _ctx(_Engine(), "server", **{AppConstants.GLOBAL_MODEL: new_global, AppConstants.CURRENT_ROUND: 1})
        for i, (u, st) in enumerate(zip(updates1, SITE_STEPS)):
            dxo = site.encode(DXO(DataKind.WEIGHTS, u, {MetaKey.NUM_STEPS_CURRENT_ROUND: st}), site_ctx, True)
            assert aggregator.accept(_as_result(Shareable.from_bytes(dxo.to_shareable().to_bytes()), f"site-{i + 1}", 1), ctx)
        global2 = generator.shareable_to_learnable(aggregator.aggregate(ctx), ctx)
        result1 = site.decode(from_shareable(generator.learnable_to_shareable(global2, ctx)), site_ctx).data
        ratio1 = _over_bound(result1, exact1, state1.error_bound(params))
        site.handle_event(EventType.END_RUN, site_ctx)
    up = len(wires[0])
    return {
        "num_params": n, "workers": workers,
        "upload_bytes_per_param": up / n, "download_bytes_per_param": len(task) / n,
        "bytes_per_param": (up + len(task)) / 2 / n,
        "encrypt_mparams_per_s": n / min(enc_t) / 1e6, "decrypt_mparams_per_s": n / min(dec_t) / 1e6,
        # CPU time of this process: all the work when workers == 1 (robust to other jobs on the machine)
        "encrypt_mparams_per_cpu_s": n / min(enc_cpu) / 1e6 if workers == 1 else None,
        "decrypt_mparams_per_cpu_s": n / min(dec_cpu) / 1e6 if workers == 1 else None,
        "server_aggregation_s": min(agg_t), "max_abs_error": max_error(result, exact),
        "max_abs_error_integer_tensors": max_error(result, exact, integer=True),
        "error_over_bound": ratio,
        "max_abs_error_round1": max_error(result1, exact1), "error_over_bound_round1": ratio1,
        "update_std": DELTA_SCALE, "peak_rss_mib": peak_rss_mib(),
    }


def measure_thread_scaling(seconds: float = 1.0) -> dict:
    """Does SEAL (via tenseal.sealapi) release the GIL? Encrypt blocks in 1 vs 2 Python threads."""
    from monai_fl.he.codec import CodecParams
    from monai_fl.he.keys import generate_contexts, load_context, secret_cipher

    params = CodecParams()
    cipher = secret_cipher(load_context(generate_contexts(params).client), params)
    block = np.arange(params.poly_modulus_degree, dtype=np.uint64)

    def spin(_):
        done, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            cipher.encrypt_slots(block)
            done += 1
        return done

    rates = {}
    for threads in (1, 2):
        with ThreadPoolExecutor(threads) as pool:
            rates[threads] = sum(pool.map(spin, range(threads))) / seconds
    cipher.close()
    return {"ciphertexts_per_s_1_thread": rates[1], "ciphertexts_per_s_2_threads": rates[2],
            "speedup": rates[2] / rates[1]}


# ---- orchestration --------------------------------------------------------------------------------
def isolated(fn, *args, **kwargs) -> dict:
    """Run one measurement in a fresh process so its peak RSS is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def headline(per_model: dict, model: str, key_fn) -> dict:
    m = per_model[model]
    best = key_fn(m)
    return {"model": model, "bytes_per_param": best["bytes_per_param"],
            "encrypt_mparams_per_s": best["encrypt_mparams_per_s"], "decrypt_mparams_per_s": best["decrypt_mparams_per_s"],
            "server_aggregation_s": best["server_aggregation_s"]}


def run(models=MODELS, reps: int = 2, log=print) -> dict:
    """All measurements; returns the JSON payload."""
    load_before = os.getloadavg()
    out = {"plaintext": {"models": {}}, "nvflare_stock": {"models": {}, "ckks": STOCK_CKKS},
           "codec": {"models": {}}}
    from monai_fl.he.codec import CodecParams

    p = CodecParams()
    out["codec"]["params"] = {**p.to_dict(), "codec_id": p.codec_id, "fields_per_slot": p.fields_per_slot,
                              "max_total_weight": p.max_total_weight, "security_bits": 128}
    for model in models:
        log(f"[{model}] plaintext")
        out["plaintext"]["models"][model] = isolated(measure_plaintext, model, reps)
        log(f"[{model}] codec, 1 and 2 workers")
        out["codec"]["models"][model] = {str(w): isolated(measure_codec, model, w, reps) for w in (1, 2)}
        log(f"[{model}] NVFlare stock HE, 1 and 2 threads")
        out["nvflare_stock"]["models"][model] = {str(t): isolated(measure_stock, model, t) for t in (1, 2)}
    log("GIL check")
    out["codec"]["thread_scaling"] = isolated(measure_thread_scaling)
    main_model = models[-1]
    fastest = lambda runs: max(runs.values(), key=lambda r: r["encrypt_mparams_per_s"])
    out["codec"].update(headline(out["codec"]["models"], main_model, fastest))
    out["nvflare_stock"].update(headline(out["nvflare_stock"]["models"], main_model, fastest))
    plain = out["plaintext"]["models"][main_model]
    out["plaintext"].update({"model": main_model, "bytes_per_param": plain["bytes_per_param"],
                             "encrypt_mparams_per_s": None, "decrypt_mparams_per_s": None,
                             "server_aggregation_s": plain["server_aggregation_s"]})
    codec = out["codec"]
    out["targets"] = {
        **TARGETS,
        "bytes_per_param_met": codec["bytes_per_param"] <= TARGETS["bytes_per_param_max"]
        and max(r["download_bytes_per_param"] for r in codec["models"][main_model].values()) <= TARGETS["bytes_per_param_max"],
        "encrypt_mparams_per_s_met": codec["encrypt_mparams_per_s"] >= TARGETS["encrypt_mparams_per_s_min"],
        "simulator": "see the 'simulator' section (3-site DenseNet121 peak RSS <= 6 GiB, round-time overhead <= 20 %)",
    }
    out["conditions"] = {"load_average_before": load_before, "load_average_after": os.getloadavg(),
                         "site_steps": SITE_STEPS, "delta_scale": DELTA_SCALE,
                         "note": "2-core machine shared with other jobs: throughput is a lower bound"}
    return out


def merge_section(name: str, section: dict, path: Path = RESULTS_FILE) -> Path:
    """Add or replace one top-level section (e.g. "simulator") of the results JSON."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small CNN only, one repetition")
    ap.add_argument("--models", nargs="+", choices=MODELS + EXTRA_MODELS, default=None)
    ap.add_argument("--out", type=Path, default=None, help="default: results/he_overhead.json "
                    "(--quick: results/he_overhead_quick.json, so a smoke run never replaces the full results)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = RESULTS_FILE.with_name("he_overhead_quick.json") if args.quick else RESULTS_FILE
    models = ("small_cnn",) if args.quick else tuple(args.models or MODELS)
    payload = run(models, reps=1 if args.quick else 2, log=lambda m: print(m, file=sys.stderr, flush=True))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import machine

    payload["machine"] = machine()
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    for key, value in previous.items():  # keep what the job benchmarks added (he_simulator.py)
        payload.setdefault(key, value)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
