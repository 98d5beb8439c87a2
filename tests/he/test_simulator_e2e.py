"""One NVFlare simulator run (2 sites x 2 rounds) of HE FedAvg with a toy Client API script.

Proves the HE job runs in the simulator, that the models the sites receive (each round and the
final one, delivered by GlobalModelEval) equal plaintext FedAvg of what the sites sent within the
codec's bound, and that the server's workspace never holds a secret-key context.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from monai_fl.he.codec import CodecParams, ReferenceState, next_exponent, range_ratio, weighted_mean_reference
from monai_fl.he.keys import is_private, load_context, write_simulator_contexts
from monai_fl.he.nvflare_components import HE_MODEL_FILE, attach_he
from monai_fl.he.package import read_package
from monai_fl.he.provision import write_site_resources

ROUNDS = 2
SITES = ["site-1", "site-2"]

TOY_MODEL = '''
"""Toy network of the HE end-to-end test (test fixture only)."""
import torch


class ToyMLP(torch.nn.Module):
    def __init__(self, n_in: int = 8, hidden: int = 16, n_out: int = 2):
        super().__init__()
        self.n_in, self.hidden, self.n_out = n_in, hidden, n_out
        self.fc1 = torch.nn.Linear(n_in, hidden)
        self.fc2 = torch.nn.Linear(hidden, n_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))
'''

TOY_CLIENT = '''
"""Toy Client API site of the HE end-to-end test (test fixture only): SGD on random data."""
import json
import os

import numpy as np
import torch
import nvflare.client as flare
from nvflare.app_common.abstract.fl_model import FLModel

from he_toy_model import ToyMLP


def main():
    flare.init()
    site = flare.get_site_name()
    out = os.environ["HE_E2E_OUT"]
    idx = int(site.split("-")[-1])
    torch.manual_seed(idx)
    rng = np.random.default_rng(idx)
    x = torch.tensor(rng.normal(size=(64, 8)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 2, size=64))
    model = ToyMLP()
    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        params = {k: np.asarray(v, dtype=np.float32) for k, v in received.params.items()}
        model.load_state_dict({k: torch.as_tensor(v) for k, v in params.items()})
        if flare.is_train():
            steps = 3 + idx
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            for _ in range(steps):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            local = {k: v.detach().clone() for k, v in model.state_dict().items()}
            tag = f"{site}_r{received.current_round}"
            np.savez(os.path.join(out, tag + "_global.npz"), **params)
            np.savez(os.path.join(out, tag + "_local.npz"), **{k: v.numpy() for k, v in local.items()})
            with open(os.path.join(out, tag + "_steps.json"), "w") as f:
                json.dump(steps, f)
            flare.send(FLModel(params=local, meta={"NUM_STEPS_CURRENT_ROUND": steps}))
        elif flare.is_evaluate():
            np.savez(os.path.join(out, f"{site}_final.npz"), **params)
            flare.send(FLModel(metrics={"acc": 1.0}))
        else:
            flare.send(FLModel(params={k: v.detach() for k, v in model.state_dict().items()}))


if __name__ == "__main__":
    main()
'''


def _npz(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_he_fedavg_in_the_simulator(tmp_path, monkeypatch):
    from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor
    from nvflare.app_common.workflows.global_model_eval import GlobalModelEval
    from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather
    from nvflare.app_opt.pt.file_model_locator import PTFileModelLocator
    from nvflare.job_config.api import FedJob

    code = tmp_path / "code"
    code.mkdir()
    (code / "he_toy_model.py").write_text(textwrap.dedent(TOY_MODEL))
    (code / "he_toy_client.py").write_text(textwrap.dedent(TOY_CLIENT))
    monkeypatch.syspath_prepend(str(code))
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("HE_E2E_OUT", str(out))
    import he_toy_model

    params = CodecParams(rounding="nearest")
    ws = tmp_path / "ws"
    keys = write_simulator_contexts(ws, params, client_key_dir=tmp_path / "site_keys")
    write_site_resources(ws / "local")

    job = FedJob(name="he_e2e", min_clients=len(SITES))
    job.set_app_packages(["monai_fl"])
    ids = attach_he(job, params, network=he_toy_model.ToyMLP(), client_context_file=keys.client_context_arg,
                    max_sites=len(SITES))
    job.to_server(PTFileModelLocator(pt_persistor_id=ids.persistor), id="model_locator")
    job.to_server(ScatterAndGather(min_clients=len(SITES), num_rounds=ROUNDS, wait_time_after_min_received=0,
                                   aggregator_id=ids.aggregator, persistor_id=ids.persistor,
                                   shareable_generator_id=ids.shareable_generator))
    job.to_server(GlobalModelEval(model_locator_id="model_locator"))
    job.to_clients(ClientAPIExecutor(execution_mode="in_process", task_script_path="he_toy_client.py",
                                     params_exchange_format="pytorch", server_expected_format="pytorch"))
    job.to_clients(str(code / "he_toy_client.py"))
    rc = job.simulator_run(str(ws), clients=SITES, threads=len(SITES))
    assert rc == 0

    # Replay the protocol in plaintext: FedAvg of what the sites sent, ranges from their deltas.
    g0 = _npz(out / "site-1_r0_global.npz")
    state = ReferenceState.initial(g0, params)
    for r in range(ROUNDS):
        received = [_npz(out / f"{s}_r{r}_global.npz") for s in SITES]
        for other in received[1:]:
            assert all(np.array_equal(received[0][k], other[k]) for k in g0)  # sites agree bit for bit
        locals_ = [_npz(out / f"{s}_r{r}_local.npz") for s in SITES]
        weights = [json.loads((out / f"{s}_r{r}_steps.json").read_text()) for s in SITES]
        exact = weighted_mean_reference(state, locals_, weights)
        nxt = [_npz(out / (f"{s}_r{r + 1}_global.npz" if r + 1 < ROUNDS else f"{s}_final.npz")) for s in SITES]
        bound = state.error_bound(params)
        for got in nxt:
            for name in g0:
                tol = bound[name] + np.spacing(np.abs(exact[name]).astype(np.float32))
                assert np.all(np.abs(got[name] - exact[name]) <= tol), (r, name)
            assert any(not np.array_equal(got[k], state.weights[k]) for k in g0)  # the model moved
        exps = {}
        for spec in state.layout.specs:
            e = state.exponents[spec.name]
            deltas = [loc[spec.name].astype(np.float64) - state.weights[spec.name] for loc in locals_]
            exps[spec.name] = next_exponent(e, sum(range_ratio(d, e, params) for d in deltas), len(SITES), params,
                                            spec.size)
        state = ReferenceState(r + 1, state.layout, nxt[0], exps)

    # The server's workspace holds parameter-only contexts and a ciphertext-only global model.
    server_ws = ws / "server"
    contexts = list(server_ws.rglob("*.tenseal")) + list((ws / "startup").glob("*.tenseal"))
    assert contexts and not any(is_private(load_context(p)) for p in contexts)
    assert not list(ws.rglob("client_context.tenseal"))
    models = list(server_ws.rglob(HE_MODEL_FILE))
    assert len(models) == 1
    meta, cts = read_package(models[0])
    assert meta["he_version"] == ROUNDS and all(c[:2] == b"\x5e\xa1" for c in cts)
    server_log = (server_ws / "log.txt").read_text()
    assert server_log.count(f"HE: aggregated {len(SITES)} contribution(s)") == ROUNDS
    for s in SITES:
        assert f"HE: decoded global model version {ROUNDS}" in (ws / s / "log.txt").read_text()
