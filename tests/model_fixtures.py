"""Building a model the way the quick start does, and comparing its parameters, for the model tests."""
import torch
from recbole.utils import init_seed

from recbole_ur4rec.config import Config
from recbole_ur4rec.data import create_dataset, data_preparation
from recbole_ur4rec.registry import get_model


def build_model(model, dataset, config_dict):
    """(config, model, train_data, valid_data, test_data): seeded, data split, model initialised on the train split."""
    config = Config(model=model, dataset=dataset, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    train_data, valid_data, test_data = data_preparation(config, create_dataset(config))
    return config, get_model(model)(config, train_data._dataset), train_data, valid_data, test_data


def snapshot(model):
    """A detached copy of every parameter, by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed_groups(model, before):
    """Groups with at least one parameter that differs from ``before``; untouched ones are bit-identical."""
    group_of = {id(p): group for group, params in model.parameter_groups().items() for p in params}
    return {group_of[id(p)] for name, p in model.named_parameters() if not torch.equal(before[name], p)}
