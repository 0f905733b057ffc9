"""The lean sequential data path: RecBole's splits rebuilt from histories (equal to RecBole's own, row for row),
whole-sequence windows, prefix rows gathered per batch, and memory that grows with interactions."""
import csv
import os

import numpy as np
import pytest
import torch
from recbole.data.dataloader import FullSortEvalDataLoader, TrainDataLoader
from recbole.data.dataset import SequentialDataset
from recbole.utils import init_seed

from recbole_ur4rec.config import Config
from recbole_ur4rec.data import create_dataset, data_preparation
from recbole_ur4rec.data.dataloader import PrefixTrainDataLoader
from recbole_ur4rec.data.sequence_dataset import SequenceHistoryDataset, prefix_item_lists, window_rows
from recbole_ur4rec.registry import get_model, get_trainer


def prepare(quick_config, dataset="tiny", model="FastSASRec", **overrides):
    config = Config(model=model, dataset=dataset, config_dict={**quick_config, **overrides})
    dataset = create_dataset(config)
    return config, dataset, data_preparation(config, dataset)


def recbole_windows(config, recbole_train):
    """Whole-sequence windows built from RecBole's own prefix rows (the plugin's path before the lean one)."""
    feat = recbole_train.inter_feat
    uid, target = feat["user_id"].numpy(), feat["item_id"].numpy()
    item_list, length = feat["item_id_list"].numpy(), feat["item_length"].numpy()
    order = np.argsort(uid, kind="stable")
    uid, target, item_list, length = uid[order], target[order], item_list[order], length[order]
    starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]])
    ends = np.r_[starts[1:], len(uid)]
    histories = [np.concatenate([item_list[s, : length[s]], target[s:e]]) for s, e in zip(starts, ends)]
    return window_rows(uid[starts], histories, config["MAX_ITEM_LIST_LENGTH"])


def assert_same_rows(ours, theirs):
    assert list(ours.columns) == list(theirs.columns)
    for field in theirs.columns:
        assert torch.equal(ours[field], theirs[field]), field


# ---- equivalence with RecBole's SequentialDataset on ml-100k ------------------------------------------------------
@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    """Both paths on ml-100k: the plugin's lean splits and RecBole's own (expanding) SequentialDataset."""
    settings = {
        "checkpoint_dir": str(tmp_path_factory.mktemp("saved")),
        "show_progress": False,
        "state": "WARNING",
        "epochs": 1,
        "seed": 2020,
        "threads": 1,
    }
    config, dataset, loaders = prepare(settings, dataset="ml-100k")
    recbole_splits = SequentialDataset(config).build()
    return settings, config, dataset, loaders, recbole_splits


def test_ml100k_evaluation_rows_equal_recbole(ml100k):
    _, _, _, (_, valid_data, test_data), (_, recbole_valid, recbole_test) = ml100k
    for ours, theirs in ((valid_data, recbole_valid), (test_data, recbole_test)):
        assert isinstance(ours, FullSortEvalDataLoader)
        assert_same_rows(ours._dataset.inter_feat, theirs.inter_feat)


def test_ml100k_training_rows_equal_recbole(ml100k):
    settings, config, _, (train_data, _, _), (recbole_train, _, _) = ml100k
    window = train_data._dataset.inter_feat
    user, item_seq, targets, length, _ = recbole_windows(config, recbole_train)
    for field, expected in (("user_id", user), ("item_id_list", item_seq), ("target_item_id_list", targets), ("item_length", length)):
        assert torch.equal(window[field], expected), field

    # loss_position: last: RecBole's prefix rows, in RecBole's order, item lists gathered per batch
    _, _, (prefix_data, _, _) = prepare(settings, dataset="ml-100k", loss_position="last")
    assert isinstance(prefix_data, PrefixTrainDataLoader)
    rows = prefix_data._dataset.inter_feat
    assert "item_id_list" not in rows, "no [rows x window] tensor is held"
    theirs = recbole_train.inter_feat
    for field in ("user_id", "item_id", "item_length"):
        assert torch.equal(rows[field], theirs[field]), field
    assert torch.equal(prefix_item_lists(prefix_data._dataset, rows), theirs["item_id_list"])
    batch = next(iter(prefix_data))
    assert batch["item_id_list"].shape == (len(batch), config["MAX_ITEM_LIST_LENGTH"])


