"""The ``monai-fl`` command line: partition, baselines, federated runs, preprocessing, demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from monai_fl.config import ExperimentConfig
from monai_fl.errors import MonaiFLError

DEFAULT_RUNS = Path("runs")
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pneumoniamnist_he.yaml"


def _experiment_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("experiment (override the config file)")
    g.add_argument("--config", type=Path, help="experiment config (YAML/JSON); defaults are PneumoniaMNIST, 3 sites, Dirichlet(0.5)")
    g.add_argument("--dataset", help="MedMNIST dataset flag, e.g. pneumoniamnist, breastmnist, adrenalmnist3d")
    g.add_argument("--size", type=int, help="image size (28, 64, 128, 224; 3D: 28, 64)")
    g.add_argument("--sites", type=int, help="number of sites")
    g.add_argument("--scheme", help="partition scheme: iid, dirichlet:<alpha>, quantity:<beta>")
    g.add_argument("--network", help="resnet18, densenet121 or cnn")
    g.add_argument("--width", type=int, help="base channel width of resnet18/cnn (paper ResNet-18: 64)")
    g.add_argument("--epochs", type=int,
                   help="centralized and local-only epochs (federated sites train fl.rounds × fl.local_epochs)")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--seed", type=int, help="seed for the split and for training")
    d = p.add_argument_group("data and output")
    d.add_argument("--data-root", type=Path, help="folder holding the MedMNIST .npz files (searched before $MONAI_FL_DATA)")
    d.add_argument("--manifest", type=Path, help="site manifest to use (created there if absent)")
    d.add_argument("--out", type=Path, help="output folder (default runs/<experiment>-<command>)")


def load_config(args: argparse.Namespace) -> ExperimentConfig:
    """The config file (or defaults) with command-line overrides applied."""
    cfg = ExperimentConfig.load(args.config) if args.config else ExperimentConfig()
    overrides = {
        ("dataset", "name"): args.dataset, ("dataset", "size"): args.size,
        ("partition", "n_sites"): args.sites, ("partition", "scheme"): args.scheme,
        ("network", "name"): args.network, ("network", "width"): args.width,
        ("train", "epochs"): args.epochs, ("train", "batch_size"): args.batch_size, ("train", "lr"): args.lr,
        ("train", "seed"): args.seed, ("partition", "seed"): args.seed,
    }
    for (section, key), value in overrides.items():
        if value is not None:
            setattr(getattr(cfg, section), key, value)
    if args.dataset and not args.config:
        cfg.name = f"{cfg.dataset.name}_{cfg.partition.n_sites}site"
    return cfg


def _out_dir(args: argparse.Namespace, cfg: ExperimentConfig, command: str) -> Path:
    out = args.out or DEFAULT_RUNS / f"{cfg.name}-{command}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def cmd_partition(args: argparse.Namespace) -> int:
    from monai_fl.experiment import prepare

    cfg = load_config(args)
    path = args.manifest or _out_dir(args, cfg, "partition") / "manifest.json"
    if path.exists():
        raise MonaiFLError(f"{path} exists; a site manifest is never overwritten (remove it or pick another --manifest)")
    m = prepare(cfg, args.data_root, path, create=True).manifest
    print(f"{m['dataset']}: {m['n_pool']} cases, training cases split {m['scheme']} over {len(m['sites'])} sites "
          f"(seed {m['seed']})")
    for site, e in m["sites"].items():
        counts = f" {e['class_counts']}" if e.get("class_counts") else ""
        test_counts = f" {e['test_class_counts']}" if e.get("test_class_counts") else ""
        print(f"  {site}: {e['n_train']:5d} train{counts}  {e['n_test']:4d} test{test_counts}")
    print(f"site manifest: {path}")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    args.source = None
    args.methods = args.kind
    return cmd_run(args)


def _config_source(path: Path) -> Path:
    """A config file, or an exported job folder (its shipped ``experiment.yaml``)."""
    from monai_fl.fl.job import JOB_CONFIG_NAME

    if path.is_dir():
        shipped = sorted(path.glob(f"**/custom/{JOB_CONFIG_NAME}"))
        if not shipped:
            raise MonaiFLError(f"{path} is a folder but not a monai-fl job (no custom/{JOB_CONFIG_NAME} inside)")
        return shipped[0]
    return path


def cmd_run(args: argparse.Namespace) -> int:
    from monai_fl.report.tables import format_table, method_rows
    from monai_fl.run import run_experiment

    args.config = _config_source(args.source) if args.source else args.config
    cfg = load_config(args)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    out = _out_dir(args, cfg, "run")
    print(f"monai-fl run: {cfg.name} ({', '.join(methods)}) -> {out}")
    results = run_experiment(cfg, out, args.data_root, args.manifest, methods)
    print(format_table(method_rows(results)))
    print(f"report: {out / 'report.html'} (also report.md, results.json, *.png)")
    return 0


def cmd_export_jobs(args: argparse.Namespace) -> int:
    from monai_fl.fl.job import export_job

    cfg = load_config(args)
    for he in (False, True):
        print(f"exported {export_job(cfg, args.jobs_dir, he=he)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    args.source = None
    for name in ("dataset", "size", "sites", "scheme", "network", "width", "epochs", "batch_size", "lr", "seed",
                 "data_root", "manifest", "out"):
        setattr(args, name, getattr(args, name, None))
    args.config = DEMO_CONFIG
    # Plaintext FedAvg is left to `monai-fl run` and benchmarks/fl_pneumoniamnist.py so the demo
    # stays well inside 15 minutes on 2 cores.
    args.methods = "fl_he,centralized,local,classical"
    return cmd_run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monai-fl",
        description="Federated learning for medical imaging: MONAI tasks as NVFlare sites, "
                    "homomorphic-encrypted aggregation, side-by-side baselines.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("partition", help="split a dataset's training pool among sites and write the site manifest",
                       description="Split the official train+val of a MedMNIST dataset among N sites "
                                   "(iid, dirichlet:<alpha> label skew, quantity:<beta> size skew) and write a site manifest.")
    _experiment_options(p)
    p.set_defaults(func=cmd_partition)

    p = sub.add_parser("baseline", help="train a baseline: centralized, local (each site alone) or classical",
                       description="Train a baseline on the site manifest's split and evaluate it on the pooled "
                                   "official test set and on every site's test shard. Writes results.json.")
    p.add_argument("kind", choices=("centralized", "local", "classical"),
                   help="centralized: pool all sites' data; local: each site alone; classical: scikit-learn models on pixels")
    _experiment_options(p)
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("run", help="run an experiment: federated (HE/plain) and baselines, one report",
                       description="Run federated learning in the NVFlare simulator (HE and/or plaintext) and the "
                                   "centralized, local-only and classical baselines on the same site manifest; "
                                   "write results.json, report.md/.html and PNG plots.")
    p.add_argument("source", nargs="?", type=Path, help="experiment config (YAML/JSON) or an exported job folder")
    p.add_argument("--methods", default="fl_he,fl_plain,centralized,local,classical",
                   help="comma-separated subset of fl_he, fl_plain, centralized, local, classical")
    _experiment_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("export-jobs", help="write the NVFlare job folders (plaintext and HE) for a config",
                       description="Export the plaintext and HE FedAvg jobs for an experiment config as NVFlare job "
                                   "folders, runnable with `nvflare simulator` or submittable to a provisioned system.")
    p.add_argument("--jobs-dir", type=Path, default=Path("jobs"), help="where to write the job folders (default: jobs/)")
    _experiment_options(p)
    p.set_defaults(func=cmd_export_jobs)

    p = sub.add_parser("demo", help="the main job: PneumoniaMNIST, 3 sites, Dirichlet(0.5), HE FedAvg vs baselines",
                       description=f"Run {DEMO_CONFIG.name}: federated FedAvg with HE aggregation, centralized, "
                                   "local-only and classical baselines on one split; prints where the report is.")
    p.add_argument("--out", type=Path, help="output folder (default runs/<experiment>-run)")
    p.add_argument("--data-root", type=Path, help="folder holding the MedMNIST .npz files")
    p.set_defaults(func=cmd_demo)

    from monai_fl.provision import add_provision_subcommand
    from preprocessing.cli import add_prep_subcommands

    add_provision_subcommand(sub)
    add_prep_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MonaiFLError as exc:
        print(f"monai-fl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("monai-fl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
