"""The trainer's side of a Flower round: :class:`FlowerEngine` sends the round's client updates to the SuperNodes
of the running ServerApp's :class:`FlowerSession` and adds their replies to the aggregate."""
import json
import time
from logging import getLogger
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from recbole_ur4rec.federated.engine import Engine

APP_DIR = Path(__file__).parent.parent / "flower_app"
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
    """

    def __init__(self, grid, settings, round_timeout=600.0, min_nodes=1, node_wait=60.0, poll_interval=0.2):
        self.grid, self.settings = grid, settings
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

    def exchange(self, messages):
        """Send ``messages`` (node id -> Message); return node id -> its reply, or the error of a node without one."""
        nodes = list(messages)
        ids = list(self.grid.push_messages([messages[node] for node in nodes]))
        ids += [None] * (len(nodes) - len(ids))  # the Grid returns None (or nothing) for what it could not push
        replies = {node: ConnectionError(f"the message to SuperNode {node} could not be pushed to the SuperLink") for node in nodes}
        node_of = {mid: node for node, mid in zip(nodes, ids) if mid}
        for node in node_of.values():
            replies[node] = TimeoutError(f"SuperNode {node} sent no reply within {self.round_timeout} s (run config round-timeout)")
        deadline = time.time() + self.round_timeout
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
            f"{APP_DIR}: start a SuperLink and SuperNodes and `flwr run` that app (see the recbole_ur4rec.federated.flower package)"
        )
    return _ACTIVE


class FlowerEngine(Engine):
    """Client updates on Flower SuperNodes (see the module docstring); ``run`` as the in-process engines."""

    def __init__(self, model, data, learning_rate, batch_size, optimizer="adam", session=None):
        super().__init__(model, data, learning_rate, batch_size, optimizer)
        self.session = session or require_session()
        self.held = {}  # user -> the node whose node state holds the user's current local parameters
        self.calls = 0

    def run(self, clients, orders, global_params, local_params, aggregator):
        """Train ``clients`` on the SuperNodes; add their updates to ``aggregator``; return ({client: new local
        params}, [losses]) as :class:`~recbole_ur4rec.federated.LoopEngine` does."""
        begin, self.calls = time.time(), self.calls + 1
        nodes = self.session.nodes()
        assigned = {node: [] for node in nodes}
        for client in clients:
            if nodes:
                assigned[nodes[client % len(nodes)]].append(client)
        messages = {node: self._message(node, users, orders, global_params, local_params) for node, users in assigned.items() if users}
        replies = self.session.exchange(messages) if messages else {}  # node -> reply or error
        updates, errors, node_local = {}, {}, {}
        if not nodes:
            errors = dict.fromkeys(clients, RuntimeError("no SuperNode is connected to the SuperLink"))
        for node, users in assigned.items():
            if users:
                self._read(node, users, replies[node], global_params, list(local_params), updates, errors, node_local)
        new_local, losses = {}, []
        for client in clients:  # in the sampled order, as the loop engine adds them
            if client not in updates:
                aggregator.fail(client, errors.get(client) or RuntimeError("no update"))
                continue
            deltas, count, loss = updates[client]
            left_out = aggregator.add([client], {name: delta.unsqueeze(0) for name, delta in deltas.items()}, [count])
            losses.append(loss)
            if client not in left_out and client in node_local:
                new_local[client] = node_local[client]
        self.session.rounds.append({
            "call": self.calls, "nodes": len(nodes), "sampled": list(clients), "included": list(aggregator.included),
            "excluded": list(aggregator.excluded), "seconds": time.time() - begin,
        })
        return new_local, losses

    def _message(self, node, users, orders, global_params, local_params):
        send = [u for u in users if self.held.get(u) != node] if local_params else []
        task = ConfigRecord({
            "settings": json.dumps(self.session.settings),
            "clients": list(users),
            "rows": [len(self.data.rows[u]) for u in users],
            "epochs": len(orders[users[0]]),
            "orders": [int(i) for u in users for order in orders[u] for i in order.tolist()],
            "learning_rate": float(self.lr),
            "batch_size": int(self.batch_size),
            "optimizer": self.optimizer,
            "local_names": list(local_params),
            "local_clients": send,
        })
        content = RecordDict({
            "task": task,
            "global": ArrayRecord({name: Array(p.detach().cpu().numpy()) for name, p in global_params.items()}),
            "local": ArrayRecord({name: Array(local_params[name][send].cpu().numpy()) for name in local_params} if send else {}),
        })
        return Message(content, dst_node_id=node, message_type=MessageType.TRAIN, ttl=self.session.round_timeout, group_id=str(self.calls))

    def _read(self, node, users, reply, global_params, local_names, updates, errors, node_local):
        """Fill ``updates`` (user -> (deltas, count, loss)), ``errors`` and ``node_local`` from one node's reply."""
        for user in users:  # the node's state may be ahead of the server's copy until it replies
            if self.held.get(user) == node:
                del self.held[user]
        if isinstance(reply, Exception):
            errors.update(dict.fromkeys(users, reply))
            return
        if reply.has_error():
            errors.update(dict.fromkeys(users, RuntimeError(f"SuperNode {node} failed: {reply.error.reason}")))
            return
        try:
            got, failed, local, held = self._parse(reply.content, users, global_params, local_names)
        except Exception as error:  # a reply that does not fit the request: none of its updates is used
            errors.update(dict.fromkeys(users, ValueError(f"SuperNode {node} sent a malformed reply ({type(error).__name__}: {error})")))
            return
        updates.update(got)
        node_local.update(local)
        self.held.update(dict.fromkeys(held, node))
        for user in users:
            if user in failed:
                errors[user] = RuntimeError(f"on SuperNode {node}: {failed[user]}")
            elif user not in got:
                errors[user] = RuntimeError(f"SuperNode {node} replied without this client's update")

    @staticmethod
    def _parse(content, users, global_params, local_names):
        result, asked = content["result"], set(users)
        trained = [int(u) for u in result["clients"]]
        counts, losses = list(result["counts"]), list(result["losses"])
        if not set(trained) <= asked or len(counts) != len(trained) or len(losses) != len(trained):
            raise ValueError("its clients, counts and losses do not match the users sent")
        deltas = {name: torch.from_numpy(content["deltas"][name].numpy()) for name in global_params} if trained else {}
        for name, d in deltas.items():
            if d.shape != (len(trained), *global_params[name].shape):
                raise ValueError(f"the update of {name} has shape {tuple(d.shape)}")
        got = {u: ({name: d[i] for name, d in deltas.items()}, int(counts[i]), float(losses[i])) for i, u in enumerate(trained)}
        local_clients = [int(u) for u in result["local_clients"]]
        rows = {name: torch.from_numpy(content["local"][name].numpy()) for name in local_names} if local_clients else {}
        if not set(local_clients) <= set(trained) or any(len(r) != len(local_clients) for r in rows.values()):
            raise ValueError("its local parameters do not match its clients")
        local = {u: {name: r[i] for name, r in rows.items()} for i, u in enumerate(local_clients)}
        failed = {int(u): str(e) for u, e in zip(result["failed"], result["errors"])}
        return got, failed, local, [int(u) for u in result["held"] if int(u) in asked]
