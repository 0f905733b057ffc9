"""Shared fixtures: tiny RecBole atomic datasets written to a temporary folder."""
import os

import numpy as np
import pytest

# One thread: tests then behave the same on laptops and on a shared 2-core CI machine, where a second thread
# that loses its core stalls every small kernel.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def write_sequential_dataset(root, name="tiny", n_users=60, n_items=40, min_len=12, max_len=30, seed=0):
    """Write ``<root>/<name>/<name>.inter`` where each user walks the items in order: item k is followed by k+1.

    Item tokens are non-contiguous strings (``i7``, ``i10``, ...) so nothing can rely on ids being positions.
    Returns the data root to pass as ``data_path``.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(str(root), name)
    os.makedirs(folder, exist_ok=True)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for user in range(n_users):
        start = int(rng.integers(n_items))
        length = int(rng.integers(min_len, max_len + 1))
        for step in range(length):
            item = (start + step) % n_items
            lines.append(f"u{user}\ti{3 * item + 7}\t{1 + (item % 5)}\t{1_000_000 + 1000 * user + step}")
    with open(os.path.join(folder, f"{name}.inter"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(root)


@pytest.fixture
def tiny_data_root(tmp_path):
    """Data root holding the ``tiny`` sequential dataset."""
    return write_sequential_dataset(tmp_path / "data")


# A tiny sequential model on ``tiny``: the settings the model tests share
TINY_MODEL = {
    "show_progress": False,
    "hidden_size": 16,
    "inner_size": 32,
    "n_layers": 1,
    "n_heads": 1,
    "MAX_ITEM_LIST_LENGTH": 20,
    "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    "state": "WARNING",
    "seed": 7,
}


@pytest.fixture
def quick_config(tiny_data_root, tmp_path):
    """config_dict for a fast, deterministic run on ``tiny`` that writes only under ``tmp_path``."""
    return {
        **TINY_MODEL,
        "data_path": tiny_data_root,
        "checkpoint_dir": str(tmp_path / "saved"),
        "epochs": 3,
        "train_batch_size": 256,
        "eval_batch_size": 256,
    }


@pytest.fixture(autouse=True)
def run_in_tmp(tmp_path, monkeypatch):
    """RecBole writes ./log and ./log_tensorboard: keep them out of the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def walk_root(tmp_path_factory):
    """Data root holding the ``walk`` dataset of the tuning and comparison tests (written once per module)."""
    from tune_fixtures import write_walk_dataset

    return write_walk_dataset(tmp_path_factory.mktemp("data"))
