"""The trainer's side of a Flower round: :class:`FlowerNodes` sends the round's requests to the SuperNodes of the
running ServerApp's :class:`FlowerSession` and merges their replies into the aggregate."""
import json
import time
from logging import getLogger

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from recbole_ur4rec.federated.aggregation import partial_norm_bound, partial_problem
from recbole_ur4rec.federated.node import assign, merge_replies
from recbole_ur4rec.federated.privacy import SECAGG_MIN_NODES, node_noise_std
from recbole_ur4rec.federated.secagg import EXTRAS, ordered_names, secure_sum

PLAIN_TRAIN = f"{MessageType.TRAIN}.plain"  # a round without SecAgg+ (whose messages are plain "train" ones)
_ACTIVE = None  # the FlowerSession of the running ServerApp


class FlowerSession:
    """What :class:`FlowerEngine` needs from the ServerApp it runs in.

    Args:
        grid: the ServerApp's Flower ``Grid``.
        settings (dict): ``model``, ``dataset``, ``config_file_list`` and ``config_dict`` of the RecBole run; the
            nodes build their dataset and model from them.
        round_timeout (float): seconds to wait for the nodes' replies in a round.
        min_nodes (int): SuperNodes to wait for (at most ``node_wait`` seconds) before sending a round.
        node_wait (float): see ``min_nodes``.
        poll_interval (float): seconds between two pulls of replies (``Grid.send_and_receive`` waits 3 s).
        secagg (dict or None): aggregate each round with SecAgg+ (:mod:`.secagg`; its workflow's settings), or not.
        eval_timeout (float or None): seconds an evaluation waits for every node (at least ``round_timeout``): an
            evaluation needs every partition, and a node still busy with a late round answers it afterwards.
    """

    def __init__(self, grid, settings, round_timeout=600.0, min_nodes=1, node_wait=60.0, poll_interval=0.2, secagg=None, eval_timeout=None):
        self.grid, self.settings, self.secagg = grid, settings, secagg
        self.eval_timeout = max(round_timeout, eval_timeout or 0.0)
        self.round_timeout, self.min_nodes, self.node_wait, self.poll_interval = round_timeout, min_nodes, node_wait, poll_interval
        self.rounds = []  # one record per round, written to the run's output

    def __enter__(self):
        global _ACTIVE
        _ACTIVE = self
        return self

    def __exit__(self, *exc):
        global _ACTIVE
        _ACTIVE = None

    def nodes(self):
        """The connected SuperNodes (sorted ids), after waiting up to ``node_wait`` s for ``min_nodes``."""
        deadline = time.time() + self.node_wait
        while True:
            nodes = sorted(int(n) for n in self.grid.get_node_ids())
            if len(nodes) >= self.min_nodes or time.time() >= deadline:
                break
            time.sleep(self.poll_interval)
        if len(nodes) < self.min_nodes:
            getLogger().warning(f"only {len(nodes)} SuperNodes connected after {self.node_wait} s (run config min-nodes = {self.min_nodes})")
        return nodes

    def exchange(self, messages, timeout=None):
        """Send ``messages`` (node id -> Message); return node id -> its reply, or the error of a node without one
        within ``timeout`` seconds (default ``round_timeout``)."""
        timeout = timeout or self.round_timeout
        nodes = list(messages)
        ids = list(self.grid.push_messages([messages[node] for node in nodes]))
        ids += [None] * (len(nodes) - len(ids))  # the Grid returns None (or nothing) for what it could not push
        replies = {node: ConnectionError(f"the message to SuperNode {node} could not be pushed to the SuperLink") for node in nodes}
        node_of = {mid: node for node, mid in zip(nodes, ids) if mid}
        for node in node_of.values():
            replies[node] = TimeoutError(f"SuperNode {node} sent no reply within {timeout} s (run config round-timeout or eval-timeout)")
        deadline = time.time() + timeout
        while node_of and time.time() < deadline:
            for reply in self.grid.pull_messages(list(node_of)):  # by the message replied to: a system error reply
                node = node_of.pop(reply.metadata.reply_to_message_id, None)  # comes from the SuperLink, not the node
                if node is not None:
                    replies[node] = reply
            if node_of:
                time.sleep(self.poll_interval)
        return replies


