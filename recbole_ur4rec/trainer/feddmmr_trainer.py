"""Federated training of FedDMMR on RecBole's ``fit``: one federated round = one RecBole epoch.

Each round (``_train_epoch``): sample ``client_fraction`` of the clients (one per user, seeded by ``seed`` and the
round index), train each sampled client for ``local_epochs`` on its own rows from the global weights with
``local_optimizer`` (the engine of ``federated_engine``: in-process ``loop`` or ``batched``, or ``flower``), aggregate
with FedAvg weighted by sample counts and apply the mean update with ``server_optimizer`` (FedAvg, FedAvgM or FedAdam;
:mod:`recbole_ur4rec.federated`). RecBole's ``fit`` then validates, stops early and checkpoints as for any model; the
clients' local parameters live in the model's ``local__*`` buffers and the server optimizer's state in the resume
file, so the checkpoints and ``--resume`` carry them.

Partial aggregation: the parameter groups in ``local_groups`` are aggregated like the others for the first
``partial_aggregation_warmup_rounds`` rounds; from then on every client starts from, and keeps, its own copy of them
(initialised from the global values when the warm-up ends) and evaluation uses each user's own copy.
Failed rounds: a round in which fewer than ``min_round_clients`` sampled clients are aggregated (all failed, or no
node replied) leaves the global model and the server optimizer's state unchanged, is logged and counted; after
``max_failed_rounds`` consecutive failed rounds the run stops with a RuntimeError. The count is resumed with the run.

Differential privacy (``dp_noise_multiplier`` > 0, :mod:`recbole_ur4rec.federated.privacy`): user-level DP with
noise added where the clients' updates are summed, before the sum leaves its node (on the nodes of a partition; in
this process for the in-process engines, the one node there), from a secure random source; the aggregate is the
sum over the round's number of sampled users. After every round the log and the round record give epsilon at
``dp_delta`` for the user sampled most often so far (against the server, which knows the samples); the run's result
holds it under ``privacy``.

Partitioned data (``federation_dir``, :mod:`recbole_ur4rec.apps.partition_dataset`): this process is the server and
holds no interaction. The nodes (in this process with ``federated_engine: loop``, or Flower SuperNodes) train their
sampled users, keep the users' local parameters, and evaluate their users' validation and test rows with RecBole's
metric code, replying only metric sums (:mod:`recbole_ur4rec.federated.node`); the server's checkpoints hold the
global parameters and the server optimizer's state. The best checkpoint's round tells the nodes which version of
the local parameters the test evaluation uses.

``federated: False`` trains the same model centrally (RecBole's ``_train_epoch``), for comparison.
"""
import os
import time

import numpy as np
import torch
from recbole.trainer import Trainer
from recbole.utils import set_color

from recbole_ur4rec.common.checks import check_config_value as _check
from recbole_ur4rec.data.sequence_dataset import target_list_field
from recbole_ur4rec.federated import (
    ENGINES,
    LOCAL_OPTIMIZERS,
    BatchedEngine,
    ClientData,
    FedAvg,
    ServerOptimizer,
    round_plan,
)
from recbole_ur4rec.federated.catalog import FederationClients, NodeSplit, read_federation
from recbole_ur4rec.federated.node import LocalNodes, merge_metric_sums
from recbole_ur4rec.federated.privacy import UserLevelAccountant, node_noise_std
from recbole_ur4rec.trainer.safe_checkpoint import SafeCheckpointMixin

ENGINE_NAMES = (*ENGINES, "flower")  # flower: the nodes are Flower SuperNodes (recbole_ur4rec.federated.flower_nodes)


def _flower_nodes():
    """The Flower side of a round, imported only when chosen: flwr is heavy and unused by in-process runs."""
    from recbole_ur4rec.federated import flower_nodes

    return flower_nodes


