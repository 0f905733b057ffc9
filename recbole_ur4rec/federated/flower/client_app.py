"""The ClientApp of every SuperNode: one partition's node (:class:`~recbole_ur4rec.federated.node.Node`) answering the
server's ``query`` (which partition it holds), ``train.plain`` (its sampled users' round; reply: one partial
aggregate), ``train`` (the same inside SecAgg+'s protocol, :mod:`.secagg`: reply masked) and ``evaluate`` (its
users' validation or test rows; reply: metric sums) messages.

Node config (``flower-supernode --node-config``): ``partition`` (the node's partition folder, required),
``state-dir`` (its users' local parameters; default ``<partition>/state``: it survives a SuperNode restart) and
``items`` (the shared item information; default ``items`` beside the partition). Flower starts a ClientApp
process per message: the node is rebuilt from its partition file and the item catalog each time (no RecBole
dataset is built), and everything that must last lives in ``state-dir``.
"""
import json
import os
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from recbole_ur4rec.federated.flower.engine import array_record, read_orders, tensors_of
from recbole_ur4rec.federated.node import Node, default_items
from recbole_ur4rec.federated.catalog import NodePartition, PartitionError


def _ids(text):
    """User ids from a comma- or space-separated run config string."""
    return {int(t) for t in str(text).replace(",", " ").split()}


def _partition(context):
    partition = context.node_config.get("partition")
    if not partition:
        raise PartitionError("this SuperNode has no node config 'partition' (flower-supernode --node-config 'partition=\"<root>/node-<k>\"')")
    return str(partition)


def node_of(settings, context):
    """The node of this SuperNode for the run ``settings`` (``model``, ``dataset``, ``config_file_list``,
    ``config_dict``: the server's), its Config pointed at the shared item information."""
    from recbole_ur4rec.config import Config
    from recbole_ur4rec.registry import get_model

    partition = _partition(context)
    state = str(context.node_config.get("state-dir") or os.path.join(partition, "state"))
    items = str(context.node_config.get("items") or default_items(partition))
    config_dict = {**settings["config_dict"], "item_info_dir": os.path.abspath(items), "federation_dir": None}
    config = Config(model=settings["model"], dataset=settings["dataset"], config_file_list=settings["config_file_list"], config_dict=config_dict)
    return Node(config, partition, state, get_model(settings["model"]), items)


def _node(msg, context):
    return node_of(json.loads(msg.content["task"]["settings"]), context)


def _seed(settings, round_idx, partition):
    """Seed this message's process from the run's seed, the round and the partition: a rerun draws the same
    dropout masks."""
    seed = settings["config_dict"].get("seed", 2020)
    torch.manual_seed(int(np.random.default_rng([int(seed), int(round_idx), int(partition)]).integers(2**62)))


def _node_query(msg, context):
    """Which partition this SuperNode holds (read from its node.json only)."""
    meta = NodePartition.read_meta(_partition(context))
    return Message(RecordDict({"result": ConfigRecord({"partition": int(meta["node"]), "users": len(meta["users"])})}), reply_to=msg)


def _train(node, spec, users, rows, flat, global_params, local_init):
    """Train the node's ``users`` for the round of ``spec`` (settings, round, epochs, local names, task, keep_round;
    ``rows`` and ``flat``: their row counts and row orders, :func:`read_orders`); prune its local versions."""
    _seed(json.loads(spec["settings"]), spec["round"], node.partition.node)
    orders = read_orders(users, rows, flat, int(spec["epochs"]))
    result = node.train(int(spec["round"]), users, orders, global_params, list(spec["local_names"]), local_init, json.loads(spec["task"]))
    node.store.prune(int(spec["keep_round"]))
    return result


