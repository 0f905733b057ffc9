"""Whole-sequence training rows: built from RecBole's training split only, next-item targets, windows."""
import csv
import os

import pytest
import torch
from recbole.data import data_preparation as recbole_data_preparation
from recbole.data.dataloader import FullSortEvalDataLoader, TrainDataLoader

from recbole_ur4rec.config import Config
from recbole_ur4rec.data import create_dataset, data_preparation


def prepare(quick_config, **overrides):
    config = Config(model="FastSASRec", dataset="tiny", config_dict={**quick_config, **overrides})
    dataset = create_dataset(config)
    return config, dataset, data_preparation(config, dataset)


def raw_histories(data_root):
    """user token -> item tokens in time order, read straight from the atomic file."""
    with open(os.path.join(data_root, "tiny", "tiny.inter")) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    histories = {}
    for row in sorted(rows, key=lambda r: float(r["timestamp:float"])):
        histories.setdefault(row["user_id:token"], []).append(row["item_id:token"])
    return histories


def rows_by_user(train_data, config):
    """user token -> list of (input tokens, target tokens) per training row, in row order."""
    dataset = train_data._dataset
    feat = dataset.inter_feat
    result = {}
    for user, seq, target, length in zip(
        feat["user_id"].tolist(), feat["item_id_list"], feat["target_item_id_list"], feat["item_length"].tolist()
    ):
        inputs = dataset.id2token("item_id", seq[:length].numpy()).tolist()
        targets = dataset.id2token("item_id", target[:length].numpy()).tolist()
        result.setdefault(dataset.id2token("user_id", user), []).append((inputs, targets))
        assert torch.all(seq[length:] == 0) and torch.all(target[length:] == 0), "padding must be item 0"
    return result


def eval_items(loader):
    dataset = loader._dataset
    users = dataset.id2token("user_id", dataset.inter_feat["user_id"].numpy()).tolist()
    items = dataset.id2token("item_id", dataset.inter_feat["item_id"].numpy()).tolist()
    return dict(zip(users, items))


def test_training_rows_hold_only_training_items_and_next_item_targets(quick_config, tiny_data_root):
    config, _, (train_data, valid_data, test_data) = prepare(quick_config, loss_position="all")
    assert isinstance(train_data, TrainDataLoader)
    rows = rows_by_user(train_data, config)
    valid_items, test_items = eval_items(valid_data), eval_items(test_data)
    histories = raw_histories(tiny_data_root)
    assert set(rows) == set(histories)
    for user, history in histories.items():
        # RecBole's sequential leave-one-out: the last item is test, the one before is validation
        assert (valid_items[user], test_items[user]) == (history[-2], history[-1])
        training_part = history[:-2]
        for inputs, targets in rows[user]:
            assert valid_items[user] not in inputs + targets and test_items[user] not in inputs + targets
            # the row is a contiguous stretch of the history and each target is the item after its input
            start = training_part.index(inputs[0])
            assert training_part[start : start + len(inputs) + 1] == inputs + targets[-1:]
            assert targets == training_part[start + 1 : start + 1 + len(inputs)]


def test_windows_cover_every_training_position_once(quick_config, tiny_data_root):
    max_len = 5
    config, _, (train_data, _, _) = prepare(quick_config, loss_position="all", MAX_ITEM_LIST_LENGTH=max_len)
    rows = rows_by_user(train_data, config)
    long_users = 0
    for user, history in raw_histories(tiny_data_root).items():
        training_part = history[:-2]
        windows = rows[user]
        long_users += len(windows) > 1
        assert [t for _, targets in windows for t in targets] == training_part[1:]
        assert [len(inputs) for inputs, _ in windows][1:] == [max_len] * (len(windows) - 1), "only the oldest window is short"
    assert long_users > 0
    # exactly the supervision of RecBole's prefix rows, which keep one row per training target
    supervised = int(train_data._dataset.inter_feat["item_length"].sum())
    assert supervised == sum(len(h) - 3 for h in raw_histories(tiny_data_root).values())


def test_evaluation_loaders_stay_recbole_full_sort(quick_config):
    config, dataset, (_, valid_data, test_data) = prepare(quick_config, loss_position="all")
    _, recbole_valid, recbole_test = recbole_data_preparation(config, create_dataset(config))
    for ours, theirs in ((valid_data, recbole_valid), (test_data, recbole_test)):
        assert isinstance(ours, FullSortEvalDataLoader)
        for field in ("user_id", "item_id", "item_id_list", "item_length"):
            assert torch.equal(ours._dataset.inter_feat[field], theirs._dataset.inter_feat[field]), field


def test_whole_sequence_rows_keep_recbole_training_split(quick_config):
    config, _, (train_data, _, _) = prepare(quick_config, loss_position="all")
    _, (recbole_train, _, _) = prepare(quick_config, loss_position="last")[1:]
    split = train_data._dataset.training_split
    for field in ("user_id", "item_id", "timestamp"):
        assert torch.equal(split.inter_feat[field], recbole_train._dataset.inter_feat[field]), field


def test_loss_position_last_keeps_recbole_prefix_rows(quick_config):
    config, _, (train_data, _, _) = prepare(quick_config, loss_position="last")
    feat = train_data._dataset.inter_feat
    assert "target_item_id_list" not in feat
    assert len(feat) == sum(len(h) - 3 for h in raw_histories(quick_config["data_path"]).values())


def test_bad_loss_position_names_the_key(quick_config):
    with pytest.raises(ValueError, match=r"loss_position must be one of all, last, got 'every'"):
        prepare(quick_config, loss_position="every")


def test_negative_sampling_by_recbole_is_refused_for_whole_sequence_rows(quick_config):
    with pytest.raises(ValueError, match=r"train_neg_sample_args must be ~ with loss_position: all"):
        prepare(
            quick_config,
            loss_position="all",
            loss_type="BPR",
            train_neg_sample_args={"distribution": "uniform", "sample_num": 1},
        )

