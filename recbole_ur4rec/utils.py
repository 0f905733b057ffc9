"""Model and trainer lookup (plugin first, then RecBole) and safe checkpoint I/O."""
import importlib
import importlib.util
import inspect
import io
import os
import pickle
import re

import torch
from recbole.model.abstract_recommender import AbstractRecommender
from recbole.utils import get_trainer as recbole_get_trainer

PLUGIN_MODEL_MODULE = "recbole_ur4rec.model"
PLUGIN_TRAINER_MODULE = "recbole_ur4rec.trainer"
CHECKPOINT_FORMAT = "recbole_ur4rec.checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, unsafe or does not match the model."""


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
    from recbole_ur4rec.trainer import SafeCheckpointMixin

    module = importlib.import_module(PLUGIN_TRAINER_MODULE)
    trainer_class = getattr(module, model_name + "Trainer", None)
    if trainer_class is None:
        trainer_class = recbole_get_trainer(model_type, model_name)
    if issubclass(trainer_class, SafeCheckpointMixin):
        return trainer_class
    return type(trainer_class.__name__, (SafeCheckpointMixin, trainer_class), {})


def save_checkpoint(state, path):
    """Write ``state`` (tensors, numbers, strings, lists and dicts only) to ``path`` atomically."""
    state = dict(state, format=CHECKPOINT_FORMAT)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp_path = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp_path)
    os.replace(tmp_path, path)


def load_checkpoint(path, map_location="cpu"):
    """Load a plugin checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: the file is missing, corrupt, holds pickled Python objects (refused, never
            executed) or was not written by recbole_ur4rec.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with open(path, "rb") as f:
            state = torch.load(io.BytesIO(f.read()), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if unsafe is None:
            raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file: unreadable pickle stream") from None
        raise CheckpointError(
            f"checkpoint {path} holds pickled Python objects ({unsafe.group(1)}), which recbole_ur4rec refuses "
            f"to load: only tensors and plain data are accepted (RecBole's own checkpoints pickle the Config)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file: {err}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"checkpoint {path} is not a recbole_ur4rec checkpoint "
            f"(expected format {CHECKPOINT_FORMAT!r}, found {found!r})"
        )
    return state
