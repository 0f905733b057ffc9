"""Training loader for prefix rows whose item lists are gathered per batch (``loss_position: last``), and the rows of
each rank in a distributed run (:func:`rank_loader`)."""
import numpy as np
import torch.distributed as dist
from recbole.data.dataloader import TrainDataLoader
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
