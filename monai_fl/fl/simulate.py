"""Run a monai-fl job in the NVFlare simulator and collect what the server received (metrics only).

The simulator runs as a child process (``nvflare simulator``), so its memory can be measured and
a crash cannot take the caller down. Sites find their data through the environment the simulator
inherits (``MONAI_FL_MANIFEST``, ``MONAI_FL_DATA``), as they would from site-local config.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm

from monai_fl.config import ExperimentConfig
from monai_fl.errors import MonaiFLError
from monai_fl.fl.client import FINAL_MODEL_FILE, MODELS_DIR
from monai_fl.fl.job import export_job, he_params
from monai_fl.fl.model import ConfiguredNetwork
from monai_fl.fl.site_config import MANIFEST_ENV
from monai_fl.keys import DATA_ENV, POOLED

SERVER_RUN = Path("server") / "simulate_job"
POLL_S = 0.5


def run_simulation(
    cfg: ExperimentConfig,
    manifest: Path,
    data_root: Path | None,
    out_dir: Path,
    he: bool,
    threads: int | None = None,
) -> dict:
    """Export the job, run it in the simulator, and gather the per-round and final metrics.

    Args:
        cfg: experiment config (rounds, sites, network …).
        manifest: site manifest every site reads its shard from.
        data_root: data folder for the sites (None: sites use ``$MONAI_FL_DATA``).
        out_dir: run folder; the job is exported to ``out_dir/jobs``, the simulator workspace is
            ``out_dir/sim_he`` or ``out_dir/sim_plain``, and under HE the sites' secret context is
            written to ``out_dir/site_keys``.
        he: run the homomorphic-encryption job.
        threads: simulator client threads (default: one per site, so every site lives for the whole
            job as it does in a real deployment; fewer makes the simulator restart sites between
            tasks, which loses a site's HE reference model).

    Returns:
        ``{"sites": {site: final metrics}, "pooled_reported": …, "rounds": […], "wall_time_s",
        "peak_rss_gib", "workspace", "job"}``. Raises :class:`MonaiFLError` if the run failed.
    """
    tag = "he" if he else "plain"
    ws = out_dir / f"sim_{tag}"
    client_context = None
    if he:
        from monai_fl.he.keys import write_simulator_contexts

        # The sites' secret context lives outside the simulator workspace, so the server's folder
        # holds only the public parameters, as a provisioned server kit does.
        client_context = write_simulator_contexts(ws, he_params(cfg), client_key_dir=out_dir / "site_keys").client_context_arg
    job_dir = export_job(cfg, out_dir / "jobs", he=he, client_context_file=client_context)
    n_sites = cfg.partition.n_sites
    threads = threads or n_sites
    env = dict(os.environ)
    env[MANIFEST_ENV] = str(Path(manifest).resolve())
    if data_root is not None:
        env[DATA_ENV] = str(Path(data_root).resolve())
    # Share the cores among the sites that train at once instead of oversubscribing them.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // threads)))
    cmd = [str(Path(sys.executable).with_name("nvflare")), "simulator", str(job_dir), "-w", str(ws),
           "-n", str(n_sites), "-t", str(threads)]
    log_path = out_dir / f"simulator_{tag}.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        peak = _watch(proc, ws / SERVER_RUN / "metrics" / "round_metrics.jsonl", cfg.fl.rounds, f"FL ({tag})")
    wall = time.perf_counter() - t0
    results = collect(ws, cfg)
    if proc.returncode != 0 or not results["sites"]:
        raise MonaiFLError(f"the {tag} federated run failed (exit {proc.returncode}); see {log_path} and "
                           f"{ws}/*/log.txt")
    results.update(wall_time_s=wall, peak_rss_gib=peak / 2**30, workspace=str(ws), job=str(job_dir), log=str(log_path))
    return results


def _watch(proc: subprocess.Popen, rounds_file: Path, n_rounds: int, desc: str) -> int:
    """Wait for the simulator, showing finished rounds; returns the peak RSS (bytes) of its process tree."""
    peak = 0
    bar = tqdm(total=n_rounds, desc=desc, unit="round", disable=None)
    try:
        parent = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [parent] + parent.children(recursive=True)
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            done = _count_lines(rounds_file)
            if done > bar.n:
                bar.update(done - bar.n)
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        bar.close()
    return peak


def _count_lines(path: Path) -> int:
    try:
        return sum(1 for _ in open(path))
    except OSError:
        return 0


def collect(ws: Path, cfg: ExperimentConfig) -> dict:
    """Read the server's records: final per-site metrics (global model evaluation) and per-round
    metrics each site reported for the global model it received."""
    run = ws / SERVER_RUN
    final: dict = {}
    cross_val = run / "cross_site_val" / "cross_val_results.json"
    if cross_val.is_file():
        for site, by_model in json.loads(cross_val.read_text()).items():
            if by_model:
                final[site] = next(iter(by_model.values()))
    sites = {s: {k: v for k, v in m.items() if not k.startswith(f"{POOLED}_")} for s, m in sorted(final.items())}
    pooled = {s: {k[len(POOLED) + 1:]: v for k, v in m.items() if k.startswith(f"{POOLED}_")} for s, m in final.items()}
    rounds = []
    rounds_file = run / "metrics" / "round_metrics.jsonl"
    if rounds_file.is_file():
        for line in rounds_file.read_text().splitlines():
            rec = json.loads(line)
            rounds.append({"round": rec["round"],
                           "sites": {s["name"]: {m["name"]: m["value"] for m in s["metrics"]} for s in rec["sites"]}})
    return {"sites": sites, "pooled_reported": pooled, "rounds": rounds, **round_timings(ws / "server" / "log.txt")}


_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - .*?"
_EVENTS = {
    "round_start": re.compile(_STAMP + r"Round (\d+) started"),
    "round_end": re.compile(_STAMP + r"Round (\d+) finished"),
    "agg_start": re.compile(_STAMP + r"Start aggregation"),
    "agg_end": re.compile(_STAMP + r"End aggregation"),
}


def round_timings(server_log: Path) -> dict:
    """Per-round wall time and server aggregation time (seconds) from the server's log."""
    starts, rounds, agg_start, aggs = {}, [], None, []
    try:
        lines = server_log.read_text().splitlines()
    except OSError:
        return {"round_time_s": [], "aggregation_time_s": []}
    for line in lines:
        for kind, pattern in _EVENTS.items():
            m = pattern.match(line)
            if not m:
                continue
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if kind == "round_start":
                starts[int(m.group(2))] = t
            elif kind == "round_end" and int(m.group(2)) in starts:
                rounds.append(t - starts[int(m.group(2))])
            elif kind == "agg_start":
                agg_start = t
            elif kind == "agg_end" and agg_start is not None:
                aggs.append(t - agg_start)
                agg_start = None
    return {"round_time_s": rounds, "aggregation_time_s": aggs}


def load_site_model(ws: Path, cfg: ExperimentConfig, site: str) -> torch.nn.Module:
    """The final global model as ``site`` decrypted and stored it in its own workspace."""
    found = sorted((Path(ws) / site / MODELS_DIR).glob(f"*/{FINAL_MODEL_FILE}"))
    if len(found) != 1:
        raise MonaiFLError(f"expected one {MODELS_DIR}/<job>/{FINAL_MODEL_FILE} under {Path(ws) / site}, found "
                           f"{len(found)}: {site} did not receive the final global model")
    path = found[0]
    model = ConfiguredNetwork(cfg.to_dict())
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
