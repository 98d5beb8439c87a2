"""In-process FedAvg variants on PneumoniaMNIST (the demo's sites), chosen on the official *val*
split (held out of every site), never on test.

    MONAI_FL_DATA=../shared/data python benchmarks/fedavg_variants.py VARIANT [VARIANT ...] \
        [--manifest runs/bench_fl_pneumoniamnist/manifest.json]

Prints one JSON line per variant ({name: {val_auc, val_acc, test_auc, test_acc, s}}); the lines of
the runs reported in RESULTS.md are in results/fedavg_variants.jsonl. Same task code (network,
transforms, loss, train step) as the framework; the FedAvg here is a plain in-process loop (no
simulator, no HE) so schedules and server rules can be compared quickly over seeds. The manifest is
the one `benchmarks/fl_pneumoniamnist.py` writes.
"""
import argparse, copy, json, os, time
import numpy as np, torch
from monai_fl.config import ExperimentConfig
from monai_fl.experiment import prepare
from monai_fl.tasks import classification as cls_task
from monai_fl.tasks.loop import build_optimizer, lr_at, set_lr, train_epoch
from monai_fl.utils import seed_everything

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("variants", nargs="+")
ap.add_argument("--manifest", default="runs/bench_fl_pneumoniamnist/manifest.json")
ap.add_argument("--data-root", default=os.environ.get("MONAI_FL_DATA"))
ap.add_argument("--norm", choices=cls_task.NORMS, help="override the config's network.norm")
args = ap.parse_args()
cfg = ExperimentConfig.load(os.path.join(REPO, "configs", "pneumoniamnist_he.yaml"))
if args.norm:
    cfg.network.norm = args.norm
exp = prepare(cfg, args.data_root, args.manifest, create=False)
n_train = len(exp.data.labels["train"])
spec = exp.spec
t = cfg.train

def site_xy(site):
    from monai_fl.data.partition import site_entry
    idx = np.asarray(site_entry(exp.manifest, site)["train_indices"], np.int64)
    idx = idx[idx < n_train]
    return exp.pool_images[idx], exp.pool_labels[idx]

def pooled_xy():
    """Every site's training images and labels together (what centralized training sees)."""
    xs, ys = zip(*[site_xy(s) for s in exp.sites])
    return np.concatenate(xs), np.concatenate(ys)

val_x, val_y = exp.pool_images[n_train:], exp.pool_labels[n_train:]
val_loader = cls_task.make_loader(val_x, val_y, "eval", spec, 256)
test_loader = exp.test_loader(None)

def ev(model):
    v = exp.evaluate(model, val_loader); te = exp.evaluate(model, test_loader)
    return {"val_auc": v["auc"], "val_acc": v["acc"], "test_auc": te["auc"], "test_acc": te["acc"]}

def loader(x, y):
    return cls_task.make_loader(x, y, "train", spec, t.batch_size, t.augment, t.seed)

def centralized(epochs=None):
    seed_everything(t.seed, 2)
    m = exp.build_model(); opt = build_optimizer(m, t); L = loader(*pooled_xy())
    epochs = epochs or t.epochs
    for e in range(epochs):
        set_lr(opt, lr_at(t, e, epochs)); train_epoch(m, L, opt, exp.loss())
    return ev(m)

class PriorCE(torch.nn.Module):
    def __init__(self, y, n_classes=2, tau=1.0):
        super().__init__()
        counts = np.bincount(np.asarray(y).ravel(), minlength=n_classes).astype(float) + 1.0
        self.log_prior = torch.tensor(tau * np.log(counts / counts.sum()), dtype=torch.float32)
        self.ce = torch.nn.CrossEntropyLoss()
    def forward(self, logits, y):
        return self.ce(logits + self.log_prior, y)

def recalibrate_bn(model):
    """Oracle: BN statistics of ``model`` recomputed on the pooled training images."""
    m = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(cls_task.make_loader(*pooled_xy(), "eval", spec, 256), m)
    return m

