"""Dataset creation and splitting: RecBole's pipeline without its pickle caches, and a lean data path for the
plugin's sequential models (see :mod:`recbole_ur4rec.data.sequence_dataset`)."""
import importlib
import os
from logging import getLogger

from recbole.data.utils import create_samplers, get_dataloader
from recbole.sampler import KGSampler
from recbole.utils import ModelType, set_color

from recbole_ur4rec.common.checks import check_config_value
from recbole_ur4rec.data.atomic import check_dataset_files
from recbole_ur4rec.data.cold_items import withhold_cold_items
from recbole_ur4rec.data.dataloader import EarlierItemsEvalDataLoader, PrefixTrainDataLoader, rank_loader, training_items
from recbole_ur4rec.data.sequence_dataset import (
    LOSS_POSITIONS,
    SequenceHistoryDataset,
    build_prefix_train_dataset,
    build_window_train_dataset,
)
from recbole_ur4rec.evaluation.slices import training_counts

MODEL_TYPE_DATASETS = {
    ModelType.GENERAL: "Dataset",
    ModelType.SEQUENTIAL: "SequentialDataset",
    ModelType.CONTEXT: "Dataset",
    ModelType.KNOWLEDGE: "KnowledgeBasedDataset",
    ModelType.TRADITIONAL: "Dataset",
    ModelType.DECISIONTREE: "Dataset",
}


def uses_history_path(config):
    """Whether ``config``'s model is one of the plugin's sequential models (they take the lean data path)."""
    plugin = config.model_class.__module__.startswith("recbole_ur4rec.model")  # the class Config resolved
    return config["MODEL_TYPE"] == ModelType.SEQUENTIAL and plugin


def dataset_class(config):
    """The dataset class RecBole's ``create_dataset`` would pick, or SequenceHistoryDataset for plugin models."""
    if uses_history_path(config):
        if config["benchmark_filename"] is not None:
            raise ValueError(
                f"{config['model']} builds its splits from the interactions (eval_args.split) and does not read "
                f"pre-split files: remove benchmark_filename ({config['benchmark_filename']})"
            )
        return SequenceHistoryDataset
    module = importlib.import_module("recbole.data.dataset")
    return getattr(module, config["model"] + "Dataset", None) or getattr(module, MODEL_TYPE_DATASETS[config["MODEL_TYPE"]])


def refuse_pickled_caches(config, class_name):
    """RecBole unpickles saved datasets and dataloaders (a pickle runs code when loaded); the plugin never does.

    Raises:
        ValueError: the config asks to save or to load such a file.
    """
    for key in ("save_dataset", "save_dataloaders", "dataset_save_path", "dataloaders_save_path"):
        if config[key]:
            raise ValueError(
                f"config key {key!r} = {config[key]!r}: recbole_ur4rec does not save or load RecBole's pickled "
                f"datasets and dataloaders (loading a pickle runs code); remove the key, the data are rebuilt from "
                f"the atomic files"
            )
    caches = (f"{config['dataset']}-{class_name}.pth", f"{config['dataset']}-for-{config['model']}-dataloader.pth")
    for name in caches:
        path = os.path.join(config["checkpoint_dir"], name)
        if os.path.exists(path):
            getLogger().warning(
                f"ignored {path}: RecBole's pickled data cache is never loaded by recbole_ur4rec (a pickle runs "
                f"code when loaded); the data are rebuilt from the atomic files"
            )


def create_dataset(config):
    """RecBole's dataset for ``config`` (filtering, id remapping), after checking its atomic files.

    Unlike RecBole's ``create_dataset``, it never loads a pickled dataset from ``checkpoint_dir``. With
    ``cold_items: True`` the cold items' interactions are withheld (:mod:`recbole_ur4rec.data.cold_items`).
    """
    check_dataset_files(config)
    cls = dataset_class(config)
    refuse_pickled_caches(config, cls.__name__)
    dataset = cls(config)
    if check_config_value(config, "cold_items", None, choices=(True, False)):
        withhold_cold_items(dataset, config)
    return dataset


def full_ranking(config):
    """Whether every evaluation phase ranks all items (RecBole's Config holds ``eval_args.mode`` as {phase: mode})."""
    return all(mode == "full" for mode in config["eval_args"]["mode"].values())


