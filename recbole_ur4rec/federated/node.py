"""A node of a partitioned federation: its users' rows, the model, and its users' personal (local) parameters.

A :class:`Node` reads only its partition (:class:`~recbole_ur4rec.federated.catalog.NodePartition`) and the shared
item side information. It answers two requests, whatever carries them (in process: :class:`LocalNodes`; or Flower
messages: :mod:`recbole_ur4rec.apps.flower`):

- :meth:`Node.train`: the round's client updates of its sampled users (:class:`~recbole_ur4rec.federated.LoopEngine`'s
  update, from the global parameters and each user's own local parameters); it replies one partial aggregate (the
  weighted sum of its clients' clipped updates and their total weight, :meth:`FedAvg.partial`; under DP with its
  own noise, :mod:`.privacy`), how many clients were included or failed (not which) and the sum of their losses
  (none under DP). Local parameters never leave the node: they are kept in :class:`LocalStore`, on disk under the
  node's state folder (owner-only), one version per round;
- :meth:`Node.evaluate`: its users' validation or test rows, ranked over all items with the global parameters and
  each user's local parameters as of a given round, scored by RecBole's own metric code; it replies only the metric
  sums over its users and their number (:func:`metric_sums`), which the server adds up (:func:`merge_metric_sums`).

Whatever the server asks, a node answers within its :class:`~.privacy.NodePolicy`: at least ``min-users`` users per
reply, row orders that are permutations of its users' own rows, DP settings within its limits, SecAgg+ only when it
says so, at most ``max-evaluations`` evaluations per run; otherwise it refuses (:class:`~.privacy.PrivacyRefusal`).
"""
import glob
import json
import math
import os
import re

import numpy as np
import torch

from recbole_ur4rec.common.private_files import private_dir, write_private
from recbole_ur4rec.data.sequence_dataset import target_list_field
from recbole_ur4rec.evaluation.slices import row_metrics
from recbole_ur4rec.federated.aggregation import FedAvg, partial_norm_bound, partial_problem
from recbole_ur4rec.federated.catalog import ItemCatalog, NodePartition, PartitionError, read_items
from recbole_ur4rec.federated.local_engines import ClientData, LoopEngine
from recbole_ur4rec.federated.privacy import NodePolicy, PrivacyRefusal, check_orders, node_noise_std


def default_items(partition):
    """The shared item information folder of a partition folder: ``items`` beside it."""
    return os.path.join(os.path.dirname(os.path.abspath(partition)), "items")


def metric_sums(evaluator, struct):
    """``{metric@k: sum over the evaluated users}`` from RecBole's ``evaluator`` on ``struct`` (its own per-user
    values, summed instead of averaged), for top-k metrics."""
    return {key: float(values.sum()) for key, values in row_metrics(evaluator, struct).items()}


def merge_metric_sums(replies, decimal_place):
    """RecBole's result dict (means rounded as RecBole rounds them) from the nodes' ``(sums, users)`` replies."""
    total = sum(users for _, users in replies)
    if total == 0:
        raise ValueError("no node evaluated any user")
    keys = list(replies[0][0])
    return {key: round(sum(sums[key] for sums, _ in replies) / total, decimal_place) for key in keys}