def require_session():
    """The FlowerSession of the running ServerApp; raises when there is none."""
    if _ACTIVE is None:
        raise ValueError(
            "config key 'federated_engine' is 'flower', which trains inside the Flower ServerApp of "
            "recbole_ur4rec/apps/flower/app: start a SuperLink and SuperNodes and `flwr run` that app (see the "
            "recbole_ur4rec.apps.flower package)"
        )
    return _ACTIVE


def payload_bytes(content):
    """Bytes of a message's arrays and config values (what crosses the network, without Flower's framing)."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(array.data) for array in record.values())
        elif isinstance(record, ConfigRecord):
            total += sum(len(str(value)) for value in record.values())
    return total


def array_record(tensors):
    """An ArrayRecord of named tensors."""
    return ArrayRecord({name: Array(t.detach().cpu().numpy()) for name, t in tensors.items()})


def tensors_of(record):
    """The named tensors of an ArrayRecord."""
    return {name: torch.from_numpy(array.numpy()) for name, array in record.items()}


def flat_orders(users, orders):
    """The users' row orders of a round (user -> one permutation per local epoch) as one list, user after user."""
    return [int(i) for u in users for order in orders[u] for i in order.tolist()]


def read_orders(users, rows, flat, epochs):
    """The inverse of :func:`flat_orders` (``flat``: a list or an int array), given each user's number of rows and
    the local epochs."""
    orders, at = {}, 0
    for user, n in zip(users, rows):
        orders[user] = [torch.tensor(flat[at + e * n : at + (e + 1) * n], dtype=torch.long) for e in range(epochs)]
        at += epochs * n
    return orders


