"""The one recipe every entry point builds a run with (quick start, the Flower node, bench and tests).

Config -> threads -> seed -> logger -> anomaly mode -> dataset and splits -> reseed (``seed + rank``) -> model,
as RecBole's ``run_recbole`` orders it, so a model's initial weights depend on the seed only, not on how much
randomness building the data consumed.
"""
import sys
from logging import getLogger
from typing import NamedTuple

import torch
from recbole.utils import ModelType, init_logger, init_seed

from recbole_ur4rec.common import distributed
from recbole_ur4rec.common.checks import check_config_value
from recbole_ur4rec.config import Config
from recbole_ur4rec.data import create_dataset, data_preparation, full_ranking
from recbole_ur4rec.federated.catalog import federation_data
from recbole_ur4rec.registry import get_model

_anomaly_switch_logged = False


def set_anomaly_detection(enabled):
    """Set torch's autograd anomaly detection to ``enabled`` (config key ``detect_anomaly``).

    Importing RecBole's sequential models turns it on for the whole process
    (``recbole/model/sequential_recommender/sine.py``), which makes training about 1.3x slower; switching it off
    is logged once per process.
    """
    global _anomaly_switch_logged
    if torch.is_anomaly_enabled() and not enabled and not _anomaly_switch_logged:
        _anomaly_switch_logged = True
        getLogger().info(
            "switched off torch's autograd anomaly detection, which importing RecBole's sequential models turns on "
            "for the whole process (set detect_anomaly: True to keep it)"
        )
    torch.autograd.set_detect_anomaly(bool(enabled))


def set_threads(config):
    """Run torch and FAISS on config ``threads`` threads (~: their defaults)."""
    if config["threads"]:
        import faiss  # FTRagRec's index searches run on FAISS's OpenMP threads

        torch.set_num_threads(config["threads"])
        faiss.omp_set_num_threads(config["threads"])


def history_masked(config):
    """Whether full-ranking evaluation removes each user's training items from the ranking: RecBole does so for
    general models (config ``mask_history_items``, default True); sequential models only with
    ``mask_sequence_history: True`` (their earlier items)."""
    full = full_ranking(config)
    if config["MODEL_TYPE"] == ModelType.SEQUENTIAL:
        return full and config["mask_sequence_history"] is True
    return full and config["mask_history_items"] is not False


def unmask_history(loader):
    """Make a general model's full-sort loader mask nothing: every user's history becomes empty."""
    history = getattr(loader, "uid2history_item", None)
    if history is None:
        return
    empty = torch.zeros(0, dtype=torch.int64)
    for uid in range(len(history)):
        history[uid] = empty


class Run(NamedTuple):
    """What :func:`build` returns (in RecBole's order of ``load_data_and_model``, model second)."""

    config: Config
    model: torch.nn.Module
    dataset: object
    train_data: object
    valid_data: object
    test_data: object


def build(model, dataset, config_file_list=None, config_dict=None, log=True):
    """Config, data and an initialised model of ``model`` on ``dataset``.

    Args:
        log (bool): start RecBole's logger (a log file per run) and log the config, dataset and model; bench and
            tests pass False.
    """
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    set_threads(config)
    init_seed(config["seed"], config["reproducibility"])
    if log:
        with distributed.first_on_each_machine(config["local_rank"]):  # RecBole creates its log folders unguarded
            init_logger(config)
    set_anomaly_detection(config["detect_anomaly"])
    logger = getLogger()
    if log:
        logger.info(sys.argv)
        logger.info(config)

    if config["federation_dir"]:  # a federated server: the interactions stay on the nodes
        if check_config_value(config, "mask_sequence_history", None, choices=(True, False)):
            raise ValueError(
                "mask_sequence_history: True is not supported with federation_dir (the nodes evaluate their users with "
                "RecBole's sequential protocol); remove one of the two"
            )
        dataset, train_data, valid_data, test_data = federation_data(config)
    else:
        dataset = create_dataset(config)
        if log:
            logger.info(dataset)
        train_data, valid_data, test_data = data_preparation(config, dataset)
        if not history_masked(config):
            for loader in (valid_data, test_data):
                unmask_history(loader)

    init_seed(config["seed"] + distributed.rank(), config["reproducibility"])  # a distributed run's global rank
    model = get_model(config["model"])(config, getattr(train_data, "_dataset", dataset)).to(config["device"])
    if log:
        logger.info(model)
    return Run(config, model, dataset, train_data, valid_data, test_data)
