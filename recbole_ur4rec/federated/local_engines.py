"""Clients, round plans and the two in-process engines that run the client updates of a round.

A client is one user: it holds only that user's whole-sequence training rows. A round's :func:`round_plan` (a
function of the seed and the round index only, so a resumed run replays it) samples the clients and the order of
each client's rows in every local epoch. Both engines then run, for every sampled client, ``local_epochs`` passes
of the local optimizer (Adam, fresh per client and round, or plain SGD) over its rows in steps of ``train_batch_size``
rows, starting from the global weights (and the client's own copy of the local parameters), and hand the aggregator
the updates and sample counts:

- :class:`LoopEngine`: the reference: one model copy, loaded and trained client after client;
- :class:`BatchedEngine`: ``client_batch_size`` clients at once: their parameters are stacked ``[C, ...]`` and one
  ``torch.func.vmap`` of ``grad(functional_call(model.dense_loss))`` computes every client's gradient in one call;
  a vectorised Adam updates only the clients that still have a batch at that step.

Both give the same updates up to float rounding when the model has no dropout (with dropout each draws its own).
"""
import copy
import math
import warnings
from logging import getLogger

import numpy as np
import torch
from torch.func import functional_call, grad_and_value, vmap

from recbole_ur4rec.federated.functional import MethodCall

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults
LOCAL_OPTIMIZERS = ("adam", "sgd")


class ClientData:
    """Every client's training rows (indices into the whole-sequence training rows) and sample count.

    The sample count ``n_k`` of a client is its number of supervised positions (training interactions).
    """

    def __init__(self, dataset, target_field):
        self._index(dataset.inter_feat, dataset.item_id_list_field, target_field, dataset.uid_field)

    @classmethod
    def from_rows(cls, feat, item_seq_field, target_field, uid_field):
        """The clients of whole-sequence training rows ``feat`` (an Interaction), e.g. a node's partition."""
        data = cls.__new__(cls)
        data._index(feat, item_seq_field, target_field, uid_field)
        return data

    def _index(self, feat, item_seq_field, target_field, uid_field):
        self.item_seq = feat[item_seq_field]  # [R L]
        self.targets = feat[target_field]  # [R L]
        self.interaction = feat
        users = feat[uid_field].numpy()
        order = np.argsort(users, kind="stable")
        ids, starts = np.unique(users[order], return_index=True)
        bounds = np.r_[starts, len(users)]
        self.clients = ids.astype(np.int64)  # sorted user ids
        self.rows = {int(u): torch.as_tensor(order[bounds[i] : bounds[i + 1]]) for i, u in enumerate(ids)}
        positions = (self.targets > 0).sum(1)
        self.counts = {u: int(positions[rows].sum()) for u, rows in self.rows.items()}
        self.n_rows = {u: len(rows) for u, rows in self.rows.items()}


def round_plan(seed, round_idx, clients, fraction, local_epochs, n_rows):
    """Sampled clients (sorted) and, per client, one row permutation per local epoch; depends only on its arguments."""
    rng = np.random.default_rng([int(seed), int(round_idx)])
    k = max(1, int(round(fraction * len(clients))))
    sampled = sorted(int(c) for c in rng.choice(clients, size=k, replace=False))
    orders = {c: [torch.as_tensor(rng.permutation(n_rows[c])) for _ in range(local_epochs)] for c in sampled}
    return sampled, orders


