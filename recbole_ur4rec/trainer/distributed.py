"""Distributed training on RecBole's trainers: every rank holds the whole model, trains on its share of each batch
(:func:`~recbole_ur4rec.data.dataloader.rank_loader`) and the ranks average their gradients after each backward pass.

RecBole wraps the model in ``DistributedDataParallel``, whose set of trained parameters is fixed when it is built;
the plugin's staged trainers freeze and unfreeze parameter groups between steps, so the gradients are averaged here
instead, in one all-reduce per step at the end of the backward pass (what DDP does, without overlapping it with the
backward), each rank's gradient weighted by the loss units of its share (the supervised positions, or the rows),
so that ``W`` ranks with ``b / W`` rows each take the step one process takes with ``b`` rows. Evaluation merges the
ranks' collected rows (not their metrics) in one process's batch order, so the metrics are one process's.
"""
import os

import torch
from torch.autograd import Variable

from recbole_ur4rec.common import distributed

# the DataStruct entries RecBole's collector fills batch by batch (recbole/evaluator/collector.py get_data_struct)
ROW_KEYS = ("rec.items", "rec.topk", "rec.meanrank", "rec.score", "data.label")


class _AverageAtBackwardEnd(torch.autograd.Function):
    """A zero added to the loss; its backward queues the gradient averaging for the end of the backward pass."""

    @staticmethod
    def forward(ctx, anchor, trainer):
        ctx.trainer = trainer
        return anchor.detach() * 0

    @staticmethod
    def backward(ctx, grad):
        Variable._execution_engine.queue_callback(ctx.trainer.average_gradients)  # as DDP finalises its reduction
        return grad, None


def loss_units(model, interaction):
    """What the model's loss is a mean over in ``interaction``: its ``loss_units`` (the plugin's models: supervised
    positions), else the rows (RecBole's models)."""
    units = getattr(model, "loss_units", None)
    return float(units(interaction)) if units is not None else float(len(interaction))


class DistributedTrainingMixin:
    """Put before a RecBole ``Trainer`` in the bases (:class:`~recbole_ur4rec.trainer.SafeCheckpointMixin` does): in
    a distributed run (config ``single_spec`` False) the model starts from rank 0's weights and the gradients are
    averaged over the ranks; in one process nothing changes."""

    distributed = False
    _step_units = 1.0  # the loss units of this rank's share of the current batch

    def __init__(self, config, model):
        self.distributed = not config["single_spec"]
        if not self.distributed:
            super().__init__(config, model)
            return
        os.makedirs(config["checkpoint_dir"], exist_ok=True)  # RecBole's Trainer creates it unguarded: ranks race
        config["single_spec"] = True  # RecBole's AbstractTrainer would wrap the model in DDP (CUDA device ids only)
        try:
            super().__init__(config, model)
        finally:
            config["single_spec"] = False
        self._anchor = torch.zeros((), device=self.device, requires_grad=True)
        distributed.broadcast_tensors(list(self.model.state_dict(keep_vars=True).values()))  # rank 0's initial weights

    # ---- RecBole's hooks in its _train_epoch ---------------------------------------------------------------
    def set_reduce_hook(self):
        """RecBole prepares DDP's reduction here before each forward pass; nothing to prepare."""

    def sync_grad_loss(self):
        """RecBole adds this to the loss before the backward pass: a zero whose backward averages the gradients."""
        return _AverageAtBackwardEnd.apply(self._anchor, self)

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if not self.distributed:
            return super()._train_epoch(train_data, epoch_idx, loss_func, show_progress)
        loss_func = loss_func or self.model.calculate_loss

        def counted(interaction):
            self.begin_step(interaction)
            return loss_func(interaction)

        return super()._train_epoch(train_data, epoch_idx, counted, show_progress)

    def begin_step(self, interaction):
        """Record this rank's loss units of the batch ``interaction`` (its weight in the gradient mean; also what
        :func:`~recbole_ur4rec.common.distributed.gather_rows` weighs by) before the loss is computed."""
        self._step_units = loss_units(self.model, interaction)
        distributed.set_step_weight(self._step_units)
        return self._step_units

    def average_gradients(self, units=None):
        """Replace every trained parameter's gradient by the ranks' mean, each rank weighted by its loss ``units``
        (default: those of the current batch), in one float32 all-reduce; a parameter no rank computed a gradient for
        keeps none."""
        if not self.distributed:
            return
        units = self._step_units if units is None else float(units)
        params = [p for p in self.model.parameters() if p.requires_grad]
        flat = torch.cat(
            [(p.grad.detach() if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() * units for p in params]
            + [torch.tensor([float(p.grad is not None) for p in params] + [units], device=self.device)]
        )
        distributed.all_reduce_sum(flat)
        total, computed = flat[-1].item(), flat[-1 - len(params) : -1].tolist()
        offset = 0
        for p, seen in zip(params, computed):
            n = p.numel()
            p.grad = (flat[offset : offset + n] / max(total, 1e-12)).view_as(p).to(p.dtype) if seen > 0 else None
            offset += n

    def _map_reduce(self, result, num_sample):
        """RecBole's merge of the ranks' metrics (weighted by batch count); the rows are merged before the metrics
        are computed instead (:func:`merge_rows`), so ``result`` is the whole evaluation's already."""
        return result

    def all_ranks_mean(self, values):
        """The ranks' mean of a list of numbers (e.g. a staged trainer's losses that decide its alternation)."""
        if not self.distributed:
            return values
        summed = distributed.all_reduce_sum(torch.tensor(values, dtype=torch.float64))
        return (summed / distributed.world_size()).tolist()


def merge_rows(local, batch_sizes):
    """The whole evaluation's rows on every rank, in one process's batch order.

    Args:
        local (dict): name -> this rank's rows of its batches, concatenated (RecBole's ``rec.*`` entries, users...).
        batch_sizes (list): per batch of this rank, {name: rows}.

    Returns:
        dict: name -> every rank's rows; batch ``j`` was rank ``j % world_size``'s batch ``j // world_size``.
    """
    parts = distributed.all_gather_plain({"rows": local, "sizes": batch_sizes})
    world = len(parts)
    batches = []  # per rank: its batches, each {name: tensor}
    for part in parts:
        offsets, rank_batches = {}, []
        for sizes in part["sizes"]:
            batch = {}
            for name, n in sizes.items():
                start = offsets.get(name, 0)
                batch[name] = part["rows"][name][start : start + n]
                offsets[name] = start + n
            rank_batches.append(batch)
        batches.append(rank_batches)
    ordered = [batches[j % world][j // world] for j in range(sum(len(b) for b in batches))]
    names = {name for batch in ordered for name in batch}
    return {name: torch.cat([batch[name] for batch in ordered if name in batch]) for name in names}