class LocalStore:
    """A node's local parameters per user and round, in ``<folder>/local-<round>.npz`` files (no pickle), the
    folder and its files readable by their owner only.

    ``init`` holds the values every user starts from when partial aggregation begins (the global values then).
    """

    PATTERN = re.compile(r"local-(\d+)\.npz$")

    def __init__(self, folder):
        self.folder = folder
        private_dir(folder)
        self.versions = {}  # user -> sorted rounds with a saved version
        for path in glob.glob(os.path.join(folder, "local-*.npz")):
            match = self.PATTERN.search(path)
            if match:
                with np.load(path, allow_pickle=False) as arrays:
                    for user in arrays["users"].tolist():
                        self.versions.setdefault(int(user), []).append(int(match.group(1)))
        for rounds in self.versions.values():
            rounds.sort()

    def _path(self, round_idx):
        return os.path.join(self.folder, "init.npz" if round_idx is None else f"local-{round_idx}.npz")

    def save_init(self, values):
        write_private(self._path(None), lambda f: np.savez(f, **{name: v.detach().cpu().numpy() for name, v in values.items()}))

    def keep_init(self, values):
        """Save ``values`` (or None) as ``init`` unless the node holds it already."""
        if values and not self.has_init():
            self.save_init(values)

    def has_init(self):
        return os.path.isfile(self._path(None))

    def save(self, round_idx, values):
        """Store ``values`` (user -> {name: tensor}) as the users' version of ``round_idx``."""
        if not values:
            return
        users = sorted(values)
        names = list(values[users[0]])
        arrays = {name: np.stack([values[u][name].detach().cpu().numpy() for u in users]) for name in names}
        write_private(self._path(round_idx), lambda f: np.savez(f, users=np.asarray(users, dtype=np.int64), **arrays))
        for user in users:
            rounds = self.versions.setdefault(user, [])
            if round_idx not in rounds:
                rounds.append(round_idx)
                rounds.sort()

    def load(self, users, names, up_to_round):
        """{name: [U ..]} of ``users``' latest versions at or before ``up_to_round`` (``init`` where none)."""
        if not self.has_init():
            raise LookupError(f"node state {self.folder} holds no local parameters (init.npz): was the node state lost?")
        with np.load(self._path(None), allow_pickle=False) as arrays:
            init = {name: torch.from_numpy(arrays[name]) for name in names}
        out = {name: init[name].unsqueeze(0).repeat(len(users), *[1] * init[name].dim()) for name in names}
        wanted = {}
        for i, user in enumerate(users):
            rounds = [r for r in self.versions.get(int(user), []) if r <= up_to_round]
            if rounds:
                wanted.setdefault(rounds[-1], []).append((i, int(user)))
        for round_idx, entries in wanted.items():
            with np.load(self._path(round_idx), allow_pickle=False) as arrays:
                row_of = {int(u): j for j, u in enumerate(arrays["users"].tolist())}
                for name in names:
                    values = arrays[name]
                    for i, user in entries:
                        out[name][i] = torch.as_tensor(values[row_of[user]])
        return out

    def prune(self, keep_round):
        """Delete round files that no user needs: a user keeps its latest version at or before ``keep_round`` (the
        best round so far) and every later one."""
        needed = set()
        for rounds in self.versions.values():
            older = [r for r in rounds if r <= keep_round]
            needed.update(older[-1:] + [r for r in rounds if r > keep_round])
        for path in glob.glob(os.path.join(self.folder, "local-*.npz")):
            match = self.PATTERN.search(path)
            if match and int(match.group(1)) not in needed:
                os.remove(path)
        for user, rounds in self.versions.items():
            self.versions[user] = [r for r in rounds if r in needed]


class _Collect(FedAvg):
    """The node's FedAvg (per-client clipping as on the server, no noise), keeping which clients were counted
    (they returned a loss) and why the others failed."""

    def __init__(self, global_params, clip_norm=None, uniform=False):
        super().__init__(global_params, clip_norm, uniform)
        self.counted, self.failed = [], {}

    def add(self, clients, deltas, counts):
        self.counted += list(clients)
        return super().add(clients, deltas, counts)

    def fail(self, client, error):
        self.failed[client] = f"{type(error).__name__}: {error}"
        super().fail(client, error)