class Engine:
    """Runs the client updates of a round; subclasses say how."""

    def __init__(self, model, data, learning_rate, batch_size, optimizer="adam"):
        if optimizer not in LOCAL_OPTIMIZERS:
            raise ValueError(f"config key 'local_optimizer' must be one of {', '.join(LOCAL_OPTIMIZERS)}, got {optimizer!r}")
        self.model, self.data = model, data
        self.lr, self.batch_size, self.optimizer = learning_rate, batch_size, optimizer
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]

    def start_params(self, clients, global_params, local_params):
        """Stacked [C ..] starting parameters: global, or the clients' own copies of the local ones."""
        start = {}
        for name in self.names:
            if name in local_params:
                start[name] = local_params[name][clients].clone()
            else:
                start[name] = global_params[name].unsqueeze(0).expand(len(clients), *global_params[name].shape).clone()
        return start

    def run(self, clients, orders, global_params, local_params, aggregator):
        """Train ``clients``; add their updates to ``aggregator``; return ({client: new local params}, [losses])."""
        raise NotImplementedError

    def _finish(self, clients, start, final, global_params, local_params, losses, aggregator):
        deltas = {name: final[name] - global_params[name] for name in global_params}
        counts = [self.data.counts[c] for c in clients]
        loss_ok = torch.tensor([math.isfinite(x) for x in losses])
        for name in deltas:  # a non-finite loss makes the update non-finite, so the aggregator leaves the client out
            deltas[name][~loss_ok] = float("nan")
        left_out = set(aggregator.add(clients, deltas, counts))
        if not global_params:
            left_out |= {c for c, ok in zip(clients, loss_ok.tolist()) if not ok}
        new_local = {}
        for i, client in enumerate(clients):
            if client not in left_out and all(final[n][i].isfinite().all() for n in local_params):
                new_local[client] = {name: final[name][i] for name in local_params}
        return new_local


class LoopEngine(Engine):
    """The reference engine: one model copy, trained client after client with ``torch.optim.Adam`` (or ``SGD``)."""

    def run(self, clients, orders, global_params, local_params, aggregator):
        worker = copy.deepcopy(self.model)
        worker.train()
        params = dict(worker.named_parameters())
        new_local, losses = {}, []
        for client in clients:
            try:
                start = self.start_params([client], global_params, local_params)
                final, loss = self._train_one(worker, params, client, orders[client], start)
            except Exception as error:  # the client-failure rule: log, leave out, go on
                aggregator.fail(client, error)
                continue
            losses.append(loss)
            new_local.update(self._finish([client], start, final, global_params, local_params, [loss], aggregator))
        return new_local, losses

    def _train_one(self, worker, params, client, client_orders, start):
        with torch.no_grad():
            for name in self.names:
                params[name].copy_(start[name][0])
        trained = [params[name] for name in self.names]
        if self.optimizer == "adam":
            optimizer = torch.optim.Adam(trained, lr=self.lr, betas=BETAS, eps=EPS)
        else:
            optimizer = torch.optim.SGD(trained, lr=self.lr)
        rows, total, steps = self.data.rows[client], 0.0, 0
        for order in client_orders:
            for begin in range(0, len(rows), self.batch_size):
                batch = self.data.interaction[rows[order[begin : begin + self.batch_size]]]
                optimizer.zero_grad()
                loss = worker.calculate_loss(batch)
                loss.backward()
                optimizer.step()
                total, steps = total + loss.item(), steps + 1
        return {name: params[name].detach().clone().unsqueeze(0) for name in self.names}, total / max(steps, 1)


