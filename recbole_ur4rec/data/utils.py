"""Dataset creation and splitting: RecBole's pipeline, with the plugin's training-row layouts."""
from recbole.data import create_dataset as recbole_create_dataset
from recbole.data import data_preparation as recbole_data_preparation

from recbole_ur4rec.data.atomic import check_dataset_files


def create_dataset(config):
    """RecBole's ``create_dataset`` (filtering, id remapping) for ``config``, after checking its atomic files."""
    check_dataset_files(config)
    return recbole_create_dataset(config)


def data_preparation(config, dataset):
    """Split ``dataset`` and build (train, valid, test) dataloaders; evaluation stays RecBole's full sort."""
    return recbole_data_preparation(config, dataset)
