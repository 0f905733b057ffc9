"""Dataset creation and splitting: RecBole's pipeline, with the plugin's training-row layouts."""
from logging import getLogger

from recbole.data import create_dataset as recbole_create_dataset
from recbole.data import data_preparation as recbole_data_preparation
from recbole.data.dataloader import TrainDataLoader
from recbole.utils import ModelType, set_color

from recbole_ur4rec.data.atomic import check_dataset_files
from recbole_ur4rec.data.sequence_dataset import build_sequence_train_dataset

LOSS_POSITIONS = ("all", "last")


def create_dataset(config):
    """RecBole's ``create_dataset`` (filtering, id remapping) for ``config``, after checking its atomic files."""
    check_dataset_files(config)
    return recbole_create_dataset(config)


def data_preparation(config, dataset):
    """Split ``dataset`` and build (train, valid, test) dataloaders; evaluation stays RecBole's full sort.

    A sequential model whose config sets ``loss_position: all`` is trained on whole training histories
    (one row per user, windows of ``MAX_ITEM_LIST_LENGTH``; see :mod:`recbole_ur4rec.data.sequence_dataset`);
    ``loss_position: last`` and models without the key keep RecBole's one-row-per-prefix training data.
    """
    train_data, valid_data, test_data = recbole_data_preparation(config, dataset)
    loss_position = config["loss_position"]
    if loss_position is None or loss_position == "last":
        return train_data, valid_data, test_data
    if loss_position not in LOSS_POSITIONS:
        raise ValueError(f"loss_position must be one of {', '.join(LOSS_POSITIONS)}, got {loss_position!r}")
    if config["MODEL_TYPE"] != ModelType.SEQUENTIAL:
        raise ValueError(f"loss_position: all needs a sequential model, but {config['model']} is {config['MODEL_TYPE'].name}")
    if config["train_neg_sample_args"]["distribution"] != "none":
        raise ValueError(
            f"train_neg_sample_args must be ~ with loss_position: all (got {config['train_neg_sample_args']}): "
            f"whole-sequence rows are not negative-sampled by RecBole's sampler; the model samples its own "
            f"negatives (see neg_sample_num)"
        )
    if config["benchmark_filename"] is not None:
        raise ValueError(
            f"loss_position: all builds its rows from RecBole's leave-one-out split and does not support "
            f"benchmark_filename ({config['benchmark_filename']}); remove benchmark_filename or use loss_position: last"
        )
    train_dataset = build_sequence_train_dataset(config, train_data._dataset)
    train_data = TrainDataLoader(config, train_dataset, train_data._sampler, shuffle=config["shuffle"])
    getLogger().info(
        set_color("[Training]: ", "pink")
        + f"whole-sequence rows (loss_position: all): {len(train_dataset)} rows of at most "
        f"{config['MAX_ITEM_LIST_LENGTH']} positions, "
        f"{int(train_dataset.inter_feat[train_dataset.item_list_length_field].sum())} supervised positions"
    )
    return train_data, valid_data, test_data
