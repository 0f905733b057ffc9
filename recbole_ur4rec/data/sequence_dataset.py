"""Sequential data without per-prefix rows: RecBole's splits built from each user's history.

RecBole's :class:`~recbole.data.dataset.SequentialDataset` builds its splits by first expanding every interaction
into a row of its prefix (item, rating and timestamp lists of ``MAX_ITEM_LIST_LENGTH`` values each), so its memory
grows with interactions x window. :class:`SequenceHistoryDataset` loads, filters and remaps exactly as RecBole does
(it *is* a ``SequentialDataset``) and builds the same three splits from the time-sorted interactions:

- training split: one row per training interaction (RecBole's interaction fields), sorted by user, then time;
- validation and test splits: RecBole's evaluation rows, one per held-out target (the target's fields, the list of
  the ``MAX_ITEM_LIST_LENGTH`` interactions before it for every field, ``item_length``), in RecBole's row order.

A user's held-out targets are chosen as RecBole chooses them among the user's prefix rows (leave-one-out, or a
per-user ratio split); a user with a single interaction has no prefix row and appears in no split, as in RecBole.
:func:`build_window_train_dataset` turns the training split into whole-sequence rows (``loss_position: all``, as
in the original SASRec, Kang & McAuley, ICDM 2018): each user's training history cut into consecutive windows
aligned on the most recent position, so every training target is predicted exactly once per epoch.
:func:`build_prefix_train_dataset` gives RecBole's one row per training target (``loss_position: last``) as
(start, length) into the flat history; :class:`~recbole_ur4rec.data.dataloader.PrefixTrainDataLoader` gathers each
batch's item lists, so no [rows x window] tensor is ever held.
"""
import copy

import numpy as np
import pandas as pd
import recbole.data.dataset.dataset as recbole_dataset_module
import torch
from recbole.data.dataset import Dataset, SequentialDataset
from recbole.data.interaction import Interaction
from recbole.utils import FeatureSource, FeatureType

from recbole_ur4rec.common.checks import check_config_value

# the training rows of each loss_position (checked by SequenceBackbone's config check): 'all' = one row per user
# (windows of MAX_ITEM_LIST_LENGTH), a loss at every position; 'last' = RecBole's one row per prefix, a loss at its end
LOSS_POSITIONS = ("all", "last")

TARGET_PREFIX = "target_"
PREFIX_START = "prefix_start"  # first history position of a prefix row's item list (flat index)
LEAVE_ONE_OUT = {"valid_and_test": (1, 1), "valid_only": (1, 0), "test_only": (0, 1)}  # held-out (valid, test)


def target_list_field(config):
    """Name of the per-position target field, e.g. ``target_item_id_list``."""
    return TARGET_PREFIX + config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"]


def user_blocks(uid):
    """Start and length of each user's block in ``uid`` [N] (sorted by user): two int64 arrays [U]."""
    if len(uid) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]])
    return starts.astype(np.int64), np.diff(np.r_[starts, len(uid)]).astype(np.int64)


def split_counts(n_rows, eval_args, calcu_split_ids):
    """Number of a user's prefix rows that go to training, validation and test, as RecBole splits them.

    Args:
        n_rows (np.ndarray): prefix rows per user [U] (interactions - 1).
        eval_args (dict): RecBole's ``eval_args``; its split is ``{'LS': mode}`` or ``{'RS': [3 ratios]}`` by user.
        calcu_split_ids (callable): RecBole's ``Dataset._calcu_split_ids`` (per-user ratio split).

    Returns:
        tuple of int64 arrays [U]: ``(train, valid, test)``.
    """
    split_args = eval_args["split"]
    mode, value = next(iter(split_args.items()))
    if mode == "LS":
        if value not in LEAVE_ONE_OUT:
            raise ValueError(f"eval_args.split LS must be one of {', '.join(LEAVE_ONE_OUT)}, got {value!r}")
        n_valid, n_test = LEAVE_ONE_OUT[value]
        held = np.minimum(n_valid + n_test, np.maximum(n_rows - 1, 0))  # RecBole keeps one training row
        test = np.minimum(held, n_test)  # RecBole fills the last split first
        valid = held - test
        return n_rows - held, valid, test
    if mode == "RS" and isinstance(value, list) and len(value) == 3 and eval_args.get("group_by") == "user":
        ratios = [r / sum(value) for r in value]
        counts = np.zeros((len(n_rows), 3), dtype=np.int64)
        for n in np.unique(n_rows):
            first, second = calcu_split_ids(tot=int(n), ratios=ratios)
            counts[n_rows == n] = (first, second - first, n - second)
        return counts[:, 0], counts[:, 1], counts[:, 2]
    raise ValueError(
        f"eval_args.split {split_args} is not supported by the plugin's sequential models: use LS "
        f"(valid_and_test, valid_only or test_only) or RS with three ratios and group_by: user"
    )