class Node:
    """See the module docstring.

    Args:
        config: the run's RecBole Config, with ``data_path`` and ``feature_cache_dir`` at the shared item
            information (config ``item_info_dir`` or ``federation_dir``).
        partition (str): the node's partition folder (``<root>/node-<k>``).
        state_dir (str): where the node keeps its users' local parameters (survives a node restart).
        model_class: the model's class (built from an item catalog, without interactions).
        items (str or None): the shared item side information folder (default: ``items`` beside the partition).
        policy (NodePolicy or None): the node's limits (default: :class:`NodePolicy`'s defaults).
    """

    def __init__(self, config, partition, state_dir, model_class, items=None, policy=None):
        from recbole.evaluator import Collector, Evaluator

        self.policy = policy or NodePolicy()
        catalog = read_items(items or default_items(partition), config["dataset"])
        self.config = config
        self.partition = NodePartition(partition, config["dataset"], len(catalog["item_tokens"]))
        dataset = ItemCatalog(config, catalog["item_tokens"], self.partition.meta["n_users"])
        # the initial weights are replaced by the server's; building them leaves the process's RNG as it was (the
        # in-process nodes draw their dropout masks from it, so a resumed server draws the same ones)
        with torch.random.fork_rng(devices=[]):
            self.model = model_class(config, dataset)
        self.model.eval()
        train = self.partition.rows["train"]
        self.clients = ClientData.from_rows(train, self.model.ITEM_SEQ, target_list_field(self.config), self.config["USER_ID_FIELD"])
        self.store = LocalStore(state_dir)
        self.collector, self.evaluator = Collector(self.config), Evaluator(self.config)

    # ---- parameters ------------------------------------------------------------------------------------------
    def _load_global(self, global_params):
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in global_params.items():
                params[name].copy_(value)

    # ---- requests --------------------------------------------------------------------------------------------
    def train(self, round_idx, users, orders, global_params, local_names, local_init, task, secure=False):
        """Train ``users`` (this node's) for round ``round_idx``; keep their new local parameters here.

        Args:
            orders (dict): user -> one row permutation per local epoch (the server's round plan).
            local_names (list): the parameters kept on the clients this round (empty during the warm-up).
            local_init (dict or None): the values of ``local_names`` every user starts from (the server's copy,
                frozen since the warm-up ended), kept by a node that does not hold them yet.
            task (dict): ``learning_rate``, ``batch_size``, ``optimizer`` (local), ``dp_clip_norm`` (or None) and
                ``dp_noise_multiplier`` (0: no DP).
            secure (bool): the request came inside SecAgg+.

        Returns:
            tuple: the node's partial aggregate (:meth:`FedAvg.partial`: the weighted sum of its clients' clipped
            updates, with its noise under DP, their total weight, how many clients were included or left out) and
            ``(loss sum, clients)`` over the included clients' mean local losses (``(None, 0)`` under DP).

        Raises:
            PrivacyRefusal: the request is outside the node's policy (see the module docstring).
        """
        if self.policy.secagg_only and not secure:
            raise PrivacyRefusal(f"node {self.partition.node} trains only inside SecAgg+ (node policy 'secagg-only'): a plain round is refused")
        clip_norm, noise = task.get("dp_clip_norm"), float(task.get("dp_noise_multiplier") or 0.0)
        if noise > 0 and clip_norm is None:
            raise PrivacyRefusal("the server asks for dp_noise_multiplier > 0 without dp_clip_norm: the noise has no scale")
        self.policy.check_dp(clip_norm, noise)
        self.partition.check_users(users)
        self.policy.check_users(len(users), f"node {self.partition.node}'s training reply")
        check_orders([u for u in users if u in self.clients.rows], orders, self.clients.n_rows, self.partition.node)
        self.store.keep_init(local_init)
        self._load_global(global_params)
        problems = {}
        local = {}
        if local_names:
            try:
                rows = self.store.load(users, local_names, round_idx - 1)
                local = {name: _Rows({u: rows[name][i] for i, u in enumerate(users)}) for name in local_names}
            except LookupError as error:
                problems = dict.fromkeys(users, error)
        for user in users:
            if user not in self.clients.rows:
                problems.setdefault(user, PartitionError(f"user {user} has no training rows on node {self.partition.node}"))
        engine = _NodeEngine(self.model, self.clients, task["learning_rate"], task["batch_size"], task["optimizer"], problems)
        collect = _Collect(global_params, clip_norm, uniform=noise > 0)
        new_local, losses = engine.run(users, orders, global_params, local, collect)
        self.policy.check_users(collect.n_included, f"node {self.partition.node}'s training reply (after {collect.n_excluded} failed client(s))")
        if local_names:
            self.store.save(round_idx, {u: new_local[u] for u in new_local})
        if noise > 0:
            collect.add_noise(node_noise_std(clip_norm, noise))
            return collect.partial(), (None, 0)
        included = set(collect.included)
        kept = [x for c, x in zip(collect.counted, losses) if c in included and math.isfinite(x)]  # the engine's order
        return collect.partial(), (float(sum(kept)), len(kept))

    @torch.no_grad()
    def evaluate(self, split, global_params, local_names, local_round, local_init=None, batch_size=None, run_key="run"):
        """Metric sums over this node's users' ``split`` rows and their number (see :func:`metric_sums`).

        Args:
            local_names (list): local parameters in use (empty: none); each user's version of ``local_round``
                (its latest at or before it) is used, ``local_init`` for users never trained since the warm-up.
            run_key (str): the run the evaluation counts against (node policy ``max-evaluations``).

        Raises:
            PrivacyRefusal: fewer users than ``min-users``, or the run's evaluations are spent.
        """
        model, rows = self.model, self.partition.rows[split]
        uid, iid = self.config["USER_ID_FIELD"], self.config["ITEM_ID_FIELD"]
        users = rows[uid].tolist()
        self.policy.check_users(len(set(users)), f"node {self.partition.node}'s {split} evaluation")
        self._count_evaluation(run_key)
        self.store.keep_init(local_init)
        self._load_global(global_params)
        if local_names:
            values = self.store.load(users, local_names, local_round)
            for name in local_names:
                getattr(model, model.local_buffer(name))[rows[uid]] = values[name]
            model.local_active.fill_(True)
        else:
            model.local_active.fill_(False)
        model.eval()
        batch_size = batch_size or self.config["eval_batch_size"]
        for begin in range(0, len(rows), batch_size):
            batch = rows[begin : begin + batch_size]
            scores = model.full_sort_predict(batch).view(len(batch), -1)
            scores[:, 0] = -np.inf  # RecBole's full-sort evaluation never ranks the padding item
            self.collector.eval_batch_collect(scores, batch, torch.arange(len(batch)), batch[iid])
        struct = self.collector.get_data_struct()
        return metric_sums(self.evaluator, struct), len(rows)


    def _count_evaluation(self, run_key):
        """Count one evaluation of ``run_key`` in ``<state>/evaluations.json``; refuse once the run's are spent."""
        path = os.path.join(self.store.folder, "evaluations.json")
        counts = {}
        if os.path.isfile(path):
            with open(path) as f:
                counts = json.load(f)
        if counts.get(run_key, 0) >= self.policy.max_evaluations:
            raise PrivacyRefusal(
                f"node {self.partition.node} has answered {counts[run_key]} evaluations of this run, its limit (node policy "
                "'max-evaluations'): repeated evaluations of chosen parameters would reveal its users' rows"
            )
        counts[run_key] = counts.get(run_key, 0) + 1
        write_private(path, lambda f: f.write(json.dumps(counts).encode()))


