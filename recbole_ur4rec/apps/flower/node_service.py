"""What a SuperNode's node does with a request, wherever it runs: inside the ClientApp's own process (Flower starts
one per message, so the node is built from its partition for every message) or in the SuperNode's long-lived node
worker (:mod:`.worker`), which builds it once per run and reuses it across rounds.

A request is a JSON-able ``header`` and named numpy ``arrays``; so is the reply (:meth:`NodeService.handle`):

- ``train``: header ``settings``, ``round``, ``epochs``, ``clients``, ``rows``, ``local_names``, ``keep_round``,
  ``task``; arrays ``orders`` (:func:`~.engine.flat_orders`), ``global/<name>`` and ``local_init/<name>``. Reply:
  the node's partial aggregate (header ``total``, ``included`` and ``excluded`` (counts), ``loss_sum`` and
  ``loss_count`` (0 under DP); arrays ``sums/<name>``);
- ``train_secure``: header ``config`` (SecAgg+'s ``fitins.config``) and ``secagg`` (``clipping_range`` and
  ``nodes`` of the SecAgg+ round, from the node's SecAgg+ state); arrays ``fit/<i>`` (its ``fitins.parameters`` in
  order). Reply: arrays ``vector/<i>`` (what SecAgg+ masks, :data:`~..secagg.EXTRAS` last), nothing in the clear;
- ``evaluate``: header ``settings``, ``split``, ``local_names``, ``local_round``; arrays ``global/<name>``,
  ``local_init/<name>``. Reply: header ``keys``, ``sums``, ``users`` (metric sums, :func:`~..node.metric_sums`);
- ``prepare``: header ``settings``: build the run's node now (a worker answering the server's ``query``, so the
  first round does not wait for it). Reply: header ``partition`` and ``built`` (False: it was built already).

The node answers within its :class:`~..privacy.NodePolicy` (the worker's command line, or the SuperNode's node
config without a worker): whatever calls it, a ClientApp of this project or of another app, gets no more. Test hooks
(header ``fail_users``: those users' updates raise; ``nan_partial``: the reply's sums are NaN) are served only where
the environment variable :data:`~..privacy.TEST_HOOKS_ENV` is ``1`` (the loopback test federation sets it).
"""
import contextlib
import hashlib
import json
import os

import numpy as np
import torch

from recbole_ur4rec.build import set_anomaly_detection, set_threads
from recbole_ur4rec.config import Config
from recbole_ur4rec.federated.flower_nodes import read_orders
from recbole_ur4rec.federated.node import Node, default_items
from recbole_ur4rec.federated.privacy import SECAGG_MIN_NODES, TEST_HOOKS_ENV, NodePolicy, PrivacyRefusal
from recbole_ur4rec.federated.secagg import EXTRAS, ordered_names
from recbole_ur4rec.registry import get_model


def named(arrays, prefix):
    """The tensors of ``arrays`` whose names start with ``<prefix>/``, by the rest of the name."""
    return {name[len(prefix) + 1 :]: torch.from_numpy(np.array(a)) for name, a in arrays.items() if name.startswith(prefix + "/")}


def _seed(settings, round_idx, partition):
    """Seed the request from the run's seed, the round and the partition: a rerun draws the same dropout masks,
    whichever process serves it."""
    seed = settings["config_dict"].get("seed", 2020)
    torch.manual_seed(int(np.random.default_rng([int(seed), int(round_idx), int(partition)]).integers(2**62)))


def _mtime(path):
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


