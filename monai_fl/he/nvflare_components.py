"""NVFlare 2.9 components that run FedAvg through the packed BFV codec, and ``attach_he``.

Sites (clients):
    * :class:`HESiteCodec` (component ``he_site_codec``): the site's secret context, its cipher and
      the shared reference model (:class:`~monai_fl.he.codec.ReferenceState`) between tasks.
    * :class:`HEDecryptFilter` (task data of ``train``/``validate``): the first round's plaintext
      model passes through and becomes the reference; an encrypted aggregate is decoded into the
      next global model (plain ``WEIGHTS``) before the training script sees it.
    * :class:`HEEncryptFilter` (task result of ``train``, weighted; ``submit_model``, weight 1):
      refuses NaN/Inf and wrong shapes with a clear log line, else replaces the weights by
      ciphertexts of the weighted, quantised delta.

Server:
    * :class:`HEAggregator` (id ``aggregator``): validates each contribution (algorithm, codec
      id, key id, base version, layout, weight budget, ciphertext count and well-formedness) and
      only adds ciphertexts; a rejected contribution is logged and excluded, the round goes on.
    * :class:`HEShareableGenerator` (id ``shareable_generator``): turns the aggregate into the new
      encrypted global model and back into task data, never decrypting.
    * :class:`HEModelPersistor`: a ``PTFileModelPersistor`` that saves the encrypted model as a
      package file (``FL_global_model.he``) and serves it to ``PTFileModelLocator`` /
      ``GlobalModelEval``, so the final model reaches the sites through the decrypt filter.

The server loads ``server_context.tenseal`` only to check it matches the codec and holds no secret
key; it refuses to start with a private one. It reads the key id of its provisioning run from
``he_key_id.txt`` beside that file; every site stamps the id derived from its own secret key on its
contributions, and one from another key generation is rejected (its ciphertexts would add up to
noise that no site can decrypt).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.shareable_generator import ShareableGenerator
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.model_desc import ModelDescriptor
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.fuel.sec.security_content_service import LoadResult, SecurityContentService

from monai_fl.he.backend import CiphertextAdder
from monai_fl.he.codec import CodecParams, Layout, ReferenceState, decode_aggregate, encode_update
from monai_fl.he.errors import HEContributionError, HEError, HEKeyError
from monai_fl.he.keys import (
    CLIENT_CONTEXT_FILE,
    SERVER_CONTEXT_FILE,
    key_id,
    key_id_file_for,
    load_context,
    parse_key_id,
    read_key_id,
    require_server_context,
    secret_cipher,
)
from monai_fl.he.package import read_package, write_package

HE_ALGORITHM = "monai_fl.bfv_packed_v1"  # value of MetaKey.PROCESSED_ALGORITHM on encrypted DXOs
CIPHERTEXTS_KEY = "he_ciphertexts"  # the only key of an encrypted DXO's data: list[bytes]
SITE_CODEC_ID = "he_site_codec"
HE_MODEL_FILE = "FL_global_model.he"
HE_MODEL_FORMAT = "monai_fl.he.package"
TRAIN_TASK, VALIDATE_TASK, SUBMIT_MODEL_TASK = "train", "validate", "submit_model"


class HEMetaKey:
    """DXO / model meta keys of the HE protocol (plaintext, visible to the server)."""

    CODEC_ID = "he_codec_id"
    KEY_ID = "he_key_id"  # key generation (provisioning run) the ciphertexts were made under
    VERSION = "he_version"  # version of the model a DXO carries (0 = initial plaintext model)
    BASE_VERSION = "he_base_version"  # version the encrypted deltas were computed against
    LAYOUT = "he_layout"  # [[name, shape, dtype], ...]: public model architecture
    LAYOUT_HASH = "he_layout_hash"
    WEIGHT = "he_weight"  # a contribution's integer FedAvg weight
    NUM_CIPHERTEXTS = "he_num_ciphertexts"
    NUM_CONTRIBUTIONS = "he_num_contributions"
    TOTAL_WEIGHT = "he_total_weight"
    CONTRIBUTORS = "he_contributors"


_HE_META_KEYS = {v for k, v in vars(HEMetaKey).items() if not k.startswith("_")} | {MetaKey.PROCESSED_ALGORITHM}


class WeightMode:
    """How a site's FedAvg weight is chosen."""

    STEPS = "steps"  # NUM_STEPS_CURRENT_ROUND / weight_unit, rounded (NVFlare's FedAvg weighting)
    UNIFORM = "uniform"  # every site weighs 1


