"""Helpers of the feature tests: a tiny dataset with an .item file, its config and its splits, and the
sentence encoder (loaded once per test process: TextEncoder shares its model)."""

import os

import pytest

from recbole_ur4rec.config import Config
from recbole_ur4rec.data import create_dataset
from recbole_ur4rec.features import TextEncoder

GENRES = ["Drama", "Comedy", "Action", "Horror"]
N_ITEMS = 30
# string, non-contiguous item tokens; "x-0" ... sort before and after the numbered ones
ITEM_TOKENS = [f"i{3 * k + 7}" if k % 4 else f"x-{k}" for k in range(N_ITEMS)]
ITEM_ONLY_TOKEN = "not-rated"  # in the .item file, never in an interaction


def title(token):
    """A title no other title contains."""
    return f"Film <{token}>"


def write_features_dataset(root, name="feat", n_users=25, length=9):
    """``<root>/<name>/<name>.inter`` and ``.item``: user ``u<k>`` watches ``length`` consecutive items (no repeats)
    starting at item ``k``; the last item token has no .item row and an extra .item row is never rated.
    """
    folder = os.path.join(str(root), name)
    os.makedirs(folder, exist_ok=True)
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for user in range(n_users):
        for step in range(length):
            item = ITEM_TOKENS[(user + step) % N_ITEMS]
            inter.append(f"u{user}\t{item}\t{1 + (user + step) % 5}\t{1000 * user + step}")
    item = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    for k, token in enumerate(ITEM_TOKENS[:-1] + [ITEM_ONLY_TOKEN]):
        item.append(f"{token}\t{title(token)}\t{1990 + k}\t{GENRES[k % 4]} {GENRES[(k + 1) % 4]}")
    with open(os.path.join(folder, f"{name}.inter"), "w") as f:
        f.write("\n".join(inter) + "\n")
    with open(os.path.join(folder, f"{name}.item"), "w") as f:
        f.write("\n".join(item) + "\n")
    return str(root)


def features_config(data_root, cache, **overrides):
    """Config for the ``feat`` dataset with its caches under ``cache``."""
    config_dict = {
        "data_path": data_root,
        "feature_cache_dir": str(cache),
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
        "show_progress": False,
        "state": "WARNING",
        "item_text_template": "{movie_title} ({release_year}). Genres: {class:, }.",
        **overrides,
    }
    return Config(model="SASRec", dataset="feat", config_dict=config_dict)


def build_splits(config):
    """(full dataset, [train, valid, test]) as the models get them."""
    dataset = create_dataset(config)
    return dataset, dataset.build()


@pytest.fixture
def feat_root(tmp_path):
    return write_features_dataset(tmp_path / "data")


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(show_progress=False)
