"""Training loader for prefix rows whose item lists are gathered per batch (``loss_position: last``), the evaluation
loader that removes each user's earlier items from the ranking (``mask_sequence_history``), and the rows of each rank
in a distributed run (:func:`rank_loader`)."""
import numpy as np
import torch
import torch.distributed as dist
from recbole.data.dataloader import FullSortEvalDataLoader, TrainDataLoader
from recbole.data.interaction import Interaction
from torch.utils.data import DataLoader, RandomSampler, Sampler

from recbole_ur4rec.data.sequence_dataset import prefix_item_lists


class PrefixTrainDataLoader(TrainDataLoader):
    """RecBole's :class:`TrainDataLoader` over :func:`~recbole_ur4rec.data.sequence_dataset.build_prefix_train_dataset`
    rows: each batch gets its ``item_id_list`` [B, L] from the flat training history, so memory stays ~ interactions.
    """

    def collate_fn(self, index):
        data = self._dataset[np.array(index)]
        data.update(Interaction({self._dataset.item_id_list_field: prefix_item_lists(self._dataset, data)}))
        return self._neg_sampling(self.transform(self._dataset, data))


def training_items(train_split):
    """Every user's training items as CSR ``(indptr [n_users + 1], items)``, items sorted per user: the items of the
    split's rows (one per interaction on the plugin's data path, one per target on RecBole's) and of their item lists
    (RecBole's prefix rows hold each user's first item only there)."""
    feat, uid, iid = train_split.inter_feat, train_split.uid_field, train_split.iid_field
    users, items = [feat[uid].long()], [feat[iid].long()]
    list_field = iid + train_split.config["LIST_SUFFIX"]
    if list_field in feat:
        lists = feat[list_field]
        rows, cols = lists.nonzero(as_tuple=True)
        users.append(feat[uid][rows].long())
        items.append(lists[rows, cols].long())
    n_users, n_items = train_split.user_num, train_split.item_num
    pairs = torch.unique(torch.cat(users) * n_items + torch.cat(items))  # sorted: by user, then item
    indptr = torch.zeros(n_users + 1, dtype=torch.long)
    indptr[1:] = torch.cumsum(torch.bincount(pairs // n_items, minlength=n_users), 0)
    return indptr, pairs % n_items


class EarlierItemsEvalDataLoader(FullSortEvalDataLoader):
    """RecBole's full-sort loader of sequential rows whose batches also carry, as ``history_index``, each row's
    earlier items: its user's training items and its item list (at test, the validation item too). RecBole's trainer
    scores them -inf, as the S3Rec / ICSRec / eSASRec codebases evaluate (``mask_sequence_history: True``).
    :meth:`set_training_items` must be called before the first batch."""

    earlier = None  # (indptr, items): every user's training items

    def set_training_items(self, indptr, items):
        """Use these training items (:func:`training_items`), after checking that no evaluated target is among its
        row's earlier items (a masked target could never be ranked).

        Raises:
            ValueError: naming the key, the split's size and the first such users.
        """
        self.earlier = (indptr, items)
        feat = self._dataset.inter_feat
        rows, masked = self.earlier_items(feat)
        hit = masked == feat[self._dataset.iid_field][rows]
        if bool(hit.any()):
            users = self._dataset.id2token(self._dataset.uid_field, feat[self._dataset.uid_field][rows[hit]][:5].numpy())
            raise ValueError(
                f"mask_sequence_history: True removes every earlier item of a user from the ranking, but "
                f"{int(hit.sum())} of the {len(feat)} evaluated rows of {self._dataset.dataset_name!r} have their target "
                f"among their earlier items (users {', '.join(map(str, users))}, ...): a repeated item could never be "
                f"ranked; set mask_sequence_history: False on data with repeats"
            )

    def earlier_items(self, interaction):
        """(rows, items): the earlier items of every row of ``interaction``, as index pairs (duplicates allowed)."""
        indptr, items = self.earlier
        users = interaction[self._dataset.uid_field].long()
        starts, counts = indptr[users], indptr[users + 1] - indptr[users]
        rows = torch.repeat_interleave(torch.arange(len(users)), counts)
        first_of_row = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        train_items = items[torch.repeat_interleave(starts, counts) + torch.arange(int(counts.sum())) - first_of_row]
        lists = interaction[self._dataset.iid_field + self.config["LIST_SUFFIX"]]
        list_rows, cols = lists.nonzero(as_tuple=True)
        return torch.cat([rows, list_rows]), torch.cat([train_items, lists[list_rows, cols].long()])

    def collate_fn(self, index):
        interaction, _, positive_u, positive_i = super().collate_fn(index)
        return interaction, self.earlier_items(interaction), positive_u, positive_i


class RankShareSampler(Sampler):
    """This rank's rows of a distributed training epoch: every batch of one process's epoch (the same permutation of
    ``n`` rows, from the loader's generator, as ``RandomSampler`` draws it) split into ``world_size`` equal shares, so
    that the ranks' step ``k`` together train on one process's batch ``k``. An epoch's last batch, when its rows do
    not split evenly, repeats its first rows (at most ``world_size - 1``), as torch's ``DistributedSampler`` pads."""

    def __init__(self, n, batch_size, rank, world_size, shuffle, generator):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.shuffle, self.generator = shuffle, generator

    def _bounds(self, lo):
        size = min(self.batch_size, self.n - lo)
        share = -(-size // self.world_size)
        return lo, size, share

    def __iter__(self):
        order = list(RandomSampler(range(self.n), generator=self.generator)) if self.shuffle else list(range(self.n))
        for lo in range(0, self.n, self.batch_size):
            lo, size, share = self._bounds(lo)
            batch = order[lo : lo + size]
            batch += batch[: share * self.world_size - size]  # the padding of an uneven last batch
            yield from batch[self.rank * share : (self.rank + 1) * share]

    def __len__(self):
        return sum(self._bounds(lo)[2] for lo in range(0, self.n, self.batch_size))

    def set_epoch(self, epoch):
        """RecBole's trainer calls it, as for ``DistributedSampler``; the epoch's order comes from the generator."""


class RankBatchSampler(Sampler):
    """This rank's batches of a distributed evaluation: one process's batches (``batch_size`` consecutive rows),
    batch ``j`` on rank ``j % world_size``; no row is evaluated twice, and each batch is scored as one process
    scores it (same rows, same shapes)."""

    def __init__(self, n, batch_size, rank, world_size):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size

    def __iter__(self):
        for lo in range(self.rank * self.batch_size, self.n, self.world_size * self.batch_size):
            yield from range(lo, min(lo + self.batch_size, self.n))

    def __len__(self):
        return sum(min(self.batch_size, self.n - lo) for lo in range(self.rank * self.batch_size, self.n, self.world_size * self.batch_size))


class _RankRows(DataLoader):
    """Between RecBole's ``AbstractDataLoader`` and torch's ``DataLoader`` in a distributed loader's bases: replaces
    the padded ``DistributedSampler`` RecBole builds (it divides the batch by the world size and repeats rows to even
    the shares, so that evaluation counts some users twice) by :class:`RankShareSampler` (training) or
    :class:`RankBatchSampler` (evaluation, whole batches)."""

    training = True

    def __init__(self, dataset, batch_size, sampler=None, shuffle=False, **kwargs):
        rank, world = dist.get_rank(), dist.get_world_size()
        self._init_batch_size_and_step()  # one process's batch, before RecBole divided it
        if self.training:
            if self.step % world:
                raise ValueError(
                    f"train_batch_size {self.config['train_batch_size']} (a batch of {self.step} rows) must be a multiple "
                    f"of the world size {world}: every rank trains on an equal share of each batch"
                )
            sampler = RankShareSampler(self.sample_size, self.step, rank, world, self.shuffle, self.generator)
            self.step //= world
        else:
            sampler = RankBatchSampler(self.sample_size, self.step, rank, world)
        super().__init__(dataset, batch_size=self.step, sampler=sampler, shuffle=False, **kwargs)


class _EvalRankRows(_RankRows):
    training = False

    def __bool__(self):
        """Whether the whole evaluation has rows: a rank without batches still evaluates (RecBole skips a falsy
        loader), to take part in the merge."""
        return self.sample_size > 0


def rank_loader(loader_class, training):
    """``loader_class`` (a RecBole dataloader) with this rank's rows of a distributed run (see :class:`_RankRows`)."""
    share = _RankRows if training else _EvalRankRows
    return type(loader_class.__name__, (loader_class, share), {"__module__": loader_class.__module__})
