"""Evaluation slices: metrics per group of evaluated users, computed by RecBole's own metric code.

Groups (config ``eval_slices: True``, the default):

- ``head`` / ``tail``: the target item is among the ``slice_head_share`` (default 0.2) most-interacted items of the
  training split (ties broken by item id), or not; only when every evaluated row has one target (sequential
  leave-one-out);
- ``short`` / ``long``: the user's number of training interactions is at most the median of the evaluated users',
  or above it;
- ``cold``: the target is a cold item of the cold-item protocol (``cold_items: True``,
  :mod:`recbole_ur4rec.data.cold_items`).

RecBole's full-sort evaluation collects one row per evaluated user (``rec.topk``: the hits in the top k and the
number of positives); a group's metrics are RecBole's evaluator run on that group's rows. Each group's metric
``m`` is reported as ``m/<group>`` beside the overall ``m``, with ``users/<group>`` its number of evaluated rows.
"""
import copy
import math
from typing import NamedTuple

import torch

GROUPS = ("head", "tail", "short", "long", "cold")


class TrainingCounts(NamedTuple):
    """Training interactions per item id ``[n_items]`` and per user id ``[n_users]``; the cold items (ids) of the
    cold-item protocol, or None."""

    items: torch.Tensor
    users: torch.Tensor
    cold: torch.Tensor = None


def training_counts(train_dataset, cold_items=None):
    """Counts of the training split's rows (one per training interaction on the plugin's data path; one per
    target of a prefix row on RecBole's) by item and by user."""
    feat = train_dataset.inter_feat
    items = torch.bincount(feat[train_dataset.iid_field].long(), minlength=train_dataset.item_num)
    users = torch.bincount(feat[train_dataset.uid_field].long(), minlength=train_dataset.user_num)
    return TrainingCounts(items, users, cold_items)


def items_with_training_interactions(train_dataset):
    """Bool ``[n_items]``: the items of the training split's interactions, the items of its rows' histories included
    (on RecBole's prefix rows an item that is only ever first in a sequence is never a target, so a count of targets
    misses it)."""
    feat = train_dataset.inter_feat
    seen = torch.zeros(train_dataset.item_num, dtype=torch.bool)
    seen[feat[train_dataset.iid_field].long()] = True
    history = train_dataset.iid_field + train_dataset.config["LIST_SUFFIX"]
    if history in feat:
        seen[feat[history].long().flatten()] = True
        seen[0] = False  # padding
    return seen


def head_items(item_counts, head_share):
    """Bool ``[n_items]``: the ``ceil(head_share * (n_items - 1))`` most-interacted items (padding 0 excluded)."""
    n_head = math.ceil(head_share * (len(item_counts) - 1))
    order = torch.argsort(-item_counts[1:], stable=True)[:n_head] + 1  # stable: ties by item id
    head = torch.zeros(len(item_counts), dtype=torch.bool)
    head[order] = True
    return head


def batch_rows(interaction, positive_u, positive_i, uid_field):
    """(users [B], targets [B] or None) of one full-sort evaluation batch; targets only when each row has one."""
    users = interaction[uid_field].cpu()
    counts = torch.bincount(positive_u.cpu(), minlength=len(users))
    if not bool((counts == 1).all()):
        return users, None
    targets = torch.zeros(len(users), dtype=torch.long)
    targets[positive_u.cpu()] = positive_i.cpu().long()
    return users, targets


def slice_masks(counts, users, targets, head_share):
    """{group: bool [N]} for evaluated rows of ``users`` [N] with ``targets`` [N] (None: no popularity groups)."""
    masks = {}
    if targets is not None:
        head = head_items(counts.items, head_share)[targets]
        masks["head"], masks["tail"] = head, ~head
        if counts.cold is not None:
            masks["cold"] = torch.isin(targets, counts.cold)
    history = counts.users[users]
    median = history.double().median()
    masks["short"], masks["long"] = history <= median, history > median
    return masks


def subset_struct(struct, mask):
    """A copy of RecBole's DataStruct with only the rows ``mask`` of its per-row entries (``rec.*``)."""
    sub = copy.copy(struct)
    sub._data_dict = dict(struct._data_dict)
    for key, value in struct._data_dict.items():
        if key.startswith("rec.") and isinstance(value, torch.Tensor) and value.dim() > 0 and len(value) == len(mask):
            sub._data_dict[key] = value[mask]
    return sub


class EvaluatedRows(NamedTuple):
    """One full-sort evaluation's rows: the evaluated users ``[N]`` and RecBole's collected DataStruct, whose
    ``rec.*`` entries hold one row per user in the same order (``rec.topk``: the hits in the top k, positives)."""

    users: torch.Tensor
    struct: object


def row_metrics(evaluator, struct):
    """``{metric@k: [N] array}``: each evaluated row's value of RecBole's per-user top-k metrics (hit, ndcg, mrr,
    recall, precision, map, averagepopularity, tailpercentage), computed by RecBole's own metric classes (their mean
    over the rows is what RecBole reports, before rounding)."""
    rows = {}
    for name, metric in evaluator.metric_class.items():
        values = {}
        if hasattr(metric, "topk"):  # a per-user metric hands its [N, max k] values to topk_result: keep them

            def keep(label, value, m=metric, values=values):
                values.update({f"{label}@{k}": value[:, k - 1] for k in m.topk})

            metric.topk_result = keep
            try:
                metric.calculate_metric(struct)
            finally:
                del metric.topk_result  # back to the class's averaging
        if not values:
            raise ValueError(
                f"per-user values (node-side evaluation, paired tests) exist for per-user top-k metrics only; config key "
                f"'metrics' names {name!r}, which RecBole computes over all users at once"
            )
        rows.update(values)
    return rows


def user_values(trainer, dataset, metric):
    """``{"users": [user tokens], metric: [values]}`` of ``trainer``'s latest full-ranking evaluation (its
    ``last_evaluated_rows``), one entry per evaluated user; None when that evaluation kept no rows (FedDMMR's
    node-side and sampled evaluations)."""
    rows = trainer.last_evaluated_rows
    if rows is None:
        return None
    values = row_metrics(trainer.evaluator, rows.struct)
    if metric not in values:
        raise ValueError(f"metric {metric!r}: the evaluation computed {', '.join(values)} (config key 'metrics', 'topk')")
    tokens = dataset.id2token(dataset.uid_field, rows.users.numpy())
    return {"users": tokens.tolist(), metric: values[metric].tolist()}


def slice_results(evaluator, struct, masks):
    """``{metric/group: value, users/group: size}`` from RecBole's ``evaluator`` on each group's rows."""
    out = {}
    for group in GROUPS:
        if group not in masks:
            continue
        mask = masks[group]
        out[f"users/{group}"] = int(mask.sum())
        if mask.any():
            for metric, value in evaluator.evaluate(subset_struct(struct, mask)).items():
                out[f"{metric}/{group}"] = value
    return out