def test_ml100k_fastsasrec_metrics_equal_on_both_paths(ml100k):
    """Same seed, one epoch: the lean path and RecBole's path (windows built from its prefix rows) give the same
    validation and test metrics."""
    _, config, _, (train_data, valid_data, test_data), (recbole_train, recbole_valid, recbole_test) = ml100k
    window_dataset = train_data._dataset.copy(train_data._dataset.inter_feat)
    user, item_seq, targets, length, _ = recbole_windows(config, recbole_train)
    window_dataset.inter_feat.update(
        type(window_dataset.inter_feat)(
            {"user_id": user, "item_id_list": item_seq, "target_item_id_list": targets, "item_length": length}
        )
    )
    recbole_loaders = (
        TrainDataLoader(config, window_dataset, None, shuffle=True),
        FullSortEvalDataLoader(config, recbole_valid, None),
        FullSortEvalDataLoader(config, recbole_test, None),
    )
    for loader in recbole_loaders[1:]:  # the same training counts: the evaluation slices are compared too
        loader.training_counts = valid_data.training_counts
    results = []
    for train, valid, test in ((train_data, valid_data, test_data), recbole_loaders):
        init_seed(config["seed"], config["reproducibility"])
        model = get_model("FastSASRec")(config, train._dataset)
        trainer = get_trainer(config["MODEL_TYPE"], "FastSASRec")(config, model)
        _, best_valid = trainer.fit(train, valid, saved=False, show_progress=False)
        results.append((best_valid, trainer.evaluate(test, load_best_model=False, show_progress=False)))
    assert results[0] == results[1]
    assert results[0][0]["ndcg@10"] > 0.01  # a trained model, not a constant ranking