class NodeService:
    """One partition's node answering requests (see the module docstring).

    Args:
        partition (str): the node's partition folder.
        state_dir (str or None): its users' local parameters (default ``<partition>/state``).
        items (str or None): the shared item information (default ``items`` beside the partition).
        reuse (bool): keep the built node for the next request of the same run (a worker); False: build it for
            every request (a ClientApp process, which serves one message).
        policy (NodePolicy or None): the node's limits (default: :class:`NodePolicy`'s defaults).
    """

    def __init__(self, partition, state_dir=None, items=None, reuse=False, policy=None):
        self.partition = str(partition)
        self.state_dir = str(state_dir or os.path.join(self.partition, "state"))
        self.items = str(items or default_items(self.partition))
        self.reuse, self.policy = reuse, policy or NodePolicy()
        self._built = None  # (key, Node)

    def node(self, settings_text):
        """The node for the run ``settings_text`` (JSON: ``model``, ``dataset``, ``config_file_list``,
        ``config_dict``: the server's), its Config pointed at the shared item information; rebuilt when the run's
        settings or the partition's files change."""
        key = (settings_text, _mtime(os.path.join(self.partition, "node.json")), _mtime(os.path.join(self.items, "items.json")))
        if self._built is not None and self._built[0] == key:
            return self._built[1]

        self._built = None  # free the previous run's node first
        settings = json.loads(settings_text)
        config_dict = {**settings["config_dict"], "item_info_dir": os.path.abspath(self.items), "federation_dir": None}
        config = Config(model=settings["model"], dataset=settings["dataset"], config_file_list=settings["config_file_list"], config_dict=config_dict)
        set_threads(config)  # the run's threads and anomaly mode, as on the server
        set_anomaly_detection(config["detect_anomaly"])
        node = Node(config, self.partition, self.state_dir, get_model(settings["model"]), self.items, self.policy)
        if self.reuse:
            self._built = (key, node)
        return node

    def handle(self, header, arrays):
        """Answer one request; returns ``(header, arrays)`` of the reply."""
        handlers = {"train": self._train_plain, "train_secure": self._train_secure, "evaluate": self._evaluate, "prepare": self._prepare}
        if header.get("op") not in handlers:
            raise ValueError(f"unknown node request {header.get('op')!r}: expected one of {', '.join(handlers)}")
        hooks = [key for key in ("fail_users", "nan_partial") if header.get(key)]
        if hooks and os.environ.get(TEST_HOOKS_ENV) != "1":
            raise PrivacyRefusal(
                f"the request asks for test hooks ({', '.join(hooks)}); this node serves them only with {TEST_HOOKS_ENV}=1 "
                "in its environment (the loopback test federation)"
            )
        return handlers[header["op"]](header, arrays)

    @contextlib.contextmanager
    def _failing(self, node, users):
        """For tests: the updates of ``users`` raise on this node during the request (their targets out of range)."""
        targets = node.clients.targets
        saved = {u: targets[node.clients.rows[u], 0].clone() for u in users if u in node.clients.rows}
        for user in saved:
            targets[node.clients.rows[user], 0] = node.model.n_items + 1
        try:
            yield
        finally:
            for user, value in saved.items():
                targets[node.clients.rows[user], 0] = value

    def _train(self, spec, users, rows, flat, global_params, local_init, fail_users, secure=False):
        """Train the node's ``users`` for the round of ``spec`` (``settings``, ``round``, ``epochs``,
        ``local_names``, ``task``, ``keep_round``; ``rows`` and ``flat``: their row counts and row orders); prune
        its local versions. Returns :meth:`~..node.Node.train`'s reply."""
        node = self.node(spec["settings"])
        _seed(json.loads(spec["settings"]), spec["round"], node.partition.node)
        orders = read_orders(users, rows, flat, int(spec["epochs"]))
        with self._failing(node, set(fail_users or ()) & set(users)):
            result = node.train(int(spec["round"]), users, orders, global_params, list(spec["local_names"]), local_init, json.loads(spec["task"]), secure)
        node.store.prune(int(spec["keep_round"]))
        return result

    def _train_plain(self, header, arrays):
        users = [int(u) for u in header["clients"]]
        partial, (loss_sum, loss_count) = self._train(
            header, users, header["rows"], arrays["orders"], named(arrays, "global"), named(arrays, "local_init") or None,
            header.get("fail_users"),
        )
        reply = {
            "total": float(partial["total"]), "included": int(partial["included"]), "excluded": int(partial["excluded"]),
            "loss_sum": float(loss_sum or 0.0), "loss_count": int(loss_count),
        }
        sums = {f"sums/{n}": t.detach().cpu().numpy() for n, t in partial["sums"].items()}
        if header.get("nan_partial"):  # test hook: a node whose reply is not finite
            sums = {name: np.full_like(value, np.nan) for name, value in sums.items()}
        return reply, sums

    def _train_secure(self, header, arrays):
        """A SecAgg+ round's training: the node's partial aggregate and :data:`EXTRAS` as one vector (divided by
        ``weight_scale``); refused in a round of fewer than 3 nodes or when a value exceeds the clipping range."""
        config, secagg = header["config"], header["secagg"]
        if int(secagg["nodes"]) < SECAGG_MIN_NODES:
            raise PrivacyRefusal(
                f"this SecAgg+ round has {secagg['nodes']} nodes; this node takes part in rounds of at least {SECAGG_MIN_NODES}: "
                "with fewer, the sum minus a node's own vector is the other's"
            )
        node = self.node(config["settings"])
        partition = node.partition.node
        users = [int(u) for u in config[f"clients.{partition}"]]
        local_names = list(config["local_names"])
        names = ordered_names([n for n, p in node.model.named_parameters() if p.requires_grad and n not in local_names])
        fit = [arrays[f"fit/{i}"] for i in range(len(arrays))]

        def parameters(names, first):  # the unnamed float64 arrays of SecAgg+'s records, back to named float32 tensors
            return {n: torch.from_numpy(np.asarray(fit[first + i], dtype=np.float32)).reshape(node.model.get_parameter(n).shape) for i, n in enumerate(names)}

        local_init = parameters(local_names, len(names)) if config["local_init"] else None
        partial, (loss_sum, loss_count) = self._train(
            config, users, config[f"rows.{partition}"], config[f"orders.{partition}"], parameters(names, 0), local_init,
            header.get("fail_users"), secure=True,
        )
        scale = float(config["weight_scale"])
        extras = {"total": partial["total"], "included": partial["included"], "excluded": partial["excluded"],
                  "loss_sum": loss_sum or 0.0, "loss_count": loss_count}
        vector = [(partial["sums"][n] / scale).numpy() for n in names] + [np.asarray([extras[k] for k in EXTRAS], dtype=np.float64) / scale]
        if header.get("nan_partial"):  # test hook
            vector = [np.full_like(v, np.nan) for v in vector]
        largest = max(float(np.abs(v).max()) for v in vector if v.size)
        if not largest <= float(secagg["clipping_range"]):  # NaN too
            raise PrivacyRefusal(
                f"node {partition}'s SecAgg+ vector reaches {largest:.4g}, beyond the clipping range {secagg['clipping_range']} "
                "(run config 'secagg-clipping-range'), which SecAgg+ would clip silently: refused"
            )
        return {}, {f"vector/{i}": np.ascontiguousarray(v) for i, v in enumerate(vector)}

    def _prepare(self, header, arrays):
        before = self._built
        node = self.node(header["settings"])
        return {"partition": int(node.partition.node), "built": not self.reuse or self._built is not before}, {}

    def _evaluate(self, header, arrays):
        node = self.node(header["settings"])
        run_key = hashlib.sha256(header["settings"].encode()).hexdigest()[:16]  # a run's evaluations count together
        sums, users = node.evaluate(
            str(header["split"]), named(arrays, "global"), list(header["local_names"]), int(header["local_round"]),
            named(arrays, "local_init") or None, run_key=run_key,
        )
        return {"keys": list(sums), "sums": [float(v) for v in sums.values()], "users": int(users)}, {}