def is_encrypted(meta: Mapping | None) -> bool:
    """True if DXO/model meta marks the payload as this codec's ciphertexts."""
    return bool(meta) and meta.get(MetaKey.PROCESSED_ALGORITHM) == HE_ALGORITHM


def model_info(model: ModelLearnable) -> tuple[int, Layout]:
    """(version, layout) of a server-side global model, plaintext (version 0) or encrypted."""
    meta = model.get(ModelLearnableKey.META) or {}
    if is_encrypted(meta):
        return int(meta[HEMetaKey.VERSION]), Layout.from_list(meta[HEMetaKey.LAYOUT])
    weights = {k: np.asarray(v) for k, v in (model.get(ModelLearnableKey.WEIGHTS) or {}).items()}
    return 0, Layout.from_arrays(weights)


def _to_numpy(value: Any) -> np.ndarray:
    """numpy view of a numpy array or torch tensor (torch is not imported here)."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(value)


def _load_tenseal_context(component: FLComponent, context_file: str, fl_ctx: FLContext):
    """A context from the participant's startup folder (signed in secure mode) or an absolute path."""
    if os.path.isabs(context_file):
        if fl_ctx.get_prop(FLContextKey.SECURE_MODE, False):
            component.log_warning(fl_ctx, f"HE: loading {context_file} from an absolute path: it is not signature-checked")
        return load_context(context_file)
    from nvflare.app_opt.he.homomorphic_encrypt import load_tenseal_context_from_workspace

    try:
        return load_tenseal_context_from_workspace(context_file, fl_ctx)
    except Exception as e:  # NVFlare raises ValueError("Cannot load tenseal_context ...: NO_SUCH_CONTENT")
        raise HEKeyError(f"cannot load {context_file} from this participant's startup kit: {e}") from e


def _load_key_id(context_file: str, fl_ctx: FLContext) -> str:
    """The server's key id: ``he_key_id.txt`` beside its context (signature-checked in secure mode,
    like the context itself)."""
    id_file = key_id_file_for(context_file)
    if os.path.isabs(id_file):
        return read_key_id(id_file)
    data, rc = SecurityContentService.load_content(id_file)
    bad = [LoadResult.INVALID_CONTENT, LoadResult.NO_SUCH_CONTENT]
    if fl_ctx.get_prop(FLContextKey.SECURE_MODE, True):
        bad += [LoadResult.INVALID_SIGNATURE, LoadResult.NOT_SIGNED]
    if rc in bad or data is None:
        raise HEKeyError(f"cannot load {id_file} from the server's startup kit ({rc}): provision the kits again "
                         "with this monai-fl version (the HE builder writes it)")
    return parse_key_id(data, id_file)


