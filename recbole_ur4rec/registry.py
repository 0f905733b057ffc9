"""Model and trainer lookup: the plugin's first, then RecBole's (with the plugin's safe checkpointing)."""
import importlib
import importlib.util
import inspect
import os

import torch
from recbole.model.abstract_recommender import AbstractRecommender
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_ur4rec.trainer import SafeCheckpointMixin

PLUGIN_MODEL_MODULE = "recbole_ur4rec.model"
PLUGIN_TRAINER_MODULE = "recbole_ur4rec.trainer"


def plugin_models():
    """Names of the models this plugin provides, sorted."""
    module = importlib.import_module(PLUGIN_MODEL_MODULE)
    return sorted(
        name
        for name, obj in vars(module).items()
        if inspect.isclass(obj) and issubclass(obj, AbstractRecommender) and obj.__module__.startswith(PLUGIN_MODEL_MODULE)
    )


def get_model(model_name):
    """Return the model class named ``model_name``: the plugin's first, then RecBole's.

    Raises:
        ValueError: if neither the plugin nor RecBole has a model of that name.
    """
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model name must be a non-empty string, got {model_name!r}")
    module = importlib.import_module(PLUGIN_MODEL_MODULE)
    if model_name in plugin_models():
        return getattr(module, model_name)
    # look for RecBole's model file without importing packages whose optional dependencies may be missing
    recbole_model_dir = os.path.dirname(importlib.util.find_spec("recbole.model").origin)
    for submodule in sorted(os.listdir(recbole_model_dir)):
        if os.path.isfile(os.path.join(recbole_model_dir, submodule, model_name.lower() + ".py")):
            anomaly_before = torch.is_anomaly_enabled()
            module = importlib.import_module(f"recbole.model.{submodule}.{model_name.lower()}")
            # recbole/model/sequential_recommender/sine.py turns anomaly detection on for the whole process
            torch.autograd.set_detect_anomaly(anomaly_before)
            if hasattr(module, model_name):
                return getattr(module, model_name)
    raise ValueError(
        f"unknown model {model_name!r}: it is neither a recbole_ur4rec model "
        f"(available: {', '.join(plugin_models()) or 'none'}) nor a RecBole 1.2.1 model "
        f"(see recbole/model/*_recommender/)"
    )


def get_trainer(model_type, model_name):
    """Return the trainer class for a model, with the plugin's safe checkpointing.

    Looks for ``<model_name>Trainer`` in the plugin, then asks RecBole; a RecBole trainer is
    wrapped in :class:`~recbole_ur4rec.trainer.SafeCheckpointMixin` so that its checkpoints hold
    tensors and plain data only.
    """
    module = importlib.import_module(PLUGIN_TRAINER_MODULE)
    trainer_class = getattr(module, model_name + "Trainer", None)
    if trainer_class is None:
        trainer_class = recbole_get_trainer(model_type, model_name)
    if issubclass(trainer_class, SafeCheckpointMixin):
        return trainer_class
    return type(trainer_class.__name__, (SafeCheckpointMixin, trainer_class), {})