class FedDMMRTrainer(SafeCheckpointMixin, Trainer):
    """Federated rounds as RecBole epochs (see the module docstring); ``federated: False`` trains centrally."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.federated = _check(config, "federated", None, choices=(True, False))
        self.client_fraction = _check(config, "client_fraction", (int, float), 0, 1, low_open=True)
        self.local_epochs = _check(config, "local_epochs", int, 1)
        self.client_batch_size = _check(config, "client_batch_size", int, 1)
        self.warmup_rounds = _check(config, "partial_aggregation_warmup_rounds", int, 0)
        self.dp_clip_norm = _check(config, "dp_clip_norm", (int, float), 0, low_open=True, optional=True)
        self.dp_noise_multiplier = _check(config, "dp_noise_multiplier", (int, float), 0)
        if self.dp_noise_multiplier > 0 and self.dp_clip_norm is None:
            raise ValueError("config key 'dp_noise_multiplier' > 0 needs 'dp_clip_norm' (the noise is scaled by the clipping norm)")
        self.dp = bool(self.federated) and self.dp_noise_multiplier > 0  # central training (federated: False) has no DP
        dp_delta = _check(config, "dp_delta", float, 0, 1, low_open=True, high_open=True)
        self.accountant = UserLevelAccountant(self.dp_noise_multiplier, dp_delta) if self.dp else None
        self.epsilons = []  # (round, epsilon) after every round under DP
        self.engine_name = _check(config, "federated_engine", None, choices=ENGINE_NAMES)
        if self.federated and config["loss_position"] != "all":
            raise ValueError(f"federated training needs loss_position: all (whole-sequence rows per client), got {config['loss_position']!r}")
        self.server_optimizer = ServerOptimizer(
            config["server_optimizer"],
            _check(config, "server_learning_rate", (int, float), 0, low_open=True),
            _check(config, "server_momentum", (int, float), 0, 1),
            _check(config, "server_adam_tau", (int, float), 0, low_open=True),
        )
        self.local_optimizer = _check(config, "local_optimizer", None, choices=LOCAL_OPTIMIZERS)
        self.local_learning_rate = _check(config, "local_learning_rate", (int, float), 0, low_open=True, optional=True)
        if self.local_learning_rate is None:
            self.local_learning_rate = config["learning_rate"]
        self.partitioned = bool(config["federation_dir"])
        if self.federated and self.distributed:
            raise ValueError(
                "config key 'federated' is True in a distributed run: FedDMMR's federated rounds spread their clients over "
                "Flower SuperNodes (federated_engine: flower), not over ranks; run federated: False (central training) "
                "distributed, or the federated run in one process"
            )
        if self.federated and self.engine_name == "flower" and not self.partitioned:
            raise ValueError(
                "federated_engine 'flower' trains on SuperNodes that each hold one partition of the data: write the "
                "partitions with python -m recbole_ur4rec.apps.partition_dataset and set config key 'federation_dir' (the "
                "server's copy: server/ and items/ only)"
            )
        if self.partitioned and not (self.federated and self.engine_name in ("loop", "flower")):
            raise ValueError(
                "config key 'federation_dir' (a partitioned dataset) trains federated on its nodes: it needs federated: True "
                f"and federated_engine 'loop' (nodes in this process) or 'flower', got federated: {self.federated}, "
                f"federated_engine: {self.engine_name!r}"
            )
        if self.federated and self.engine_name == "flower":
            _flower_nodes().require_session()  # fail before the data is built when not inside the Flower ServerApp
        self.min_round_clients = _check(config, "min_round_clients", int, 1)
        self.max_failed_rounds = _check(config, "max_failed_rounds", int, 1)
        self.seed = int(config["seed"])
        self.clients, self.engine, self.last_round = None, None, {}
        self.round_idx, self.best_round = -1, -1  # the last round run; the round of the best checkpoint
        self.failed_rounds = 0  # consecutive rounds with fewer than min_round_clients aggregated

    # ---- one round -----------------------------------------------------------------------------------------------
    def _setup(self, train_data):
        lr, batch = self.local_learning_rate, self.config["train_batch_size"]
        if self.partitioned:
            self.clients = FederationClients(read_federation(self.config["federation_dir"]))
            self.task = {
                "learning_rate": lr, "batch_size": batch, "optimizer": self.local_optimizer,
                "dp_clip_norm": self.dp_clip_norm, "dp_noise_multiplier": float(self.dp_noise_multiplier),
            }
            if self.engine_name == "flower":
                self.engine = _flower_nodes().FlowerNodes(self.clients)
            else:
                state = self.config["node_state_dir"] or os.path.join(self.config["checkpoint_dir"], "node-state")
                self.engine = LocalNodes(self.config, self.clients, state, type(self.model))
            return
        self.clients = ClientData(train_data._dataset, target_list_field(self.config))
        if self.engine_name == "batched":
            self.engine = BatchedEngine(self.model, self.clients, lr, batch, self.client_batch_size, self.local_optimizer)
        else:
            self.engine = ENGINES[self.engine_name](self.model, self.clients, lr, batch, self.local_optimizer)

    def local_names(self, round_idx):
        """The parameters kept on the clients in round ``round_idx`` (none during the warm-up)."""
        return list(self.model.local_names) if round_idx >= self.warmup_rounds else []

    def run_round(self, train_data, round_idx):
        """Run federated round ``round_idx``; return the mean local training loss of the clients that finished."""
        if self.clients is None:
            self._setup(train_data)
        model = self.model
        begin = time.time()
        self.round_idx = round_idx
        local = self.local_names(round_idx)
        if self.partitioned:  # the local parameters live on the nodes: no per-user buffer on the server
            buffers = {}
            if local:
                model.local_active.fill_(True)
        else:
            buffers = {name: getattr(model, model.local_buffer(name)) for name in local}
            if local and not bool(model.local_active):  # the warm-up ends: every client starts from the global values
                with torch.no_grad():
                    for name, buffer in buffers.items():
                        buffer.copy_(model.get_parameter(name).detach().unsqueeze(0).expand_as(buffer))
                    model.local_active.fill_(True)
        n_rows = self.clients.n_rows
        sampled, orders = round_plan(self.seed, round_idx, self.clients.clients, self.client_fraction, self.local_epochs, n_rows)
        params = dict(model.named_parameters())
        global_params, local_init = self._split_parameters(local)
        aggregator = FedAvg(global_params, self.dp_clip_norm, uniform=self.dp)
        if self.partitioned:
            new_local = {}
            loss_sum, loss_count = self.engine.train_round(round_idx, sampled, orders, global_params, local, local_init, self.task, aggregator)
            loss = loss_sum / loss_count if loss_count else float("nan")
            self.engine.prune(self.best_round)
        else:
            new_local, losses = self.engine.run(sampled, orders, global_params, buffers, aggregator)
            loss = float(np.mean(losses)) if losses else float("nan")
            if self.dp:  # this process is the only node: its sum gets the node's noise
                aggregator.add_noise(node_noise_std(self.dp_clip_norm, self.dp_noise_multiplier))
        epsilon = None
        if self.dp:
            self.accountant.step(sampled)
            epsilon = self.accountant.epsilon()
            self.epsilons.append((round_idx, epsilon))
        failed = aggregator.n_included < min(self.min_round_clients, len(sampled))
        if failed:
            self._fail_round(round_idx, aggregator, sampled)
        else:
            self.failed_rounds = 0
            with torch.no_grad():
                aggregate = aggregator.result(len(sampled) if self.dp else None)
                for name, value in self.server_optimizer.step(global_params, aggregate).items():
                    params[name].copy_(value)
                for client, values in new_local.items():
                    for name, value in values.items():
                        buffers[name][client] = value
        seconds = time.time() - begin
        self.last_round = {
            "round": round_idx, "sampled": sampled, "included": aggregator.n_included, "excluded": aggregator.n_excluded,
            "excluded_known": aggregator.excluded, "seconds": seconds, "local": local, "failed": failed, "epsilon": epsilon,
        }
        self.logger.info(
            set_color(f"round {round_idx}", "green")
            + f": {aggregator.n_included}/{len(sampled)} clients aggregated"
            + (f", {aggregator.n_excluded} left out" if aggregator.n_excluded else "")
            + f", {seconds:.1f} s, gate {model.gate.item():.4f}"
            + (f", local: {', '.join(model.local_groups)}" if local else "")
            + (f", DP epsilon {epsilon:.3f} at delta {self.accountant.delta:g} ({self.accountant.max_participations()} rounds of the most sampled user)" if self.dp else "")
        )
        return loss

    @property
    def privacy(self):
        """The run's DP accounting (None without DP): epsilon at delta after every round, the noise multiplier, the
        clip norm, and the rounds of the user sampled most often."""
        if not self.dp:
            return None
        return {
            "epsilon": self.epsilons[-1][1] if self.epsilons else 0.0, "delta": self.accountant.delta,
            "noise_multiplier": float(self.dp_noise_multiplier), "clip_norm": float(self.dp_clip_norm),
            "max_rounds_per_user": self.accountant.max_participations(), "epsilon_per_round": [list(e) for e in self.epsilons],
            "neighbouring": "replace one user", "accountant": "Opacus RDP (Gaussian mechanism, no subsampling amplification)",
        }

    def _split_parameters(self, local):
        """Copies of the aggregated (global) trainable parameters and of the ``local`` ones: the values every user
        starts from (the server's copy, frozen since the warm-up ended); None when nothing is local."""
        params = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad or n in local}
        return {n: p for n, p in params.items() if n not in local}, ({n: params[n] for n in local} or None)

    def _fail_round(self, round_idx, aggregator, sampled):
        """Count a failed round (the global model stays as it was); stop after ``max_failed_rounds`` in a row."""
        self.failed_rounds += 1
        message = (
            f"round {round_idx} failed: {aggregator.n_included} of {len(sampled)} sampled clients aggregated, "
            f"config key 'min_round_clients' asks for {min(self.min_round_clients, len(sampled))}; the global model is "
            f"unchanged ({self.failed_rounds} failed round(s) in a row, config key 'max_failed_rounds' = {self.max_failed_rounds})"
        )
        if self.failed_rounds >= self.max_failed_rounds:
            raise RuntimeError(f"federated training stopped: {message}")
        self.logger.warning(message)

    # ---- partitioned data: evaluation on the nodes ---------------------------------------------------------------
    def _save_checkpoint(self, epoch, *args, **kwargs):
        if epoch >= 0:  # RecBole saves the best model here: its round's local parameters go with it (-1: a
            self.best_round = epoch  # finished run's re-save of the same best)
        return super()._save_checkpoint(epoch, *args, **kwargs)

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if not isinstance(eval_data, NodeSplit):
            return super().evaluate(eval_data, load_best_model, model_file, show_progress)
        local_round = self.round_idx
        if load_best_model:
            state = self.best_model_state(model_file)
            self.model.load_state_dict(state["state_dict"])
            self.model.load_other_parameter(state.get("other_parameter"))
            local_round = state["epoch"]
        if self.clients is None:
            self._setup(None)
        local = self.local_names(local_round) if local_round >= 0 else []
        global_params, local_init = self._split_parameters(local)
        replies = self.engine.evaluate(eval_data.name, global_params, local, local_round, local_init)
        return merge_metric_sums(replies, self.config["metric_decimal_place"])

    # ---- resume: the server optimizer's state ---------------------------------------------------------------------
    def _extra_resume_state(self):
        return {
            **super()._extra_resume_state(),
            "server_optimizer": self.server_optimizer.state_dict(),
            "failed_rounds": self.failed_rounds,
            "best_round": self.best_round,
            "privacy_accountant": self.accountant.state_dict() if self.dp else None,
            "epsilons": [list(e) for e in self.epsilons],
        }

    def _restore(self, state, resume_file):
        super()._restore(state, resume_file)
        self.server_optimizer.load_state_dict(state.get("server_optimizer"))
        self.failed_rounds = int(state.get("failed_rounds", 0))
        self.best_round = int(state.get("best_round", -1))
        if self.dp:
            self.accountant.load_state_dict(state.get("privacy_accountant"))
            self.epsilons = [(int(r), float(e)) for r, e in state.get("epsilons", [])]
        self.round_idx = self.start_epoch - 1

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if not self.federated:
            return super()._train_epoch(train_data, epoch_idx, loss_func, show_progress)
        self.model.train()
        return self.run_round(train_data, epoch_idx)