# ---------------------------------------------------------------------------------------------
# Site side
# ---------------------------------------------------------------------------------------------
class HESiteCodec(FLComponent):
    def __init__(
        self,
        params: dict | None = None,
        context_file: str = CLIENT_CONTEXT_FILE,
        weight_mode: str = WeightMode.STEPS,
        weight_unit: float = 1.0,
        max_sites: int = 8,
        workers: int = 1,
    ):
        """A site's key, cipher and reference model, shared by its encrypt and decrypt filters.

        Args:
            params: ``CodecParams.to_dict()`` (defaults if None); must equal the server's.
            context_file: secret TenSEAL context: a name in the startup kit (signed, default) or an
                absolute path (simulator with keys kept outside the server's workspace).
            weight_mode: ``"steps"`` (weight = round(NUM_STEPS_CURRENT_ROUND / weight_unit)) or
                ``"uniform"``.
            weight_unit: local steps per unit of integer weight.
            max_sites: sites expected per round; a site's weight is capped at
                ``max_total_weight // max_sites`` so the sum always fits the packed fields.
            workers: encryption/decryption processes (1 = in the client process).
        """
        super().__init__()
        self.params = params
        self.context_file = context_file
        self.weight_mode = weight_mode
        self.weight_unit = weight_unit
        self.max_sites = max_sites
        self.workers = workers
        self.codec = CodecParams.from_dict(params)
        if weight_mode not in (WeightMode.STEPS, WeightMode.UNIFORM):
            raise HEError(f"weight_mode must be 'steps' or 'uniform', got {weight_mode!r}")
        if not weight_unit > 0 or max_sites < 1:
            raise HEError("weight_unit must be > 0 and max_sites >= 1")
        self.max_site_weight = self.codec.max_total_weight // max_sites
        if self.max_site_weight < 1:
            raise HEError(f"max_sites={max_sites} exceeds the weight budget {self.codec.max_total_weight}")
        self.cipher = None
        self.key_id: str | None = None  # derived from the secret key when the cipher is made
        self.state: ReferenceState | None = None
        self.torch_output = False  # return decoded tensors as torch if the plaintext model came as torch
        self._lock = threading.Lock()

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self._ensure_cipher(fl_ctx)
        elif event_type == EventType.END_RUN and self.cipher is not None:
            self.cipher.close()
            self.cipher = None

    def _ensure_cipher(self, fl_ctx: FLContext):
        if self.cipher is None:
            ctx = _load_tenseal_context(self, self.context_file, fl_ctx)
            self.cipher = secret_cipher(ctx, self.codec, workers=self.workers)
            self.key_id = key_id(ctx)
            self.log_info(fl_ctx, f"HE: site codec ready (codec {self.codec.codec_id}, key id {self.key_id}, "
                                  f"{self.workers} worker(s))")
        return self.cipher

    def site_weight(self, meta: Mapping, fl_ctx: FLContext) -> int:
        """The integer FedAvg weight of this site's update."""
        if self.weight_mode == WeightMode.UNIFORM:
            return 1
        steps = meta.get(MetaKey.NUM_STEPS_CURRENT_ROUND)
        if steps is None:
            raise HEContributionError(
                "weight_mode 'steps' needs FLModel.meta['NUM_STEPS_CURRENT_ROUND'] from the training script")
        weight = round(float(steps) / self.weight_unit)
        capped = min(max(weight, 1), self.max_site_weight)
        if capped != weight:
            self.log_warning(fl_ctx, f"HE: weight {weight} ({steps} steps / unit {self.weight_unit}) capped to "
                                     f"{capped}; raise weight_unit to keep FedAvg proportions")
        return capped

    # -- called by the filters --------------------------------------------------------------
    def decode(self, dxo: DXO, fl_ctx: FLContext) -> DXO | None:
        with self._lock:
            cipher = self._ensure_cipher(fl_ctx)
            meta = dxo.meta or {}
            if not is_encrypted(meta):
                if meta.get(HEMetaKey.VERSION) == 0:
                    arrays = {k: _to_numpy(v) for k, v in dxo.data.items()}
                    self.torch_output = any(hasattr(v, "detach") for v in dxo.data.values())
                    self.state = ReferenceState.initial(arrays, self.codec)
                    self.log_info(fl_ctx, f"HE: initial global model received in plaintext "
                                          f"({self.state.layout.num_params} params); it is the reference of version 0")
                else:
                    self.log_warning(fl_ctx, "HE: task data is not encrypted and not the initial model; passed through")
                return None
            self._check_codec(meta)
            theirs = meta.get(HEMetaKey.KEY_ID)
            if theirs is not None and theirs != self.key_id:
                raise HEContributionError(
                    f"the global model was aggregated under HE key id {theirs}, this site holds key id {self.key_id}: "
                    "its kit is from another provisioning run than the server's; re-distribute the kits from one "
                    "provisioning run")
            base = int(meta[HEMetaKey.BASE_VERSION])
            if self.state is None:
                raise HEContributionError(
                    "this site holds no reference model (it missed the initial round or restarted): it cannot decode "
                    "the encrypted global model")
            if self.state.version == base + 1:
                self.log_info(fl_ctx, f"HE: global model version {base + 1} already decoded; reusing it")
            elif self.state.version != base:
                raise HEContributionError(
                    f"the aggregate applies to model version {base} but this site holds version {self.state.version}; "
                    "the site missed a round and cannot decode it")
            else:
                if meta.get(HEMetaKey.LAYOUT_HASH) != self.state.layout.layout_hash:
                    raise HEContributionError("aggregate layout differs from this site's reference model")
                start = time.perf_counter()
                self.state = decode_aggregate(
                    self.state, dxo.data[CIPHERTEXTS_KEY], params=self.codec, decryptor=cipher,
                    expected_count=meta.get(HEMetaKey.NUM_CONTRIBUTIONS), expected_weight=meta.get(HEMetaKey.TOTAL_WEIGHT))
                self.log_info(fl_ctx, f"HE: decoded global model version {self.state.version} from "
                                      f"{meta.get(HEMetaKey.NUM_CONTRIBUTIONS)} contribution(s) in "
                                      f"{time.perf_counter() - start:.2f} s")
            out_meta = {k: v for k, v in meta.items() if k not in _HE_META_KEYS}
            return DXO(DataKind.WEIGHTS, self._export(self.state.weights), out_meta)

    def encode(self, dxo: DXO, fl_ctx: FLContext, weighted: bool) -> DXO:
        with self._lock:
            cipher = self._ensure_cipher(fl_ctx)
            site = fl_ctx.get_identity_name()
            try:
                if self.state is None:
                    raise HEContributionError("no reference model: this site never received the global model")
                weight = self.site_weight(dxo.meta or {}, fl_ctx) if weighted else 1
                arrays = {k: _to_numpy(v) for k, v in dxo.data.items()}
                start = time.perf_counter()
                cts, report = encode_update(
                    self.state, arrays, is_delta=dxo.data_kind == DataKind.WEIGHT_DIFF, weight=weight,
                    params=self.codec, encryptor=cipher)
            except HEContributionError as e:
                self.log_error(fl_ctx, f"HE: site {site} refuses to send its update: {e}")
                raise
            size = sum(len(c) for c in cts)
            self.log_info(fl_ctx, f"HE: encrypted {report.num_params} params (weight {weight}, base version "
                                  f"{self.state.version}) into {len(cts)} ciphertexts, {size / 2**20:.1f} MiB, "
                                  f"{time.perf_counter() - start:.2f} s")
            if report.clipped:
                worst = sorted(report.clipped.items(), key=lambda kv: -kv[1])[:3]
                self.log_warning(fl_ctx, f"HE: {report.total_clipped} delta value(s) clipped to the shared range "
                                         f"(e.g. {worst}); ranges widen next round")
            meta = {k: v for k, v in (dxo.meta or {}).items() if k not in _HE_META_KEYS}
            meta.update({
                MetaKey.PROCESSED_ALGORITHM: HE_ALGORITHM,
                HEMetaKey.CODEC_ID: self.codec.codec_id,
                HEMetaKey.KEY_ID: self.key_id,
                HEMetaKey.BASE_VERSION: self.state.version,
                HEMetaKey.LAYOUT: self.state.layout.to_list(),
                HEMetaKey.LAYOUT_HASH: self.state.layout.layout_hash,
                HEMetaKey.WEIGHT: weight,
                HEMetaKey.NUM_CIPHERTEXTS: len(cts),
            })
            return DXO(DataKind.WEIGHT_DIFF, {CIPHERTEXTS_KEY: cts}, meta)

    def _check_codec(self, meta: Mapping) -> None:
        if meta.get(HEMetaKey.CODEC_ID) != self.codec.codec_id:
            raise HEContributionError(
                f"encrypted with codec {meta.get(HEMetaKey.CODEC_ID)}, this site uses {self.codec.codec_id}")

    def _export(self, weights: Mapping[str, np.ndarray]) -> dict:
        """Copies (the script must not alter the reference), as torch tensors if the model came so."""
        if self.torch_output:
            import torch

            return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in weights.items()}
        return {k: np.array(v, copy=True) for k, v in weights.items()}