class _Rows(dict):
    """user -> one local parameter's value, indexed by a list of users like the [n_users ..] buffers."""

    def __getitem__(self, users):
        return torch.stack([dict.__getitem__(self, u) for u in users])


class _NodeEngine(LoopEngine):
    """The loop engine on a node; a client with a known problem (``problems``: user -> error) fails at its start."""

    def __init__(self, model, data, learning_rate, batch_size, optimizer, problems):
        super().__init__(model, data, learning_rate, batch_size, optimizer)
        self.problems = problems

    def start_params(self, clients, global_params, local_params):
        for client in clients:
            if client in self.problems:
                raise self.problems[client]
        return super().start_params(clients, global_params, local_params)



class LocalNodes:
    """Every node of a partition in this process, each reading only its own partition and state folder: the
    in-process counterpart of the Flower deployment (same requests, same replies, same refusals).

    Args:
        config: the server's Config (``federation_dir`` set; ``data_path`` and ``feature_cache_dir`` at the items;
            ``node_policy``: every node's :class:`~.privacy.NodePolicy` settings).
        federation (FederationClients): the server's clients and their nodes.
        state_root (str): ``<state_root>/node-<k>`` is node ``k``'s state folder.
        model_class: the model's class.
        root (str or None): the partition (default: config ``federation_dir``).
    """

    def __init__(self, config, federation, state_root, model_class, root=None):
        root = root or config["federation_dir"]
        self.federation = federation
        policy = NodePolicy.from_settings(config["node_policy"], "config key 'node_policy'")
        self.nodes = [
            Node(config, os.path.join(root, f"node-{k}"), os.path.join(state_root, f"node-{k}"), model_class, policy=policy)
            for k in range(federation.nodes)
        ]
        self.run_key = os.urandom(8).hex()  # this run's evaluations, counted by each node

    def train_round(self, round_idx, clients, orders, global_params, local_names, local_init, task, aggregator):
        """Train ``clients`` on their nodes; merge the nodes' partial aggregates into ``aggregator`` (a node that
        refuses leaves its clients out); return ``(loss sum, clients)`` (see :func:`merge_replies`)."""
        replies = {}
        for k, users in assign(clients, self.federation).items():
            try:
                replies[k] = self.nodes[k].train(round_idx, users, {u: orders[u] for u in users}, global_params, local_names, local_init, task)
            except PrivacyRefusal as refusal:
                replies[k] = refusal
        return merge_replies(clients, self.federation, replies, aggregator, task)

    def evaluate(self, split, global_params, local_names, local_round, local_init=None):
        return [node.evaluate(split, global_params, local_names, local_round, local_init, run_key=self.run_key) for node in self.nodes]

    def prune(self, keep_round):
        for node in self.nodes:
            node.store.prune(keep_round)


