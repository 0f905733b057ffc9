"""The cold-item protocol (config ``cold_items: True``): items that exist only as evaluation targets.

Among the items that are some user's validation or test target (time-ordered leave-one-out), a seeded random
``cold_item_share`` (default 0.1; seed ``cold_item_seed``) becomes cold: every other interaction with them is removed
from the dataset before it is split, so they reach no training row, user text, retrieval memory or federated
client, and no evaluated user's history before its held-out interactions. Their content (text, images) stays: an
item's description is known when it is created. The held-out interactions and the rest of the protocol are unchanged;
the evaluation slice ``cold`` reports the users whose target is cold (``recbole_ur4rec/evaluation/slices.py``).
"""
from logging import getLogger

import numpy as np
import torch
from recbole.utils import set_color

from recbole_ur4rec.common.checks import check_config_value
from recbole_ur4rec.data.sequence_dataset import _block_positions, split_counts, user_blocks


def withhold_cold_items(dataset, config):
    """Remove the interactions of the cold items from ``dataset`` (loaded, filtered and remapped, not yet split),
    except the held-out ones; set ``dataset.cold_items`` (int64 item ids, sorted)."""
    share = check_config_value(config, "cold_item_share", (int, float), low=0, high=1, low_open=True)
    seed = check_config_value(config, "cold_item_seed", int)
    split = config["eval_args"]["split"]
    if not (isinstance(split, dict) and list(split) == ["LS"]):
        raise ValueError(f"config key 'cold_items' needs the leave-one-out split (eval_args.split: {{LS: ...}}), got {split}")
    feat = dataset.inter_feat
    held_out = _held_out(dataset, feat, config)
    items = feat[dataset.iid_field].to_numpy()
    candidates = np.unique(items[held_out])
    n_cold = min(len(candidates), max(1, int(round(share * len(candidates)))))
    cold = np.sort(np.random.default_rng(seed).choice(candidates, size=n_cold, replace=False))
    # Removing interactions shortens histories, and a shorter history holds out fewer interactions (RecBole keeps one
    # training row): the split is decided again after each removal, until no cold item is left outside it.
    removed = 0
    while True:
        drop = np.isin(items, cold) & ~held_out
        if not drop.any():
            break
        removed += int(drop.sum())
        feat = feat[~drop].reset_index(drop=True)
        held_out, items = _held_out(dataset, feat, config), feat[dataset.iid_field].to_numpy()
    dataset.inter_feat = feat
    dataset.cold_items = torch.as_tensor(cold, dtype=torch.long)
    getLogger().info(
        set_color("[Cold items]: ", "pink")
        + f"{n_cold} of the {len(candidates)} evaluation target items are cold (share {share}, seed {seed}): "
        f"{removed} of their interactions removed, {int((np.isin(items, cold) & held_out).sum())} held-out kept"
    )
    return dataset


def _held_out(dataset, feat, config):
    """Which interactions of ``feat`` the time-ordered leave-one-out split holds out for validation and test."""
    users = feat[dataset.uid_field].to_numpy()
    order = np.lexsort((feat[dataset.time_field].to_numpy(), users))  # by user, then time: the split's order
    starts, counts = user_blocks(users[order])
    _, n_valid, n_test = split_counts(counts - 1, config["eval_args"], dataset._calcu_split_ids)
    held = n_valid + n_test
    held_out = np.zeros(len(feat), dtype=bool)
    held_out[order[_block_positions(starts + counts - held, held)]] = True
    return held_out