def _site_codec(codec_id: str, fl_ctx: FLContext) -> HESiteCodec:
    codec = fl_ctx.get_engine().get_component(codec_id)
    if not isinstance(codec, HESiteCodec):
        raise HEError(f"component '{codec_id}' is not an HESiteCodec; attach_he adds it to every site")
    return codec


class HEDecryptFilter(DXOFilter):
    def __init__(self, codec_id: str = SITE_CODEC_ID):
        """Task-data filter: decodes the encrypted global model; the initial plaintext model passes.

        Args:
            codec_id: component id of the site's :class:`HESiteCodec`.
        """
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF], data_kinds_to_filter=None)
        self.codec_id = codec_id

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        return _site_codec(self.codec_id, fl_ctx).decode(dxo, fl_ctx)


class HEEncryptFilter(DXOFilter):
    def __init__(self, codec_id: str = SITE_CODEC_ID, weighted: bool = True):
        """Task-result filter: replaces weights or deltas by ciphertexts of the quantised delta.

        Args:
            codec_id: component id of the site's :class:`HESiteCodec`.
            weighted: multiply by the site's FedAvg weight (``train``); False for ``submit_model``.
        """
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF], data_kinds_to_filter=None)
        self.codec_id = codec_id
        self.weighted = weighted

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        return _site_codec(self.codec_id, fl_ctx).encode(dxo, fl_ctx, self.weighted)