def fedavg(rounds=10, frac=1.0, keep=False, server_lr=1.0, momentum=0.0, seed=0, prior=0.0,
           bn_oracle=False):
    seed_everything(seed, 2)
    g = exp.build_model()
    sites = exp.sites
    models = {s: copy.deepcopy(g) for s in sites}
    opts = {s: build_optimizer(models[s], t) for s in sites}
    loaders = {s: loader(*site_xy(s)) for s in sites}
    losses = {s: (PriorCE(site_xy(s)[1], tau=prior) if prior else exp.loss()) for s in sites}
    mom = None
    total = rounds
    for r in range(rounds):
        gs = {k: v.clone() for k, v in g.state_dict().items()}
        deltas, ws = [], []
        for s in sites:
            m = models[s]; m.load_state_dict(gs)
            if not keep: opts[s] = build_optimizer(m, t)
            lr = t.lr * 0.5 * (1 + np.cos(np.pi * r / total))
            set_lr(opts[s], lr)
            it = loaders[s]
            if frac < 1.0:
                n = int(round(len(it) * frac)); batches = []
                for i, b in enumerate(it):
                    if i >= n: break
                    batches.append(b)
                it = batches
            rec = train_epoch(m, it, opts[s], losses[s])
            ws.append(rec["steps"])
            deltas.append({k: m.state_dict()[k].float() - gs[k].float() for k in gs})
        w = np.array(ws, float) / sum(ws)
        agg = {k: sum(wi * d[k] for wi, d in zip(w, deltas)) for k in gs}
        if momentum:
            mom = agg if mom is None else {k: momentum * mom[k] + agg[k] for k in agg}
            step = mom
        else:
            step = agg
        new = {}
        for k in gs:
            if gs[k].is_floating_point():
                new[k] = gs[k] + server_lr * step[k]
            else:
                new[k] = (gs[k].float() + step[k]).round().to(gs[k].dtype)
        g.load_state_dict(new)
    r = ev(g)
    if bn_oracle:
        r["bn_oracle"] = ev(recalibrate_bn(g))
    return r

variants = {
    "centralized": centralized,
    "centralized_e20": lambda: centralized(epochs=20),
    "fedavg": lambda: fedavg(),
    "fedavg_seed1": lambda: fedavg(seed=1),
    "keep_opt": lambda: fedavg(keep=True),
    "r20_half": lambda: fedavg(rounds=20, frac=0.5),
    "server_lr1.5": lambda: fedavg(server_lr=1.5),
    "fedavgm0.5": lambda: fedavg(momentum=0.5),
    "fedavg_seed2": lambda: fedavg(seed=2),
    "r20_half_seed1": lambda: fedavg(rounds=20, frac=0.5, seed=1),
    "r20_half_seed2": lambda: fedavg(rounds=20, frac=0.5, seed=2),
    "la_seed0": lambda: fedavg(rounds=20, frac=0.5, seed=0, prior=1.0),
    "la_seed1": lambda: fedavg(rounds=20, frac=0.5, seed=1, prior=1.0),
    "la_seed2": lambda: fedavg(rounds=20, frac=0.5, seed=2, prior=1.0),
    "r40_q_seed0": lambda: fedavg(rounds=40, frac=0.25, seed=0),
    "r40_q_seed1": lambda: fedavg(rounds=40, frac=0.25, seed=1),
    "r40_q_seed2": lambda: fedavg(rounds=40, frac=0.25, seed=2),
    **{f"r40_half_seed{i}": (lambda i=i: fedavg(rounds=40, frac=0.5, seed=i)) for i in range(3)},
    **{f"bn_oracle_seed{i}": (lambda i=i: fedavg(rounds=20, frac=0.5, seed=i, bn_oracle=True)) for i in range(3)},
}
unknown = [v for v in args.variants if v not in variants]
if unknown:
    ap.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(variants)}")
for name in args.variants:
    t0 = time.time(); r = variants[name](); r["s"] = round(time.time() - t0)
    if cfg.network.norm not in (None, "batch"):
        name = f"{cfg.network.norm}norm_{name}"
    print(json.dumps({name: r}), flush=True)