# ---- edge cases: short users, timestamp ties, every split mode -----------------------------------------------------
def write_edge_dataset(root, name="edge"):
    """Users with 1 to 9 interactions, timestamps tied across users and inside users, string ids."""
    folder = os.path.join(str(root), name)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(3)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for user in range(45):
        n = 1 + user % 9
        times = np.sort(rng.integers(0, 12, size=n))  # many ties
        for t in rng.permutation(n):  # the file is not in time order
            lines.append(f"user{7 * user + 1}\tx{int(rng.integers(30)) * 11}\t{1 + int(rng.integers(5))}\t{times[t]}")
    with open(os.path.join(folder, f"{name}.inter"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(root)


@pytest.mark.parametrize(
    "split",
    [{"LS": "valid_and_test"}, {"LS": "valid_only"}, {"LS": "test_only"}, {"RS": [0.6, 0.2, 0.2]}],
)
def test_edge_splits_equal_recbole(quick_config, tmp_path, split):
    overrides = {
        "data_path": write_edge_dataset(tmp_path / "edge_data"),
        "eval_args": {"split": split, "order": "TO", "mode": "full", "group_by": "user"},
        "load_col": None,
        "MAX_ITEM_LIST_LENGTH": 3,
        "loss_position": "last",
    }
    config, dataset, (train_data, valid_data, test_data) = prepare(quick_config, dataset="edge", **overrides)
    assert isinstance(dataset, SequenceHistoryDataset)
    recbole_train, recbole_valid, recbole_test = SequentialDataset(config).build()
    assert_same_rows(valid_data._dataset.inter_feat, recbole_valid.inter_feat)
    assert_same_rows(test_data._dataset.inter_feat, recbole_test.inter_feat)
    rows, theirs = train_data._dataset.inter_feat, recbole_train.inter_feat
    for field in ("user_id", "item_id", "item_length"):
        assert torch.equal(rows[field], theirs[field]), field
    assert torch.equal(prefix_item_lists(train_data._dataset, rows), theirs["item_id_list"])


def test_unsupported_split_is_named(quick_config):
    eval_args = {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "mode": "full", "group_by": "none"}
    with pytest.raises(ValueError, match=r"eval_args.split \{'RS': \[0.8, 0.1, 0.1\]\} is not supported .* group_by: user"):
        prepare(quick_config, eval_args=eval_args)


def test_memory_grows_with_interactions_not_window(quick_config):
    """Every tensor of the three splits together holds O(interactions + users x window) values."""
    config, dataset, loaders = prepare(quick_config, loss_position="last", MAX_ITEM_LIST_LENGTH=20)
    n_inter, n_users, max_len = len(dataset.inter_feat), dataset.user_num - 1, config["MAX_ITEM_LIST_LENGTH"]
    train = loaders[0]._dataset
    held = sum(t.numel() for t in train.inter_feat.interaction.values()) + train.history_items.numel()
    assert held <= 5 * n_inter  # four scalar columns per prefix row and the flat history
    for loader in loaders[1:]:
        feat = loader._dataset.inter_feat
        assert len(feat) == n_users
        assert sum(t.numel() for t in feat.interaction.values()) <= n_users * (4 * max_len + 5)


# ---- whole-sequence rows on the tiny dataset -------------------------------------------------------------------------
def raw_histories(data_root):
    """user token -> item tokens in time order, read straight from the atomic file."""
    with open(os.path.join(data_root, "tiny", "tiny.inter")) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    histories = {}
    for row in sorted(rows, key=lambda r: float(r["timestamp:float"])):
        histories.setdefault(row["user_id:token"], []).append(row["item_id:token"])
    return histories


def rows_by_user(train_data):
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
    _, _, (train_data, valid_data, test_data) = prepare(quick_config, loss_position="all")
    assert isinstance(train_data, TrainDataLoader)
    rows = rows_by_user(train_data)
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
    _, _, (train_data, _, _) = prepare(quick_config, loss_position="all", MAX_ITEM_LIST_LENGTH=max_len)
    rows = rows_by_user(train_data)
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


def test_training_split_is_the_training_interactions(quick_config, tiny_data_root):
    _, _, (train_data, _, _) = prepare(quick_config, loss_position="all")
    split = train_data._dataset.training_split
    users = split.id2token("user_id", split.inter_feat["user_id"].numpy()).tolist()
    items = split.id2token("item_id", split.inter_feat["item_id"].numpy()).tolist()
    by_user = {}
    for user, item in zip(users, items):
        by_user.setdefault(user, []).append(item)
    assert by_user == {user: history[:-2] for user, history in raw_histories(tiny_data_root).items()}


def test_bad_loss_position_names_the_key(quick_config):
    with pytest.raises(ValueError, match=r"config key 'loss_position' must be one of all, last, got 'every'"):
        prepare(quick_config, loss_position="every")


def test_negative_sampling_by_recbole_is_refused_for_whole_sequence_rows(quick_config):
    with pytest.raises(ValueError, match=r"train_neg_sample_args must be ~ with loss_position: all"):
        prepare(
            quick_config,
            loss_position="all",
            loss_type="BPR",
            train_neg_sample_args={"distribution": "uniform", "sample_num": 1},
        )


def test_recbole_models_keep_recbole_dataset(quick_config):
    _, dataset, (train_data, _, _) = prepare(quick_config, model="SASRec")
    assert type(dataset) is SequentialDataset
    assert "item_id_list" in train_data._dataset.inter_feat


def test_strided_windows_predict_every_position_once_with_longer_context():
    """window_stride < MAX_ITEM_LIST_LENGTH: overlapping windows; each target is kept in one row only, the row whose
    last ``stride`` positions hold it, so it is predicted after at least ``max_len - stride`` items."""
    histories = [np.arange(1, 24), np.arange(101, 105)]  # 22 and 3 positions
    max_len, stride = 8, 3
    user, item_seq, targets, length, start = window_rows(np.array([1, 2]), histories, max_len, stride)
    consecutive = window_rows(np.array([1, 2]), histories, max_len)
    for (u, h) in ((1, histories[0]), (2, histories[1])):
        rows = (user == u).nonzero().flatten().tolist()
        kept = [(int(start[r]) + j, int(targets[r, j])) for r in rows for j in range(max_len) if targets[r, j] > 0]
        assert sorted(kept) == [(p, int(h[p + 1])) for p in range(len(h) - 1)]  # every position exactly once
        for r in rows:
            for j in range(int(length[r])):
                assert item_seq[r, j] == h[int(start[r]) + j]  # inputs are the history itself
                if targets[r, j] > 0:  # context before every kept target: all of the history, or max_len - stride items
                    assert j >= min(int(start[r]) + j, max_len - stride)
        assert len(rows) == -(-(len(h) - 1) // stride)  # one window per stride
    assert len(consecutive[0]) == 3 + 1 and torch.equal(window_rows(np.array([1, 2]), histories, max_len, max_len)[2], consecutive[2])