# ---------------------------------------------------------------------------------------------
# Server side
# ---------------------------------------------------------------------------------------------
def _load_server_codec(component: FLComponent, params: CodecParams, context_file: str, fl_ctx: FLContext) -> str:
    """Check the server's context; returns the key id of its provisioning run."""
    ctx = _load_tenseal_context(component, context_file, fl_ctx)
    require_server_context(ctx, params)
    server_key_id = _load_key_id(context_file, fl_ctx)
    component.log_info(fl_ctx, f"HE: server context {context_file} holds no secret key; codec {params.codec_id}, "
                               f"key id {server_key_id}")
    return server_key_id


class HEAggregator(Aggregator):
    def __init__(self, params: dict | None = None, context_file: str = SERVER_CONTEXT_FILE):
        """Adds encrypted contributions; never decrypts (it has no key that could).

        Args:
            params: ``CodecParams.to_dict()`` (defaults if None); must equal the sites'.
            context_file: server TenSEAL context (parameters only) in the startup kit, or an
                absolute path.
        """
        super().__init__()
        self.params = params
        self.context_file = context_file
        self.codec = CodecParams.from_dict(params)
        self.adder: CiphertextAdder | None = None
        self.key_id: str | None = None  # the server kit's he_key_id.txt, read at START_RUN
        self._lock = threading.Lock()
        self._reset_round()

    def _reset_round(self):
        self._acc = None
        self._contributors: list[str] = []
        self._total_weight = 0
        self._base: tuple[int, Layout] | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self.key_id = _load_server_codec(self, self.codec, self.context_file, fl_ctx)
            self.adder = CiphertextAdder(self.codec)

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        client = shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default="?")
        rc = shareable.get_return_code()
        if rc and rc != ReturnCode.OK:
            self.log_warning(fl_ctx, f"HE: contribution from {client} returned rc={rc}; disregarded")
            return False
        with self._lock:
            try:
                self._accept(client, shareable, fl_ctx)
            except HEContributionError as e:
                self.log_error(fl_ctx, f"HE: REJECTED contribution from {client}: {e}")
                return False
        return True

    def _expected(self, fl_ctx: FLContext) -> tuple[int, Layout]:
        if self._base is None:
            model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            if not isinstance(model, ModelLearnable):
                raise HEContributionError("no global model in the FL context to validate against")
            self._base = model_info(model)
        return self._base

    def _accept(self, client: str, shareable: Shareable, fl_ctx: FLContext) -> None:
        contribution_round = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if contribution_round is not None and current_round is not None and contribution_round != current_round:
            raise HEContributionError(f"contribution is for round {contribution_round}, current round is {current_round}")
        try:
            dxo = from_shareable(shareable)
        except Exception as e:
            raise HEContributionError(f"not a DXO: {e}") from e
        meta = dxo.meta or {}
        if not is_encrypted(meta):
            raise HEContributionError("payload is not encrypted with this codec (plaintext weights are never aggregated)")
        if meta.get(HEMetaKey.CODEC_ID) != self.codec.codec_id:
            raise HEContributionError(f"codec {meta.get(HEMetaKey.CODEC_ID)} differs from the server's {self.codec.codec_id}")
        theirs = meta.get(HEMetaKey.KEY_ID)
        if theirs is None:
            raise HEContributionError(f"{client}'s contribution carries no HE key id (a monai-fl version older than "
                                      "the server's?); install the same monai-fl version everywhere")
        if theirs != self.key_id:
            # Ciphertexts under another secret key would add up to noise no site can decrypt.
            raise HEContributionError(
                f"{client} holds HE keys from another provisioning run (key id {theirs}, the server's is {self.key_id}); "
                "re-distribute the kits from one provisioning run")
        version, layout = self._expected(fl_ctx)
        if meta.get(HEMetaKey.BASE_VERSION) != version:
            raise HEContributionError(f"computed against model version {meta.get(HEMetaKey.BASE_VERSION)}, "
                                      f"the current global model is version {version}")
        self._check_layout(meta, layout)
        if client in self._contributors:
            raise HEContributionError("a second contribution from the same site in this round")
        weight = meta.get(HEMetaKey.WEIGHT)
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 1:
            raise HEContributionError(f"declared weight {weight!r} is not a positive integer")
        if self._total_weight + weight > self.codec.max_total_weight:
            raise HEContributionError(f"weight {weight} would bring the round's total to {self._total_weight + weight}, "
                                      f"above the codec's carry-free budget {self.codec.max_total_weight}")
        if len(self._contributors) + 1 > self.codec.max_contributions:
            raise HEContributionError(f"more than {self.codec.max_contributions} contributions exceed the noise budget")
        data = dxo.data
        if not isinstance(data, dict) or set(data) != {CIPHERTEXTS_KEY} or not isinstance(data[CIPHERTEXTS_KEY], list):
            raise HEContributionError(f"data must be {{'{CIPHERTEXTS_KEY}': [ciphertext bytes]}}, got keys {sorted(data)[:5]}")
        payload = data[CIPHERTEXTS_KEY]
        expected = layout.num_ciphertexts(self.codec)
        if len(payload) != expected:
            raise HEContributionError(f"{len(payload)} ciphertexts, the model layout needs {expected}")
        cts = [self.adder.load(c) for c in payload]  # validate all before touching the sum
        if self._acc is None:
            self._acc = cts
        else:
            for a, c in zip(self._acc, cts):
                self.adder.add_inplace(a, c)
        self._contributors.append(client)
        self._total_weight += weight
        self.log_info(fl_ctx, f"HE: accepted {len(cts)} ciphertexts from {client} (weight {weight}); "
                              f"{len(self._contributors)} contribution(s) so far")

    @staticmethod
    def _check_layout(meta: Mapping, layout: Layout) -> None:
        if meta.get(HEMetaKey.LAYOUT_HASH) == layout.layout_hash:
            return
        try:
            declared = Layout.from_list(meta.get(HEMetaKey.LAYOUT) or [])
        except (TypeError, ValueError):  # malformed declaration: report it as unexpected content
            declared = Layout(())
        ours = {s.name: s for s in layout.specs}
        theirs = {s.name: s for s in declared.specs}
        for name, spec in ours.items():
            if name not in theirs:
                raise HEContributionError(f"tensor '{name}' of the global model is missing")
            if theirs[name].shape != spec.shape:
                raise HEContributionError(
                    f"tensor '{name}' declared with shape {theirs[name].shape}, the global model has {spec.shape}")
        extra = sorted(set(theirs) - set(ours))
        raise HEContributionError(f"declared layout differs from the global model (unexpected tensors {extra[:5]})")

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        with self._lock:
            start = time.perf_counter()
            try:
                version, layout = self._expected(fl_ctx)
            except HEContributionError:  # no global model in the context: nothing was accepted anyway
                version, layout = None, None
            cts = [self.adder.dump(a) for a in self._acc] if self._acc else []
            meta = {
                MetaKey.PROCESSED_ALGORITHM: HE_ALGORITHM,
                HEMetaKey.CODEC_ID: self.codec.codec_id,
                HEMetaKey.KEY_ID: self.key_id,
                HEMetaKey.BASE_VERSION: version,
                HEMetaKey.NUM_CONTRIBUTIONS: len(self._contributors),
                HEMetaKey.TOTAL_WEIGHT: self._total_weight,
                HEMetaKey.CONTRIBUTORS: list(self._contributors),
            }
            if layout is not None:
                meta[HEMetaKey.LAYOUT_HASH] = layout.layout_hash
            self.log_info(fl_ctx, f"HE: aggregated {len(self._contributors)} contribution(s) "
                                  f"({', '.join(self._contributors) or 'none'}), total weight {self._total_weight}, "
                                  f"{len(cts)} ciphertexts in {time.perf_counter() - start:.2f} s")
            return DXO(DataKind.WEIGHT_DIFF, {CIPHERTEXTS_KEY: cts} if cts else {}, meta).to_shareable()

    def reset(self, fl_ctx: FLContext):
        with self._lock:
            self._reset_round()


