"""A tiny dataset whose item and user texts carry the signal, for the UR4Rec tests.

Every user has a favourite genre and draws most items from it at random; the genre of an item is written only in
its text (``.item``), so ids alone learn it slowly from few interactions while the texts say it at once.
Item ``m3`` (``NO_TEXT_ITEM``) has no ``.item`` row: an item without text.
"""
import os

import numpy as np

NO_TEXT_ITEM = 0  # item m3 has no .item row
GENRES = ["Horror", "Comedy", "Western", "Musical", "Romance", "War", "Animation", "Documentary"]


def item_token(k):
    return f"m{5 * k + 3}"  # non-contiguous string tokens


def write_genre_dataset(root, name="genre", n_users=200, n_items=400, length=8, loyalty=0.9, seed=0):
    """Write ``<root>/<name>/<name>.inter`` and ``.item``; item ``k`` has genre ``GENRES[k % 8]``. Returns ``root``."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(str(root), name)
    os.makedirs(folder, exist_ok=True)
    by_genre = [[k for k in range(n_items) if k % len(GENRES) == g] for g in range(len(GENRES))]
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for user in range(n_users):
        genre = user % len(GENRES)
        loyal = rng.random(length) < loyalty
        favourite = rng.choice(by_genre[genre], size=length, replace=False)
        items = [int(f) if keep else int(rng.integers(n_items)) for f, keep in zip(favourite, loyal)]
        if user == 0:
            items[0] = NO_TEXT_ITEM  # make sure the item without text is in the data
        for step, k in enumerate(items):
            inter.append(f"u{user}\t{item_token(k)}\t{1 + (k + user) % 5}\t{1000 * user + step}")
    rows = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    for k in range(n_items):
        if k != NO_TEXT_ITEM:
            rows.append(f"{item_token(k)}\tFilm {item_token(k)}\t{1950 + k % 50}\t{GENRES[k % len(GENRES)]}")
    with open(os.path.join(folder, f"{name}.inter"), "w") as f:
        f.write("\n".join(inter) + "\n")
    with open(os.path.join(folder, f"{name}.item"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return str(root)


def ur4rec_config(data_root, cache_dir, checkpoint_dir, **overrides):
    """A small, fast UR4Rec config_dict for the ``genre`` dataset."""
    return {
        "data_path": data_root,
        "feature_cache_dir": str(cache_dir),
        "checkpoint_dir": str(checkpoint_dir),
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
        "item_text_template": "{movie_title} ({release_year}). Genres: {class:, }.",
        "show_progress": False,
        "state": "WARNING",
        "seed": 3,
        "train_batch_size": 16,
        "eval_batch_size": 256,
        "hidden_size": 16,
        "inner_size": 32,
        "n_layers": 1,
        "n_heads": 1,
        "retriever_dim": 16,
        "moe_heads": 2,
        "moe_proxies": 2,
        "MAX_ITEM_LIST_LENGTH": 20,
        "hidden_dropout_prob": 0.1,
        "attn_dropout_prob": 0.1,
        "stages": ["pretrain_backbone", "pretrain_retriever", "joint", "end_to_end"],  # all four, whatever the default
        "fusion_type": "residual",  # a fusion with parameters, whatever the default
        "stage_epochs": {"pretrain_backbone": 2, "pretrain_retriever": 2, "joint": 2, "end_to_end": 2},
        "stopping_step": 100,
        **overrides,
    }


def write_image_features(data_root, path, name="genre", dim=8, seed=0):
    """Precomputed "CLIP" item features (``.pt``: ``item_tokens``, ``features``) for every item of the dataset's
    ``.inter`` file but its first token, which is left without an image. Returns (path, that token)."""
    import torch

    with open(os.path.join(data_root, name, f"{name}.inter")) as f:
        tokens = sorted({line.split("\t")[1] for line in f.read().splitlines()[1:] if line})
    generator = torch.Generator().manual_seed(seed)
    torch.save({"item_tokens": tokens[1:], "features": torch.randn(len(tokens) - 1, dim, generator=generator)}, path)
    return str(path), tokens[0]
