"""Helpers for the tuning and comparison tests: a tiny sequential dataset and quick settings."""
import csv
import os

import numpy as np


def write_walk_dataset(root, name="walk", n_users=40, n_items=30, min_len=10, max_len=20, seed=0):
    """Write ``<root>/<name>/<name>.inter``: each user walks the items in order (item k is followed by k+1).

    Item tokens are non-contiguous strings. Returns ``root`` (the ``data_path`` to give RecBole).
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(str(root), name)
    os.makedirs(folder, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for user in range(n_users):
        start = int(rng.integers(n_items))
        for step in range(int(rng.integers(min_len, max_len + 1))):
            lines.append(f"u{user}\ti{5 * ((start + step) % n_items) + 2}\t{1_000_000 + 1000 * user + step}")
    with open(os.path.join(folder, f"{name}.inter"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(root)


def quick_settings(data_root, epochs=4):
    """Settings for small, fast, quiet runs of RecBole's sequential models on the walk dataset."""
    return {
        "data_path": str(data_root),
        "epochs": epochs,
        "train_batch_size": 128,
        "eval_batch_size": 256,
        "hidden_size": 16,
        "embedding_size": 16,
        "inner_size": 32,
        "n_layers": 1,
        "n_heads": 1,
        "MAX_ITEM_LIST_LENGTH": 10,
        "learning_rate": 0.005,
        "threads": 1,
        "show_progress": False,
        "state": "WARNING",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    }


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