class HEShareableGenerator(ShareableGenerator):
    def __init__(self, params: dict | None = None):
        """Global model <-> task data without decryption.

        The initial model goes out in plaintext (version 0); afterwards the global model *is* the
        latest encrypted aggregate plus its meta, and sites rebuild the weights from it.

        Args:
            params: ``CodecParams.to_dict()`` (defaults if None).
        """
        super().__init__()
        self.params = params
        self.codec = CodecParams.from_dict(params)

    def learnable_to_shareable(self, model: ModelLearnable, fl_ctx: FLContext) -> Shareable:
        meta = model.get(ModelLearnableKey.META) or {}
        weights = model.get(ModelLearnableKey.WEIGHTS) or {}
        if is_encrypted(meta):
            return DXO(DataKind.WEIGHT_DIFF, dict(weights), dict(meta)).to_shareable()
        _, layout = model_info(model)
        initial_meta = {HEMetaKey.VERSION: 0, HEMetaKey.CODEC_ID: self.codec.codec_id,
                        HEMetaKey.LAYOUT_HASH: layout.layout_hash}
        return DXO(DataKind.WEIGHTS, dict(weights), initial_meta).to_shareable()

    def shareable_to_learnable(self, shareable: Shareable, fl_ctx: FLContext) -> ModelLearnable:
        dxo = from_shareable(shareable)
        meta = dxo.meta or {}
        current = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        if not is_encrypted(meta):
            raise HEError("aggregate is not an HE aggregate: the HE shareable generator needs HEAggregator")
        if not meta.get(HEMetaKey.NUM_CONTRIBUTIONS):
            self.log_warning(fl_ctx, "HE: no contribution accepted this round; the global model is unchanged")
            return current
        version, layout = model_info(current)
        if meta.get(HEMetaKey.BASE_VERSION) != version:
            raise HEError(f"aggregate is based on version {meta.get(HEMetaKey.BASE_VERSION)}, global model is {version}")
        new_meta = {
            MetaKey.PROCESSED_ALGORITHM: HE_ALGORITHM,
            HEMetaKey.CODEC_ID: self.codec.codec_id,
            HEMetaKey.KEY_ID: meta.get(HEMetaKey.KEY_ID),
            HEMetaKey.VERSION: version + 1,
            HEMetaKey.BASE_VERSION: version,
            HEMetaKey.LAYOUT: layout.to_list(),
            HEMetaKey.LAYOUT_HASH: layout.layout_hash,
            HEMetaKey.NUM_CONTRIBUTIONS: meta[HEMetaKey.NUM_CONTRIBUTIONS],
            HEMetaKey.TOTAL_WEIGHT: meta[HEMetaKey.TOTAL_WEIGHT],
            HEMetaKey.CONTRIBUTORS: meta.get(HEMetaKey.CONTRIBUTORS, []),
        }
        self.log_info(fl_ctx, f"HE: global model is now version {version + 1} (encrypted, "
                              f"{len(dxo.data[CIPHERTEXTS_KEY])} ciphertexts)")
        return make_model_learnable({CIPHERTEXTS_KEY: list(dxo.data[CIPHERTEXTS_KEY])}, new_meta)