def gather_lists(values, starts, lengths, max_len):
    """Right-padded lists ``values[starts[i] : starts[i] + lengths[i]]`` as one tensor [R, max_len, ...] (0 = pad)."""
    column = torch.arange(max_len, device=starts.device)
    valid = column.unsqueeze(0) < lengths.unsqueeze(1)  # [R L]
    index = torch.where(valid, starts.unsqueeze(1) + column.unsqueeze(0), 0)  # [R L]
    gathered = values[index]  # [R L ...]
    mask = valid.reshape(valid.shape + (1,) * (gathered.dim() - 2))
    return torch.where(mask, gathered, torch.zeros((), dtype=gathered.dtype))


class _PandasWithCParser:
    """pandas, whose ``read_csv`` uses the C parser (with correctly rounded floats, as Python's ``float``)."""

    def __getattr__(self, name):
        return getattr(pd, name)

    @staticmethod
    def read_csv(*args, **kwargs):
        return pd.read_csv(*args, **{**kwargs, "engine": "c", "float_precision": "round_trip"})


class SequenceHistoryDataset(SequentialDataset):
    """RecBole's sequential dataset whose ``build()`` never materialises per-prefix rows (memory ~ interactions).

    Loading, filtering, id remapping, normalisation and field properties are RecBole's; its atomic files are read
    with pandas' C parser instead of the Python one (same values; 1M rows: 0.6 s instead of 8.7 s). ``build()``
    returns (train, valid, test): the training interactions and RecBole's evaluation rows (see the module docstring).
    """

    def _load_feat(self, filepath, source):
        if len(self.config["field_separator"]) != 1:  # the C parser takes one-character separators only
            return super()._load_feat(filepath, source)
        try:
            recbole_dataset_module.pd = _PandasWithCParser()
            return super()._load_feat(filepath, source)
        finally:
            recbole_dataset_module.pd = pd

    def _change_feat_format(self):
        Dataset._change_feat_format(self)  # DataFrame -> Interaction, without RecBole's prefix expansion

    def build(self):
        if self.benchmark_filename_list is not None:
            raise ValueError(
                f"SequenceHistoryDataset builds splits from interactions and does not read benchmark files "
                f"(benchmark_filename = {self.benchmark_filename_list})"
            )
        if self.config["eval_args"]["order"] != "TO":
            raise ValueError("The ordering args for sequential recommendation has to be 'TO'")
        self._change_feat_format()
        self._drop_unused_col()
        self._aug_presets()
        self._check_field("uid_field", "time_field")
        self.sort(by=[self.uid_field, self.time_field])  # RecBole's order of each user's prefix rows

        uid = self.inter_feat[self.uid_field].numpy()
        starts, counts = user_blocks(uid)
        n_train, n_valid, n_test = split_counts(counts - 1, self.config["eval_args"], self._calcu_split_ids)
        # RecBole lists a split's rows user by user, users in the time order of their first prefix row
        has_rows = counts > 1
        first_target_time = self.inter_feat[self.time_field].numpy()[starts + has_rows]
        user_order = np.argsort(np.where(has_rows, first_target_time, np.inf), kind="stable")[: int(has_rows.sum())]
        self.user_order = uid[starts[user_order]]  # user ids in RecBole's row order

        train_inter = np.where(n_train > 0, n_train + 1, 0)  # the first item and every training target
        train_positions = _block_positions(starts, train_inter)
        starts, n_train, n_valid, n_test = starts[user_order], n_train[user_order], n_valid[user_order], n_test[user_order]
        valid_positions = _block_positions(starts + 1 + n_train, n_valid)
        test_positions = _block_positions(starts + 1 + n_train + n_valid, n_test)
        return [
            self.copy(self.inter_feat[torch.as_tensor(train_positions)]),
            self.copy(self.evaluation_rows(valid_positions, np.repeat(starts, n_valid))),
            self.copy(self.evaluation_rows(test_positions, np.repeat(starts, n_test))),
        ]

    def evaluation_rows(self, positions, user_start):
        """RecBole's prefix rows whose targets are the interactions at ``positions`` (indices of the sorted data);
        ``user_start`` holds the first position of each target's user."""
        positions, user_start = torch.as_tensor(positions), torch.as_tensor(user_start)
        lengths = torch.minimum(positions - user_start, torch.tensor(self.max_item_list_len))
        rows = self.inter_feat[positions]
        new = {self.item_list_length_field: lengths}
        for field in self.inter_feat:
            if field != self.uid_field:
                values = self.inter_feat[field]
                new[getattr(self, f"{field}_list_field")] = gather_lists(values, positions - lengths, lengths, self.max_item_list_len)
        rows.update(Interaction(new))
        return rows


