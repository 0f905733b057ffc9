"""Whole-sequence training rows for sequential models with a loss at every position.

RecBole's :class:`~recbole.data.dataset.SequentialDataset` makes one training row per prefix of a user's
history and keeps only its last ``MAX_ITEM_LIST_LENGTH`` items. With a loss at every position (as in the
original SASRec, Kang & McAuley, ICDM 2018), one row per user carries the same supervision. This module
builds those rows from RecBole's own *training split* (after its loading, filtering, id remapping and
time-ordered leave-one-out), so validation and test items never reach them, and serves them through
RecBole's :class:`~recbole.data.dataloader.TrainDataLoader`.

A user's training history is the first item of the user's earliest training row followed by the target of
every training row, in time order (RecBole's stable sorts keep a user's rows in history order). Histories
with more than ``MAX_ITEM_LIST_LENGTH`` supervised positions are cut into consecutive windows, aligned on
the most recent position, so every training target is predicted exactly once per epoch.
"""
import copy

import numpy as np
import torch
from recbole.data.interaction import Interaction
from recbole.utils import FeatureSource, FeatureType

TARGET_PREFIX = "target_"


def target_list_field(config):
    """Name of the per-position target field, e.g. ``target_item_id_list``."""
    return TARGET_PREFIX + config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"]


def training_histories(train_dataset):
    """Each user's training history, from RecBole's training split of a :class:`SequentialDataset`.

    Returns:
        tuple: ``(user_ids, histories)``: an int64 array of user ids and a list of int64 arrays of item ids,
        oldest first. Users whose split holds no training row are left out.
    """
    feat = train_dataset.inter_feat
    uid = feat[train_dataset.uid_field].numpy()
    if len(uid) == 0:
        return np.zeros(0, dtype=np.int64), []
    target = feat[train_dataset.iid_field].numpy()
    item_list = feat[train_dataset.item_id_list_field].numpy()
    length = feat[train_dataset.item_list_length_field].numpy()

    order = np.argsort(uid, kind="stable")  # users contiguous, each user's rows still in time order
    uid, target, item_list, length = uid[order], target[order], item_list[order], length[order]
    starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]])
    ends = np.r_[starts[1:], len(uid)]
    histories = [
        np.concatenate([item_list[start, : length[start]], target[start:end]]) for start, end in zip(starts, ends)
    ]
    return uid[starts].astype(np.int64), histories


def window_rows(user_ids, histories, max_len):
    """Cut histories into right-padded rows of at most ``max_len`` (input, next item) positions.

    A history ``h`` of ``m`` items has ``m - 1`` positions: input ``h[j]``, target ``h[j + 1]``. Windows are
    taken from the most recent position backwards, so only a user's oldest window can be shorter.

    Returns:
        tuple of tensors: ``user [R]``, ``item_seq [R, max_len]``, ``targets [R, max_len]`` (0 = padding),
        ``length [R]``.
    """
    users, starts, lengths, offsets = [], [], [], []
    offset = 0
    for user, history in zip(user_ids, histories):
        n_positions = len(history) - 1
        for end in reversed(range(n_positions, 0, -max_len)):  # oldest window first
            start = max(0, end - max_len)
            users.append(user)
            starts.append(offset + start)
            lengths.append(end - start)
        offsets.append(offset)
        offset += len(history)
    flat = np.concatenate(histories) if histories else np.zeros(0, dtype=np.int64)
    n_rows = len(users)
    starts, lengths = np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    column = np.arange(max_len)
    valid = column[None, :] < lengths[:, None]  # [R L]
    index = np.where(valid, starts[:, None] + column[None, :], 0)
    item_seq = np.where(valid, flat[index] if n_rows else 0, 0)
    targets = np.where(valid, flat[np.minimum(index + 1, max(len(flat) - 1, 0))] if n_rows else 0, 0)
    return (
        torch.as_tensor(np.asarray(users, dtype=np.int64)),
        torch.as_tensor(item_seq, dtype=torch.int64).reshape(n_rows, max_len),
        torch.as_tensor(targets, dtype=torch.int64).reshape(n_rows, max_len),
        torch.as_tensor(lengths),
    )


def build_sequence_train_dataset(config, train_dataset):
    """A copy of RecBole's training split whose rows are whole training histories (windows of them).

    The rows hold ``user_id``, ``item_id_list`` [R, L] (right-padded, like RecBole's evaluation rows),
    ``target_item_id_list`` [R, L] (the next item at every position, 0 at padding), ``item_length`` [R] and
    ``item_id`` (the target at the last position, so last-position code keeps working). ``training_split`` keeps
    RecBole's training split itself, for what needs its interactions (ratings, timestamps), such as user text.
    """
    max_len = config["MAX_ITEM_LIST_LENGTH"]
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        raise ValueError(f"MAX_ITEM_LIST_LENGTH must be a positive int, got {max_len!r}")
    user_ids, histories = training_histories(train_dataset)
    user, item_seq, targets, length = window_rows(user_ids, histories, max_len)
    last_target = targets.gather(1, (length - 1).clamp(min=0).unsqueeze(1)).squeeze(1)

    dataset = train_dataset.copy(
        Interaction(
            {
                train_dataset.uid_field: user,
                train_dataset.item_id_list_field: item_seq,
                target_list_field(config): targets,
                train_dataset.item_list_length_field: length,
                train_dataset.iid_field: last_target,
            }
        )
    )
    # field properties are shared with the original dataset by the shallow copy: give the copy its own
    for attr in ("field2type", "field2source", "field2seqlen"):
        setattr(dataset, attr, copy.copy(getattr(dataset, attr)))
    dataset.set_field_property(target_list_field(config), FeatureType.TOKEN_SEQ, FeatureSource.INTERACTION, max_len)
    dataset.training_split = train_dataset
    return dataset