class HEModelPersistor(PTFileModelPersistor):
    def __init__(
        self,
        model=None,
        source_ckpt_file_full_name: str | None = None,
        he_model_file_name: str = HE_MODEL_FILE,
        load_weights_only: bool = True,
    ):
        """``PTFileModelPersistor`` that stores the encrypted global model without decrypting it.

        The initial model is built/loaded exactly as by ``PTFileModelPersistor``; once the global
        model is encrypted it is saved as a package file (:mod:`monai_fl.he.package`) and listed in
        the model inventory, so ``PTFileModelLocator`` + ``GlobalModelEval`` send it to the sites,
        whose decrypt filter turns it into the final plaintext model.

        Args:
            model: as for ``PTFileModelPersistor`` (module, component id or ``{"path", "args"}``).
            source_ckpt_file_full_name: optional initial checkpoint.
            he_model_file_name: file name of the encrypted model in the run's app folder.
            load_weights_only: torch.load safety switch for the initial checkpoint.
        """
        super().__init__(model=model, source_ckpt_file_full_name=source_ckpt_file_full_name,
                         load_weights_only=load_weights_only)
        self.he_model_file_name = he_model_file_name

    def _he_path(self) -> str:
        return os.path.join(self.log_dir, self.he_model_file_name)

    def save_model(self, ml: ModelLearnable, fl_ctx: FLContext):
        meta = ml.get(ModelLearnableKey.META) or {}
        if not is_encrypted(meta):
            return super().save_model(ml, fl_ctx)
        write_package(self._he_path(), dict(meta), list(ml[ModelLearnableKey.WEIGHTS][CIPHERTEXTS_KEY]))
        self.log_info(fl_ctx, f"HE: saved encrypted global model version {meta[HEMetaKey.VERSION]} to {self._he_path()}")

    def get_model_inventory(self, fl_ctx: FLContext) -> dict[str, ModelDescriptor]:
        inventory = {}
        if self.log_dir and os.path.exists(self._he_path()):
            inventory[self.he_model_file_name] = ModelDescriptor(
                name=self.he_model_file_name, location=self._he_path(), model_format=HE_MODEL_FORMAT, props={})
            return inventory
        return super().get_model_inventory(fl_ctx)

    def get_model(self, model_file: str, fl_ctx: FLContext) -> ModelLearnable:
        if model_file == self.he_model_file_name and os.path.exists(self._he_path()):
            meta, cts = read_package(self._he_path())
            return make_model_learnable({CIPHERTEXTS_KEY: cts}, meta)
        return super().get_model(model_file, fl_ctx)

    def handle_event(self, event: str, fl_ctx: FLContext):
        if event == AppEventType.GLOBAL_BEST_MODEL_AVAILABLE:
            self.log_warning(fl_ctx, "HE: the server cannot evaluate an encrypted model; no best model is saved")
            return
        super().handle_event(event, fl_ctx)