class FlowerNodes:
    """The nodes of a partitioned federation on Flower SuperNodes (see the package docstring): the same requests
    and replies as :class:`~recbole_ur4rec.federated.node.LocalNodes`, carried by Flower messages.

    Each SuperNode holds one partition (node config ``partition``); the first request of a run asks every connected
    SuperNode which one (a ``query`` message), and asks again when a known SuperNode has left.
    """

    def __init__(self, federation, session=None):
        self.session = session or require_session()
        self.federation = federation
        self.node_of_partition = {}  # partition index -> Flower node id
        self.keep_round = -1
        self.calls = 0

    def _message(self, node, content, kind, ttl=None):
        ttl = ttl or self.session.round_timeout
        return Message(content, dst_node_id=node, message_type=kind, ttl=ttl, group_id=str(self.calls))

    def _nodes(self):
        """partition index -> Flower node id of the connected SuperNodes (asking the new ones which they hold)."""
        connected = set(self.session.nodes())
        if self.node_of_partition and set(self.node_of_partition.values()) <= connected:
            return self.node_of_partition
        settings = json.dumps(self.session.settings)
        query = {n: self._message(n, RecordDict({"task": ConfigRecord({"settings": settings})}), MessageType.QUERY) for n in sorted(connected)}
        mapping = {}
        for node, reply in self.session.exchange(query).items():
            if isinstance(reply, Exception) or reply.has_error():
                getLogger().warning(f"SuperNode {node} did not say which partition it holds: {reply if isinstance(reply, Exception) else reply.error.reason}")
                continue
            partition = int(reply.content["result"]["partition"])
            if partition in mapping:
                raise ValueError(f"SuperNodes {mapping[partition]} and {node} both hold partition {partition}: give each its own node config 'partition'")
            mapping[partition] = node
        missing = sorted(set(range(self.federation.nodes)) - set(mapping))
        if missing:
            getLogger().warning(f"no connected SuperNode holds partitions {missing}: their clients are left out")
        self.node_of_partition = mapping
        return mapping

    def train_round(self, round_idx, clients, orders, global_params, local_names, local_init, task, aggregator):
        """Train ``clients`` on their SuperNodes; merge the replies into ``aggregator``; return ``(loss sum,
        clients)`` (:func:`~recbole_ur4rec.federated.node.merge_replies`)."""
        begin, self.calls = time.time(), self.calls + 1
        nodes = self._nodes()
        if self.session.secagg:
            losses = self._secure_round(nodes, round_idx, clients, orders, global_params, local_names, local_init, task, aggregator)
            self._record(round_idx, nodes, clients, aggregator, begin)
            return losses
        messages, replies = {}, {}
        for partition, users in assign(clients, self.federation).items():
            if partition not in nodes:
                replies[partition] = RuntimeError(f"no SuperNode holds partition {partition}")
                continue
            spec = ConfigRecord({
                **self._round_spec(round_idx, local_names, task), "clients": list(users),
                "rows": [self.federation.n_rows[u] for u in users], "epochs": len(orders[users[0]]),
                "orders": flat_orders(users, orders),
            })
            content = RecordDict({"task": spec, "global": array_record(global_params), "local_init": array_record(local_init or {})})
            messages[partition] = self._message(nodes[partition], content, PLAIN_TRAIN)
        by_node = self.session.exchange({nodes[p]: m for p, m in messages.items()}) if messages else {}
        for partition in messages:
            replies[partition] = self._partial(partition, by_node[nodes[partition]], global_params)
        losses = merge_replies(clients, self.federation, replies, aggregator, task)
        sent = sum(payload_bytes(m.content) for m in messages.values())
        received = sum(payload_bytes(r.content) for r in by_node.values() if not isinstance(r, Exception) and not r.has_error())
        self._record(round_idx, nodes, clients, aggregator, begin, sent, received)
        return losses

    def _round_spec(self, round_idx, local_names, task):
        """What every node's training request of a round carries, besides its users and their row orders."""
        return {
            "settings": json.dumps(self.session.settings), "round": int(round_idx), "local_names": list(local_names),
            "keep_round": int(self.keep_round), "task": json.dumps(dict(task)),
        }

    def _record(self, round_idx, nodes, clients, aggregator, begin, sent=None, received=None):
        self.session.rounds.append({
            "call": self.calls, "round": int(round_idx), "nodes": len(nodes), "sampled": list(clients),
            "included": aggregator.n_included, "excluded": aggregator.n_excluded, "excluded_known": sorted(aggregator.excluded),
            "seconds": time.time() - begin, "secagg": bool(self.session.secagg), "bytes_sent": sent, "bytes_received": received,
        })

    def _secure_round(self, nodes, round_idx, clients, orders, global_params, local_names, local_init, task, aggregator):
        """The round with SecAgg+: every node with sampled clients takes part; the server gets only their sum (the
        partial aggregates, their weights, client counts and loss sums: :data:`~.secagg.EXTRAS`). Fewer than
        :data:`~.privacy.SECAGG_MIN_NODES` nodes are refused: their clients fail."""
        by_partition = assign(clients, self.federation)
        taking_part = {p: users for p, users in by_partition.items() if p in nodes}
        for partition, users in by_partition.items():
            if partition not in nodes:
                for user in users:
                    aggregator.fail(user, RuntimeError(f"no SuperNode holds partition {partition}"))
        if len(taking_part) < SECAGG_MIN_NODES:
            refusal = RuntimeError(
                f"SecAgg+ needs at least {SECAGG_MIN_NODES} nodes with sampled clients, this round has {len(taking_part)}: "
                "with fewer, a node can subtract its own vector from the sum and learn the other's"
            )
            for users in taking_part.values():
                for user in users:
                    aggregator.fail(user, refusal)
            return None, 0
        # the values travel divided by the round's total weight (DP: one per user), well inside the quantisation range
        dp = float(task.get("dp_noise_multiplier") or 0.0) > 0
        scale = float(len(clients) if dp else sum(self.federation.counts[c] for c in clients))
        config = {**self._round_spec(round_idx, local_names, task), "weight_scale": scale, "local_init": bool(local_init)}
        for partition, users in taking_part.items():
            config[f"clients.{partition}"] = list(users)
            config[f"rows.{partition}"] = [self.federation.n_rows[u] for u in users]
            config[f"orders.{partition}"] = flat_orders(users, orders)
            config["epochs"] = len(orders[users[0]])
        names = ordered_names(global_params)
        arrays = [global_params[n].detach().cpu().numpy() for n in names]
        arrays += [local_init[n].detach().cpu().numpy() for n in local_names] if local_init else []
        summed, contributions = secure_sum(self.session.grid, [nodes[p] for p in taking_part], arrays, config, self.session.secagg)
        contributing = {p: users for p, users in taking_part.items() if nodes[p] in contributions}
        reason = "SecAgg+ halted (too few nodes left for its threshold)" if summed is None else "its node dropped out of SecAgg+"
        loss = (None, 0)
        if summed is not None:
            extras = dict(zip(EXTRAS, (summed[len(names)].reshape(-1) * scale).tolist()))
            merged = {
                "sums": {n: torch.from_numpy(summed[i] * scale).to(global_params[n].dtype).reshape(global_params[n].shape) for i, n in enumerate(names)},
                "total": extras["total"], "included": int(round(extras["included"])), "excluded": int(round(extras["excluded"])),
            }
            problem = self._secure_problem(merged, contributing, task, scale, global_params)
            if problem is None:
                aggregator.merge(merged)
                if round(extras["loss_count"]) > 0:
                    loss = (extras["loss_sum"], int(round(extras["loss_count"])))
            else:
                reason, contributing = f"the secure sum is dropped: {problem}", {}
        for partition, users in taking_part.items():
            if partition not in contributing:
                for user in users:
                    aggregator.fail(user, RuntimeError(f"partition {partition}: {reason}"))
        return loss

    def _secure_problem(self, merged, contributing, task, scale, global_params):
        """Why the server must drop a secure sum (as :func:`~recbole_ur4rec.federated.aggregation.partial_problem`
        for one node's partial), or None; the bounds allow SecAgg+'s quantisation error."""
        nodes = len(contributing)
        users = [u for members in contributing.values() for u in members]
        noise = float(task.get("dp_noise_multiplier") or 0.0)
        max_total = len(users) if noise > 0 else sum(self.federation.counts[u] for u in users)
        secagg = self.session.secagg
        step = 2 * secagg["clipping_range"] / secagg["quantization_range"] * scale * nodes  # per coordinate, all nodes
        size = sum(v.numel() for v in merged["sums"].values())
        std = node_noise_std(task.get("dp_clip_norm"), noise) * nodes**0.5 if noise > 0 else 0.0
        bound = partial_norm_bound(min(merged["total"], max_total), task.get("dp_clip_norm"), std, size)
        bound = bound + step * size**0.5 if bound is not None else None
        # the total may exceed its bound by the quantisation error
        problem = partial_problem({**merged, "total": max(merged["total"] - step, 0.0)}, global_params, max_total, bound)
        if problem is None and merged["included"] + merged["excluded"] != len(users):
            problem = f"it counts {merged['included']} included and {merged['excluded']} failed clients of {len(users)}"
        return problem

    def _partial(self, partition, reply, global_params):
        """A node's reply as ``(partial, (loss sum, clients))``, or the Exception that stands for it."""
        if isinstance(reply, Exception):
            return reply
        if reply.has_error():
            return RuntimeError(f"the SuperNode of partition {partition} failed: {reply.error.reason}")
        try:
            result = reply.content["result"]
            partial = {
                "sums": tensors_of(reply.content["sums"]), "total": float(result["total"]),
                "included": int(result["included"]), "excluded": int(result["excluded"]),
            }
            loss = (None if result["loss_count"] == 0 else float(result["loss_sum"]), int(result["loss_count"]))
        except Exception as error:  # a reply that does not fit the request: none of it is used
            return ValueError(f"the SuperNode of partition {partition} sent a malformed reply ({type(error).__name__}: {error})")
        return partial, loss

    def evaluate(self, split, global_params, local_names, local_round, local_init=None):
        """Every partition's ``(metric sums, users)`` for ``split``; a partition without a reply is an error."""
        self.calls += 1
        nodes = self._nodes()
        spec = ConfigRecord({
            "settings": json.dumps(self.session.settings), "split": split, "local_names": list(local_names),
            "local_round": int(local_round),
        })
        content = RecordDict({"task": spec, "global": array_record(global_params), "local_init": array_record(local_init or {})})
        wait = self.session.eval_timeout
        messages = {nodes[p]: self._message(nodes[p], content, MessageType.EVALUATE, ttl=wait) for p in nodes}
        replies = self.session.exchange(messages, timeout=wait)
        out = []
        for partition in range(self.federation.nodes):
            reply = replies.get(nodes.get(partition), RuntimeError("no SuperNode holds it"))
            if isinstance(reply, Exception) or reply.has_error():
                reason = reply if isinstance(reply, Exception) else reply.error.reason
                raise RuntimeError(f"the {split} evaluation needs every partition; partition {partition} failed: {reason}")
            result = reply.content["result"]
            out.append((dict(zip(list(result["keys"]), [float(x) for x in result["sums"]])), int(result["users"])))
        return out

    def prune(self, keep_round):
        self.keep_round = keep_round  # sent with the next round: the nodes drop local versions no round needs
