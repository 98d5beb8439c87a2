"""Run the monai-fl job on a provisioned NVFlare system on this machine (loopback only).

    python scripts/poc_run.py [--config CFG] [--data-root DIR] [--out DIR] [--no-he] [--timeout S]

It provisions a project (server ``localhost``, free loopback ports, one kit per site, an admin kit)
into ``--out``, writes each site kit's ``local/monai_fl_site.json``, starts the server and every
site from their kits as separate processes, submits the job with the admin kit (FLARE API), waits
for it, downloads the result and stops every process, also on failure or Ctrl-C. Without
``--config`` it runs the small PoC experiment (BreastMNIST, 2 sites, 2 rounds, HE on).
Exit code 0 when the job completed, 1 when it failed, 2 on a usage or set-up error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from monai_fl.config import ExperimentConfig
from monai_fl.errors import MonaiFLError
from monai_fl.poc import poc_config, run_poc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="experiment config (default: the small PoC experiment)")
    parser.add_argument("--data-root", type=Path, help="MedMNIST folder (default $MONAI_FL_DATA)")
    parser.add_argument("--out", type=Path, help="run folder (default runs/poc-<time>)")
    parser.add_argument("--no-he", action="store_true", help="plaintext job and kits without HE keys")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds the job may take (default 600)")
    args = parser.parse_args(argv)

    out = args.out or Path("runs") / time.strftime("poc-%Y%m%d-%H%M%S")
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    try:
        cfg = ExperimentConfig.load(args.config) if args.config else poc_config()
        setup, result = run_poc(cfg, args.data_root, out, he=False if args.no_he else None,
                                job_timeout=args.timeout, log=log)
    except MonaiFLError as exc:
        print(f"poc_run: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("poc_run: interrupted (every process was stopped)", file=sys.stderr)
        return 130

    print()
    print(f"job {result.job_id}: {result.status} in {result.wall_time_s:.0f} s")
    for rec in result.rounds:
        cells = ", ".join(f"{s}: auc {m.get('auc', float('nan')):.3f}" for s, m in sorted(rec["sites"].items()))
        print(f"  round {rec['round']}: {cells}")
    for site, m in sorted(result.final.items()):
        print(f"  final global model at {site}: auc {m.get('auc', float('nan')):.3f} acc {m.get('acc', float('nan')):.3f}")
    print()
    print(f"startup kits:        {setup.kits.root}")
    print(f"job result (server): {result.result_dir}")
    for site, path in sorted(result.site_models.items()):
        print(f"global model ({site}): {path}")
    print(f"process logs:        {setup.workdir / 'logs'}  (and <kit>/log.txt)")
    return 0 if result.ok and result.final else 1


if __name__ == "__main__":
    sys.exit(main())