# ---------------------------------------------------------------------------------------------
# Job wiring
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HEJobIds:
    """Component ids ``attach_he`` used; pass them to ``ScatterAndGather``."""

    aggregator: str = "aggregator"
    shareable_generator: str = "shareable_generator"
    persistor: str | None = "persistor"
    site_codec: str = SITE_CODEC_ID


def attach_he(
    job,
    params: CodecParams | dict | None = None,
    *,
    network=None,
    persistor_id: str = "persistor",
    client_context_file: str = CLIENT_CONTEXT_FILE,
    server_context_file: str = SERVER_CONTEXT_FILE,
    weight_mode: str = WeightMode.STEPS,
    weight_unit: float = 1.0,
    max_sites: int = 8,
    workers: int = 1,
    train_task: str = TRAIN_TASK,
    validate_task: str = VALIDATE_TASK,
    submit_model_task: str = SUBMIT_MODEL_TASK,
) -> HEJobIds:
    """Add every HE component to an NVFlare ``FedJob``/``BaseFedJob``.

    Server: ``HEAggregator`` (id ``aggregator``), ``HEShareableGenerator`` (id
    ``shareable_generator``) and, if ``network`` is given, ``HEModelPersistor(model=network)`` (id
    ``persistor_id``). Sites: ``HESiteCodec`` (id ``he_site_codec``), ``HEDecryptFilter`` on the
    task data of ``train``/``validate``, ``HEEncryptFilter`` on the results of ``train`` (weighted)
    and ``submit_model`` (weight 1). The caller adds the controller (``ScatterAndGather`` with the
    returned ids) and the executor; the Client API script is unchanged.

    Args:
        job: the job being built.
        params: codec parameters (``CodecParams`` or its dict; defaults if None).
        network: initial model for the persistor (as for ``PTFileModelPersistor``); None if the
            caller adds an ``HEModelPersistor`` itself.
        persistor_id: id of the persistor.
        client_context_file: sites' secret context: startup-kit name or absolute path.
        server_context_file: server's parameter-only context.
        weight_mode, weight_unit, max_sites, workers: see :class:`HESiteCodec`.
        train_task, validate_task, submit_model_task: task names of the workflow.

    Returns:
        The component ids.
    """
    from nvflare.job_config.defs import FilterType

    codec = params if isinstance(params, CodecParams) else CodecParams.from_dict(params)
    as_dict = codec.to_dict()
    ids = HEJobIds(persistor=persistor_id if network is not None else None)
    if network is not None:
        job.to_server(HEModelPersistor(model=network), id=persistor_id)
    job.to_server(HEShareableGenerator(params=as_dict), id=ids.shareable_generator)
    job.to_server(HEAggregator(params=as_dict, context_file=server_context_file), id=ids.aggregator)
    job.to_clients(HESiteCodec(params=as_dict, context_file=client_context_file, weight_mode=weight_mode,
                               weight_unit=weight_unit, max_sites=max_sites, workers=workers), id=ids.site_codec)
    job.to_clients(HEDecryptFilter(codec_id=ids.site_codec), tasks=[train_task, validate_task],
                   filter_type=FilterType.TASK_DATA)
    job.to_clients(HEEncryptFilter(codec_id=ids.site_codec, weighted=True), tasks=[train_task],
                   filter_type=FilterType.TASK_RESULT)
    job.to_clients(HEEncryptFilter(codec_id=ids.site_codec, weighted=False), tasks=[submit_model_task],
                   filter_type=FilterType.TASK_RESULT)
    return ids
