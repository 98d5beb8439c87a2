"""Build the NVFlare job (FedAvg, plaintext or HE) from one experiment config.

The job folder under ``jobs/`` is an export of :func:`build_job`; ``monai-fl export-jobs`` writes it
and a test checks the committed folder equals a fresh export, so there is one source of truth.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

from monai_fl.config import ExperimentConfig

SITE_SCRIPT = Path(__file__).with_name("templates") / "monai_fl_site.py"
JOB_CONFIG_NAME = "experiment.json"  # JSON: `nvflare job submit` would parse YAML with omegaconf
PERSISTOR_ID = "persistor"


def he_params(cfg: ExperimentConfig):
    """The HE codec parameters of an experiment (the codec's defaults plus ``fl.he_codec``)."""
    from monai_fl.he.codec import CodecParams

    return CodecParams.from_dict(cfg.fl.he_codec)


def build_job(
    cfg: ExperimentConfig,
    name: str | None = None,
    he: bool | None = None,
    config_file: Path | None = None,
    client_context_file: str | None = None,
):
    """A ``BaseFedJob``: ScatterAndGather FedAvg over ``cfg.fl.rounds`` rounds, then one evaluation
    of the final global model at every site (GlobalModelEval).

    Args:
        cfg: the experiment; shipped with the job as ``experiment.json`` beside the site script.
        name: job name (default: the experiment name, ``_he`` added when encrypted).
        he: attach homomorphic encryption (default ``cfg.fl.he``).
        config_file: where to write the shipped config (a temp file if None).
        client_context_file: HE only: where sites load their secret context from (default: the
            startup-kit file name, as provisioned kits have it).
    """
    from nvflare.apis.dxo import DataKind
    from nvflare.app_common.aggregators.intime_accumulate_model_aggregator import InTimeAccumulateWeightedAggregator
    from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator
    from nvflare.app_common.workflows.global_model_eval import GlobalModelEval
    from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather
    from nvflare.app_opt.pt.file_model_locator import PTFileModelLocator
    from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
    from nvflare.app_opt.pt.job_config.base_fed_job import BaseFedJob
    from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor

    from monai_fl.fl.model import ConfiguredNetwork

    he = cfg.fl.he if he is None else he
    n_sites = cfg.partition.n_sites
    min_clients = cfg.fl.min_clients or n_sites
    job = BaseFedJob(name=name or (cfg.name + ("_he" if he else "_plain")), min_clients=min_clients,
                     key_metric="")  # no best-model selection: it would select on the test shards
    # Sites run the installed monai_fl package; the job ships only its entry script and config.
    job.set_app_packages(["monai_fl"])

    network = ConfiguredNetwork(cfg.to_dict())
    if he:
        from monai_fl.he.nvflare_components import attach_he

        extra = {"client_context_file": client_context_file} if client_context_file else {}
        # The codec's field headroom bounds the total FedAvg weight per round; sharing it among the
        # job's sites (not the codec's default of 8) keeps each site's weight uncapped.
        attach_he(job, params=he_params(cfg), network=network, persistor_id=PERSISTOR_ID, max_sites=n_sites, **extra)
    else:
        job.to_server(PTFileModelPersistor(model=network), id=PERSISTOR_ID)
        job.to_server(FullModelShareableGenerator(), id="shareable_generator")
        job.to_server(InTimeAccumulateWeightedAggregator(expected_data_kind=DataKind.WEIGHTS), id="aggregator")
    job.to_server(PTFileModelLocator(pt_persistor_id=PERSISTOR_ID), id="model_locator")
    job.to_server(ScatterAndGather(min_clients=min_clients, num_rounds=cfg.fl.rounds, wait_time_after_min_received=0,
                                   aggregator_id="aggregator", persistor_id=PERSISTOR_ID,
                                   shareable_generator_id="shareable_generator"))
    job.to_server(GlobalModelEval(model_locator_id="model_locator"))

    if config_file is None:
        config_file = Path(tempfile.mkdtemp(prefix="monai_fl_job_")) / JOB_CONFIG_NAME
    cfg.save(config_file)
    # In-process Client API executor; the script is found by name in the app's custom folder.
    job.to_clients(ClientAPIExecutor(execution_mode="in_process", task_script_path=SITE_SCRIPT.name,
                                     task_script_args=f"--config {JOB_CONFIG_NAME}",
                                     params_exchange_format="pytorch", server_expected_format="pytorch"))
    # Staged beside the config so both land flat in the app's custom folder.
    staged_script = shutil.copy(SITE_SCRIPT, Path(config_file).parent / SITE_SCRIPT.name)
    job.to_clients(str(staged_script))
    job.to_clients(str(config_file))
    return job


def export_job(
    cfg: ExperimentConfig,
    out_dir: Path,
    he: bool | None = None,
    name: str | None = None,
    client_context_file: str | None = None,
) -> Path:
    """Write the NVFlare job folder (``<out_dir>/<job name>``) for ``cfg``; returns its path."""
    out_dir = Path(out_dir).resolve()
    # NVFlare names an absolute resource after the sys.path entry that contains it, which depends on
    # the caller; relative names from inside the staging folder land flat in custom/ every time.
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        job = build_job(cfg, name=name, he=he, config_file=Path(JOB_CONFIG_NAME),
                        client_context_file=client_context_file)
        target = out_dir / job.name
        if target.exists():
            shutil.rmtree(target)
        job.export_job(str(out_dir))
    for config in (target / "app" / "config").glob("*.json"):
        _sort_task_lists(config)
    return target


def _sort_task_lists(path: Path) -> None:
    """NVFlare keeps a filter's tasks in a set, so their order follows string hashing; sort them
    so an export is byte-identical from run to run."""

    def visit(node):
        if isinstance(node, dict):
            return {k: sorted(v) if k == "tasks" and all(isinstance(t, str) for t in v) else visit(v)
                    for k, v in node.items()}
        if isinstance(node, list):
            return [visit(v) for v in node]
        return node

    path.write_text(json.dumps(visit(json.loads(path.read_text())), indent=4))
