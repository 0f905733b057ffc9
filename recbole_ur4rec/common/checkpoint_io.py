"""Safe checkpoint files: tensors and plain data only, written atomically, read with ``weights_only=True``.

The bottom of the package: models, trainers, tuning and compare read and write checkpoints through this module,
which imports nothing of the plugin.
"""
import glob
import io
import os
import pickle
import re

import torch

CHECKPOINT_FORMAT = "recbole_ur4rec.checkpoint/1"
# Settings the plugin makes absolute (the data root, the checkpoint folder): a checkpoint stores them relative to
# its own folder and gets them back absolute when read, so a folder of data and checkpoints (a committed search, a
# copied results tree) reads the same wherever it lies and holds no path of the machine that wrote it.
FOLDER_RELATIVE_SETTINGS = ("data_path", "checkpoint_dir")
RELATIVE_SETTINGS_KEY = "config_relative_to_file"  # the settings stored relative to the file's folder


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, unsafe or does not match the model."""


def save_checkpoint(state, path):
    """Write ``state`` (tensors, numbers, strings, lists and dicts only) to ``path`` atomically."""
    state = dict(state, format=CHECKPOINT_FORMAT)
    directory = os.path.dirname(os.path.abspath(path))
    if isinstance(state.get("config"), dict):
        state["config"], state[RELATIVE_SETTINGS_KEY] = _relative_settings(state["config"], directory)
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
    folder = os.path.dirname(os.path.abspath(path))
    for key in state.pop(RELATIVE_SETTINGS_KEY, None) or []:
        state["config"][key] = os.path.normpath(os.path.join(folder, state["config"][key]))
    return state


def newest_resume_file(folder):
    """The newest ``-last.pth`` (a run's resume state) in ``folder``; None when there is none."""
    lasts = glob.glob(os.path.join(folder, "*-last.pth"))
    return max(lasts, key=os.path.getmtime) if lasts else None


def resolve_checkpoint_path(path, seed, key="checkpoint"):
    """``path`` with ``{seed}`` replaced by ``seed``; a folder stands for the one best checkpoint in it (its ``*.pth``
    other than ``*-last.pth``, e.g. a comparison cell's checkpoint folder). ``key`` names the setting in errors."""
    path = path.replace("{seed}", str(seed))
    if not os.path.isdir(path):
        return path
    found = sorted(f for f in glob.glob(os.path.join(path, "*.pth")) if not f.endswith("-last.pth"))
    if len(found) != 1:
        raise CheckpointError(
            f"{key} {path} is a folder, so it must hold exactly one best checkpoint (*.pth other than "
            f"*-last.pth); found {len(found)}: {', '.join(os.path.basename(f) for f in found) or 'none'}"
        )
    return found[0]


def load_module_weights(module, path, key, dataset_name=None, prefix="backbone.", advice="", state=None):
    """Load the ``prefix`` tensors of the plugin checkpoint ``path`` (the setting ``key``; ``state``: the file already
    read) into ``module`` (the model's submodule of that name: ``backbone.`` -> its backbone).

    Raises:
        CheckpointError: the file is missing or corrupt, was trained on another dataset, or its ``prefix`` tensors
            do not match ``module``'s names and shapes (all of them are named, then ``advice``).
    """
    state = load_checkpoint(path, map_location="cpu") if state is None else state
    if dataset_name is not None and state.get("dataset") not in (None, dataset_name):
        raise CheckpointError(f"{key} {path} was trained on dataset {state['dataset']!r}, not {dataset_name!r}")
    weights = {name[len(prefix) :]: t for name, t in state.get("state_dict", {}).items() if name.startswith(prefix)}
    own = module.state_dict()
    problems = []
    missing = sorted(set(own) - set(weights))
    if missing:
        problems.append("missing " + ", ".join(prefix + name for name in missing))
    unexpected = sorted(set(weights) - set(own))
    if unexpected:
        problems.append("unexpected " + ", ".join(prefix + name for name in unexpected))
    mismatched = [
        f"{prefix}{name} {tuple(weights[name].shape)} in the file, {tuple(own[name].shape)} here"
        for name in sorted(set(own) & set(weights))
        if weights[name].shape != own[name].shape
    ]
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched))
    if problems:
        raise CheckpointError(
            f"{key} {path} (model {state.get('model')!r}) does not fit this model's {prefix.rstrip('.')}: "
            + " | ".join(problems) + (f". {advice}" if advice else "")
        )
    module.load_state_dict(weights)


def run_best(state):
    """``(score, metrics)`` of the best validation of the run whose resume (``-last.pth``) ``state`` this is; files
    written before the run's best was kept beside early stopping's: a staged trainer's own copy, else early stopping's."""
    for kept in (state, state.get("staged") or {}):
        if "run_best_score" in kept:
            return kept["run_best_score"], kept["run_best_result"]
    return state["best_valid_score"], state["best_valid_result"]


def _relative_settings(config, folder):
    """``config`` with its absolute FOLDER_RELATIVE_SETTINGS made relative to ``folder``, and the keys it changed."""
    config, changed = dict(config), []
    for key in FOLDER_RELATIVE_SETTINGS:
        value = config.get(key)
        if isinstance(value, str) and os.path.isabs(value):
            config[key] = os.path.relpath(value, folder)
            changed.append(key)
    return config, changed