def _mask_sequence_history(config):
    """Whether evaluation removes each user's earlier items from the ranking (``mask_sequence_history``): sequential
    models, full ranking, leave-one-out (no effect on other model types, which have ``mask_history_items``)."""
    if not check_config_value(config, "mask_sequence_history", None, choices=(True, False)):
        return False
    if config["MODEL_TYPE"] != ModelType.SEQUENTIAL:
        return False
    if not full_ranking(config) or "LS" not in config["eval_args"]["split"]:
        raise ValueError(
            f"mask_sequence_history: True needs full ranking and leave-one-out (eval_args mode full, split LS); got "
            f"mode {config['eval_args']['mode']}, split {config['eval_args']['split']}: with other splits an evaluated "
            f"row's item list can miss earlier evaluation items"
        )
    return True


def _check_history_config(config):
    loss_position = check_config_value(config, "loss_position", None, choices=LOSS_POSITIONS)
    if loss_position == "all" and config["train_neg_sample_args"]["distribution"] != "none":
        raise ValueError(
            f"train_neg_sample_args must be ~ with loss_position: all (got {config['train_neg_sample_args']}): "
            f"whole-sequence rows are not negative-sampled by RecBole's sampler; the model samples its own "
            f"negatives (see neg_sample_num)"
        )
    return loss_position


def data_preparation(config, dataset):
    """Split ``dataset`` and build (train, valid, test) dataloaders; evaluation stays RecBole's.

    RecBole's models get RecBole's splits and loaders. The plugin's sequential models
    (:class:`~recbole_ur4rec.data.sequence_dataset.SequenceHistoryDataset`) are trained on whole training histories
    (``loss_position: all``: one row per user, windows of ``MAX_ITEM_LIST_LENGTH``) or on RecBole's prefix rows
    gathered per batch (``loss_position: last``). Saved dataloaders are never loaded (see :func:`create_dataset`).
    In a distributed run each rank's loaders hold its share of each training batch and its whole evaluation batches
    (:func:`~recbole_ur4rec.data.dataloader.rank_loader`).
    """
    logger = getLogger()
    mask_earlier = _mask_sequence_history(config)
    built_datasets = dataset.build()
    train_dataset, valid_dataset, test_dataset = built_datasets
    train_sampler, valid_sampler, test_sampler = create_samplers(config, dataset, built_datasets)

    train_loader = get_dataloader(config, "train")
    if isinstance(dataset, SequenceHistoryDataset):
        if _check_history_config(config) == "all":
            train_dataset = build_window_train_dataset(config, train_dataset)
            rows = f"whole-sequence rows (loss_position: all): {len(train_dataset)} rows of at most"
        else:
            train_dataset = build_prefix_train_dataset(config, train_dataset, dataset.user_order)
            train_loader = PrefixTrainDataLoader
            rows = f"prefix rows gathered per batch (loss_position: last): {len(train_dataset)} rows of at most"
        logger.info(
            set_color("[Training]: ", "pink") + f"{rows} {config['MAX_ITEM_LIST_LENGTH']} positions, "
            f"{int(train_dataset.inter_feat[train_dataset.item_list_length_field].sum())} supervised positions"
        )

    valid_loader, test_loader = get_dataloader(config, "valid"), get_dataloader(config, "test")
    if mask_earlier:
        valid_loader = test_loader = EarlierItemsEvalDataLoader
    if not config["single_spec"]:
        train_loader = rank_loader(train_loader, training=True)
        valid_loader, test_loader = rank_loader(valid_loader, training=False), rank_loader(test_loader, training=False)
    if config["MODEL_TYPE"] == ModelType.KNOWLEDGE:
        kg_sampler = KGSampler(
            dataset, config["train_neg_sample_args"]["distribution"], config["train_neg_sample_args"]["alpha"]
        )
        train_data = train_loader(config, train_dataset, train_sampler, kg_sampler, shuffle=True)
    else:
        train_data = train_loader(config, train_dataset, train_sampler, shuffle=config["shuffle"])
    valid_data = valid_loader(config, valid_dataset, valid_sampler, shuffle=False)
    test_data = test_loader(config, test_dataset, test_sampler, shuffle=False)
    if mask_earlier:
        earlier = training_items(built_datasets[0])
        valid_data.set_training_items(*earlier)
        test_data.set_training_items(*earlier)
    counts = training_counts(built_datasets[0], getattr(dataset, "cold_items", None))  # for the evaluation slices
    valid_data.training_counts = test_data.training_counts = counts

    for phase, batch_key, args_key in (
        ("[Training]: ", "train_batch_size", "train_neg_sample_args"),
        ("[Evaluation]: ", "eval_batch_size", "eval_args"),
    ):  # RecBole's two log lines
        logger.info(
            set_color(phase, "pink") + set_color(batch_key, "cyan") + " = " + set_color(f"[{config[batch_key]}]", "yellow")
            + set_color(f" {args_key}", "cyan") + ": " + set_color(f"[{config[args_key]}]", "yellow")
        )
    return train_data, valid_data, test_data