def assign(clients, federation):
    """node -> its sampled clients, in the sampled order."""
    by_node = {}
    for client in clients:
        by_node.setdefault(federation.node_of[client], []).append(client)
    return by_node


def merge_replies(clients, federation, replies, aggregator, task):
    """Merge the nodes' replies (node -> ``(partial, (loss sum, clients))``, or an Exception for a node without a
    reply) into ``aggregator``. A partial that :func:`~.aggregation.partial_problem` finds wrong (not finite, or
    larger than the node's sampled users, clipping and noise allow) is dropped: its node failed. Every client of a
    failed node fails with the node's reason.

    Returns:
        tuple: the sum of the included clients' mean local losses and their number (``(None, 0)`` when no node
        reported a loss, as under DP).
    """
    clip_norm, noise = task.get("dp_clip_norm"), float(task.get("dp_noise_multiplier") or 0.0)
    std = node_noise_std(clip_norm, noise) if noise > 0 else 0.0
    size = sum(p.numel() for p in aggregator.global_params.values())
    loss_sum, loss_count = 0.0, 0
    for node, users in assign(clients, federation).items():
        reply = replies.get(node, RuntimeError(f"node {node} was not asked"))
        if not isinstance(reply, Exception):
            partial, (node_loss, node_count) = reply
            max_total = len(users) if noise > 0 else sum(federation.counts[u] for u in users)
            bound = partial_norm_bound(min(float(partial["total"]), max_total), clip_norm, std, size)
            problem = partial_problem(partial, aggregator.global_params, max_total, bound)
            if problem is None and int(partial["included"]) + int(partial["excluded"]) != len(users):
                problem = f"it counts {partial['included']} included and {partial['excluded']} failed clients of {len(users)}"
            if problem is not None:
                reply = ValueError(f"node {node}'s partial aggregate is dropped: {problem}")
        if isinstance(reply, Exception):
            for user in users:
                aggregator.fail(user, reply)
            continue
        aggregator.merge(partial)
        if node_loss is not None:
            loss_sum, loss_count = loss_sum + float(node_loss), loss_count + int(node_count)
    return (loss_sum, loss_count) if loss_count else (None, 0)
