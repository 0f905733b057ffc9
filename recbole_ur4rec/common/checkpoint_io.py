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