def _node_train(msg, context):
    task = msg.content["task"]
    users = [int(u) for u in task["clients"]]
    crash = _ids(context.run_config.get("fail-node-of", "")) & set(users)
    if crash:
        raise RuntimeError(f"run config 'fail-node-of' names user {min(crash)} of this node (test failure of a whole node)")
    if _ids(context.run_config.get("stall-node-of", "")) & set(users):  # a node too slow for the round (tests)
        time.sleep(float(context.run_config.get("stall-seconds", 0.0)))
    node = _node(msg, context)
    for user in _ids(context.run_config.get("fail-clients", "")) & set(users):  # test failure of one client
        node.clients.targets[node.clients.rows[user], 0] = node.model.n_items + 1
    partial, losses, failed = _train(
        node, task, users, task["rows"], task["orders"], tensors_of(msg.content["global"]), tensors_of(msg.content["local_init"]) or None
    )
    result = ConfigRecord({
        "total": float(partial["total"]), "max_count": float(partial["max_count"]),
        "included": list(partial["included"]), "excluded": list(partial["excluded"]),
        "loss_clients": list(losses), "losses": [float(x) for x in losses.values()],
        "failed": list(failed), "errors": list(failed.values()),
    })
    return Message(RecordDict({"result": result, "sums": array_record(partial["sums"])}), reply_to=msg)


def _node_train_secure(msg, context):
    """A SecAgg+ round's training (stage 2 of ``secaggplus_mod``): the task in ``fitins.config``, the global
    parameters in ``fitins.parameters``; reply the node's partial aggregate as one vector for the masked sum."""
    from flwr.app import MetricRecord

    from recbole_ur4rec.federated.flower.secagg import ordered_names

    config = msg.content["fitins.config"]
    partition = NodePartition.read_meta(_partition(context))["node"]
    users = [int(u) for u in config[f"clients.{partition}"]]
    if _ids(context.run_config.get("fail-node-of", "")) & set(users):
        raise RuntimeError("run config 'fail-node-of' names a user of this node (test failure of a whole node)")
    node = node_of(json.loads(config["settings"]), context)
    local_names = list(config["local_names"])
    names = ordered_names([n for n, p in node.model.named_parameters() if p.requires_grad and n not in local_names])
    arrays = [a.numpy() for a in msg.content["fitins.parameters"].values()]

    def parameters(names, first):  # the unnamed float64 arrays of SecAgg+'s records, back to named float32 tensors
        return {n: torch.from_numpy(np.asarray(arrays[first + i], dtype=np.float32)).reshape(node.model.get_parameter(n).shape) for i, n in enumerate(names)}

    local_init = parameters(local_names, len(names)) if config["local_init"] else None
    partial, losses, failed = _train(
        node, config, users, config[f"rows.{partition}"], config[f"orders.{partition}"], parameters(names, 0), local_init
    )
    scale = float(config["weight_scale"])
    vector = [(partial["sums"][n] / scale).numpy() for n in names] + [np.asarray([partial["total"] / scale], dtype=np.float32)]
    metrics = ConfigRecord({  # legacy fit metrics hold scalars only: the lists travel as JSON text
        "max_count": float(partial["max_count"]), "included": json.dumps(list(partial["included"])),
        "excluded": json.dumps(list(partial["excluded"])), "losses": json.dumps({int(u): float(x) for u, x in losses.items()}),
    })
    return Message(RecordDict({
        "fitres.parameters": ArrayRecord({str(i): Array(np.ascontiguousarray(v)) for i, v in enumerate(vector)}),
        "fitres.num_examples": MetricRecord({"num_examples": 1}),
        "fitres.metrics": metrics,
        "fitres.status": ConfigRecord({"code": 0, "message": ""}),
    }), reply_to=msg)


def _node_evaluate(msg, context):
    task = msg.content["task"]
    node = _node(msg, context)
    local_init = tensors_of(msg.content["local_init"]) or None
    sums, users = node.evaluate(str(task["split"]), tensors_of(msg.content["global"]), list(task["local_names"]), int(task["local_round"]), local_init)
    result = ConfigRecord({"keys": list(sums), "sums": [float(v) for v in sums.values()], "users": int(users)})
    return Message(RecordDict({"result": result}), reply_to=msg)


client_app = ClientApp()
client_app.query()(_node_query)
client_app.train("plain")(_node_train)
client_app.train(mods=[secaggplus_mod])(_node_train_secure)  # SecAgg+'s four stages; the mod calls it in stage 2
client_app.evaluate()(_node_evaluate)