class BatchedEngine(Engine):
    """``client_batch_size`` clients per vectorised step (``torch.func.vmap`` over stacked parameters)."""

    def __init__(self, model, data, learning_rate, batch_size, client_batch_size, optimizer="adam"):
        super().__init__(model, data, learning_rate, batch_size, optimizer)
        if getattr(model, "loss_type", "CE") != "CE":
            raise ValueError(
                f"federated_engine 'batched' needs loss_type CE (got {model.loss_type!r}): SSM's candidate set has a "
                "data-dependent shape that vmap cannot batch; use federated_engine 'loop'"
            )
        self.client_batch_size = client_batch_size
        call = MethodCall(model)

        def loss(params, item_seq, targets):
            return functional_call(call, params, ("dense_loss", item_seq, targets), strict=False)

        has_dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()) or any(
            getattr(m, "attn_dropout_prob", 0) > 0 for m in model.modules()
        )
        self.grad_fn = vmap(grad_and_value(loss), randomness="different" if has_dropout else "error")

    def run(self, clients, orders, global_params, local_params, aggregator):
        # clients with similar numbers of rows share a chunk, so little padding is computed
        by_size = sorted(clients, key=lambda c: (len(self.data.rows[c]), c))
        new_local, losses = {}, []
        for begin in range(0, len(by_size), self.client_batch_size):
            chunk = by_size[begin : begin + self.client_batch_size]
            try:
                start = self.start_params(chunk, global_params, local_params)
                final, chunk_losses = self._train_chunk(chunk, orders, start)
            except Exception as error:  # some client of the chunk fails: find it by training them one by one
                getLogger().warning(f"a batched client update failed ({type(error).__name__}: {error}); retrying its clients one by one")
                loop = LoopEngine(self.model, self.data, self.lr, self.batch_size, self.optimizer)
                chunk_local, chunk_losses = loop.run(chunk, orders, global_params, local_params, aggregator)
                new_local.update(chunk_local)
                losses += chunk_losses
                continue
            losses += chunk_losses
            new_local.update(self._finish(chunk, start, final, global_params, local_params, chunk_losses, aggregator))
        return new_local, losses

    def _train_chunk(self, chunk, orders, params):
        self.model.train()
        n_clients, b = len(chunk), self.batch_size
        rows = [self.data.rows[c] for c in chunk]
        exp_avg = {n: torch.zeros_like(p) for n, p in params.items()}
        exp_avg_sq = {n: torch.zeros_like(p) for n, p in params.items()}
        step = torch.zeros(n_clients)
        total, n_steps = torch.zeros(n_clients), torch.zeros(n_clients)
        n_epochs = len(orders[chunk[0]])
        for epoch in range(n_epochs):
            n_batches = max(math.ceil(len(r) / b) for r in rows)
            for s in range(n_batches):
                picked = [r[orders[c][epoch][s * b : (s + 1) * b]] for c, r in zip(chunk, rows)]
                active = torch.tensor([len(p) > 0 for p in picked])
                width = max(len(p) for p in picked)
                seq = torch.zeros(n_clients, width, self.data.item_seq.size(1), dtype=torch.long)
                tgt = torch.zeros_like(seq)
                for i, p in enumerate(picked):
                    seq[i, : len(p)], tgt[i, : len(p)] = self.data.item_seq[p], self.data.targets[p]
                length = int((tgt > 0).sum(-1).max())  # cut to the longest row of the step
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*batching rule.*")
                    grads, loss = self.grad_fn({"model." + n: p for n, p in params.items()}, seq[..., :length], tgt[..., :length])
                step += active.float()
                total += torch.where(active, loss.detach(), torch.zeros_like(loss))
                n_steps += active.float()
                with torch.no_grad():
                    grads = {n: grads["model." + n] for n in params}
                    if self.optimizer == "adam":
                        self._adam(params, grads, exp_avg, exp_avg_sq, step, active)
                    else:
                        for name, p in params.items():
                            on = active.view((-1,) + (1,) * (p.dim() - 1))
                            params[name] = torch.where(on, p - self.lr * grads[name], p)
        return params, (total / n_steps.clamp(min=1)).tolist()

    def _adam(self, params, grads, exp_avg, exp_avg_sq, step, active):
        """torch.optim.Adam's update, per client (its own step count), applied only where ``active``."""
        beta1, beta2 = BETAS
        t = step.clamp(min=1)
        for name, p in params.items():
            shape = (-1,) + (1,) * (p.dim() - 1)
            on = active.view(shape)
            g = grads[name]
            m = torch.where(on, beta1 * exp_avg[name] + (1 - beta1) * g, exp_avg[name])
            v = torch.where(on, beta2 * exp_avg_sq[name] + (1 - beta2) * g * g, exp_avg_sq[name])
            bias1, bias2 = (1 - beta1**t).view(shape), (1 - beta2**t).view(shape)
            update = (self.lr / bias1) * m / (v.sqrt() / bias2.sqrt() + EPS)
            params[name] = torch.where(on, p - update, p)
            exp_avg[name], exp_avg_sq[name] = m, v


ENGINES = {"loop": LoopEngine, "batched": BatchedEngine}