def _block_positions(starts, lengths):
    """Concatenated ranges ``starts[i] : starts[i] + lengths[i]`` as an int64 array."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(starts, dtype=np.int64) - offsets, lengths) + np.arange(total)


def training_histories(train_split):
    """Each user's training history from the training split of :class:`SequenceHistoryDataset`.

    Returns:
        tuple: ``(user_ids, histories)``: an int64 array of user ids (ascending) and a list of int64 arrays of
        item ids, oldest first.
    """
    feat = train_split.inter_feat
    if train_split.item_list_length_field in feat:
        raise ValueError(
            f"training_histories needs the training interactions of SequenceHistoryDataset (one row per "
            f"interaction); got rows of item lists (fields {list(feat.columns)})"
        )
    uid = feat[train_split.uid_field].numpy()
    starts, counts = user_blocks(uid)
    items = feat[train_split.iid_field].numpy().astype(np.int64)
    return uid[starts].astype(np.int64), np.split(items, starts[1:]) if len(uid) else []


def window_rows(user_ids, histories, max_len, stride=None):
    """Cut histories into right-padded rows of at most ``max_len`` (input, next item) positions.

    A history ``h`` of ``m`` items has ``m - 1`` positions: input ``h[j]``, target ``h[j + 1]``. Windows are
    taken from the most recent position backwards, so only a user's oldest window can be shorter. ``stride``
    (default ``max_len``: consecutive windows) ends a window every ``stride`` positions: each window keeps targets
    only at its last ``stride`` positions (the earlier ones, which the previous window predicts, are context with
    target 0), so every position is predicted once, with at least ``max_len - stride`` items before it.

    Returns:
        tuple of tensors: ``user [R]``, ``item_seq [R, max_len]``, ``targets [R, max_len]`` (0 = padding),
        ``length [R]``, ``start [R]`` (the history position of each row's first column).
    """
    stride = max_len if stride is None else stride
    users, starts, flat_starts, lengths, first_targets = [], [], [], [], []
    offset = 0
    for user, history in zip(user_ids, histories):
        n_positions = len(history) - 1
        for end in reversed(range(n_positions, 0, -stride)):  # oldest window first
            start = max(0, end - max_len)
            users.append(user)
            starts.append(start)
            flat_starts.append(offset + start)
            lengths.append(end - start)
            first_targets.append(max(0, end - stride) - start)  # the row's first column with a target
        offset += len(history)
    flat = torch.as_tensor(np.concatenate(histories) if histories else np.zeros(0, dtype=np.int64))
    flat_starts = torch.as_tensor(np.asarray(flat_starts, dtype=np.int64))
    lengths = torch.as_tensor(np.asarray(lengths, dtype=np.int64))
    item_seq = gather_lists(flat, flat_starts, lengths, max_len)  # [R L]
    targets = gather_lists(flat, flat_starts + 1, lengths, max_len)  # [R L]
    if stride < max_len:  # context-only columns: predicted by the previous window
        first_targets = torch.as_tensor(np.asarray(first_targets, dtype=np.int64))
        targets = targets.masked_fill(torch.arange(max_len).unsqueeze(0) < first_targets.unsqueeze(1), 0)
    return (
        torch.as_tensor(np.asarray(users, dtype=np.int64)),
        item_seq,
        targets,
        lengths,
        torch.as_tensor(np.asarray(starts, dtype=np.int64)),
    )


def _check_max_len(config):
    return check_config_value(config, "MAX_ITEM_LIST_LENGTH", int, low=1)


def _rows_dataset(train_split, columns, properties):
    """A copy of ``train_split`` whose rows are ``columns`` and that keeps the split itself as ``training_split``."""
    dataset = train_split.copy(Interaction(columns))
    # field properties are shared with the original dataset by the shallow copy: give the copy its own
    for attr in ("field2type", "field2source", "field2seqlen"):
        setattr(dataset, attr, copy.copy(getattr(dataset, attr)))
    for field, (ftype, seqlen) in properties.items():
        dataset.set_field_property(field, ftype, FeatureSource.INTERACTION, seqlen)
    dataset.training_split = train_split
    return dataset


def build_window_train_dataset(config, train_split):
    """Whole-sequence training rows (``loss_position: all``) from the training split of SequenceHistoryDataset.

    The rows hold ``user_id``, ``item_id_list`` [R, L] (right-padded, like RecBole's evaluation rows),
    ``target_item_id_list`` [R, L] (the next item at every position, 0 at padding), ``item_length`` [R] and
    ``item_id`` (the target at the last position, so last-position code keeps working). ``training_split`` keeps
    the training interactions themselves, for what needs their other fields (ratings, timestamps), such as user text.
    """
    max_len = _check_max_len(config)
    stride = check_config_value(config, "window_stride", int, low=1, high=max_len, optional=True)
    user_ids, histories = training_histories(train_split)
    user, item_seq, targets, length, _ = window_rows(user_ids, histories, max_len, stride)
    last_target = targets.gather(1, (length - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    columns = {
        train_split.uid_field: user,
        train_split.item_id_list_field: item_seq,
        target_list_field(config): targets,
        train_split.item_list_length_field: length,
        train_split.iid_field: last_target,
    }
    return _rows_dataset(train_split, columns, {target_list_field(config): (FeatureType.TOKEN_SEQ, max_len)})


def build_prefix_train_dataset(config, train_split, user_order):
    """RecBole's training rows, one per training target (``loss_position: last``), without their item lists.

    The rows hold ``user_id``, ``item_id`` (the target), ``item_length`` and ``prefix_start`` (the flat index of
    the list's first item in ``training_split``'s interactions); ``history_items`` [N] holds those interactions'
    item ids. Rows come user by user in ``user_order`` (RecBole's order), each user's targets in time order.
    """
    max_len = _check_max_len(config)
    feat = train_split.inter_feat
    uid = feat[train_split.uid_field].numpy()
    starts, counts = user_blocks(uid)
    # users of user_order that have training rows, as indices into this split's user blocks
    block_of_user = np.full(int(uid.max()) + 1 if len(uid) else 0, -1, dtype=np.int64)
    block_of_user[uid[starts]] = np.arange(len(starts))
    blocks = block_of_user[user_order[user_order < len(block_of_user)]] if len(starts) else np.zeros(0, np.int64)
    blocks = blocks[blocks >= 0]
    targets = _block_positions(starts[blocks] + 1, counts[blocks] - 1)  # every position but each user's first
    user_start = np.repeat(starts[blocks], counts[blocks] - 1)
    lengths = np.minimum(targets - user_start, max_len)
    columns = {
        train_split.uid_field: torch.as_tensor(uid[targets]),
        train_split.iid_field: feat[train_split.iid_field][torch.as_tensor(targets)],
        train_split.item_list_length_field: torch.as_tensor(lengths),
        PREFIX_START: torch.as_tensor(targets - lengths),
    }
    dataset = _rows_dataset(train_split, columns, {PREFIX_START: (FeatureType.TOKEN, 1)})
    dataset.history_items = feat[train_split.iid_field].long()
    return dataset


def prefix_item_lists(dataset, rows):
    """Item lists [B, L] of the prefix rows ``rows`` (an Interaction of :func:`build_prefix_train_dataset`)."""
    return gather_lists(
        dataset.history_items, rows[PREFIX_START], rows[dataset.item_list_length_field], dataset.max_item_list_len
    )
