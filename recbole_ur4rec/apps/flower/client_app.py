"""The ClientApp of every SuperNode: one partition's node answering the server's ``query`` (which partition it
holds), ``train.plain`` (its sampled users' round; reply: one partial aggregate), ``train`` (the same inside
SecAgg+'s protocol, :mod:`.secagg`: reply masked) and ``evaluate`` (its users' validation or test rows; reply:
metric sums) messages.

Node config (``flower-supernode --node-config``): ``partition`` (the node's partition folder, required),
``state-dir`` (its users' local parameters; default ``<partition>/state``: it survives a SuperNode restart),
``items`` (the shared item information; default ``items`` beside the partition) and ``worker`` (the Unix socket of
the node's worker, :mod:`.worker`). Flower starts a ClientApp process per message. With ``worker`` this process
only translates the message into a request for the worker, which keeps the node built across rounds (no torch or
RecBole import here); without it, the node is built here from its partition file and the item catalog for every
message (:class:`~.node_service.NodeService`). Either way what must last lives in ``state-dir``.
"""
import json
import os
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from recbole_ur4rec.apps.flower import worker


def _ids(text):
    """User ids from a comma- or space-separated run config string."""
    return {int(t) for t in str(text).replace(",", " ").split()}


def _partition(context):
    partition = context.node_config.get("partition")
    if not partition:
        raise ValueError("this SuperNode has no node config 'partition' (flower-supernode --node-config 'partition=\"<root>/node-<k>\"')")
    return str(partition)


def _meta(context):
    """The partition's node.json (its node index and users)."""
    path = os.path.join(_partition(context), "node.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: the node's partition (python -m recbole_ur4rec.apps.partition_dataset) cannot be read ({error})") from None


def _request(context, header, arrays):
    """The node's reply ``(header, arrays)`` to a request: from the node worker (node config ``worker``) or from a
    node built in this process."""
    header = {**header, "fail_users": sorted(_ids(context.run_config.get("fail-clients", "")))}  # tests
    address = context.node_config.get("worker")
    if address:
        return worker.call(str(address), header, arrays)
    from recbole_ur4rec.apps.flower.node_service import NodeService  # lazy: a ClientApp that forwards imports no torch

    service = NodeService(_partition(context), context.node_config.get("state-dir") or None, context.node_config.get("items") or None)
    return service.handle(header, arrays)


def _arrays(record, prefix):
    return {f"{prefix}/{name}": array.numpy() for name, array in record.items()}


def _failures(context, users):
    """For tests: raise for a whole node (run config ``fail-node-of``) or wait (``stall-node-of``)."""
    if _ids(context.run_config.get("fail-node-of", "")) & set(users):
        raise RuntimeError("run config 'fail-node-of' names a user of this node (test failure of a whole node)")
    if _ids(context.run_config.get("stall-node-of", "")) & set(users):  # a node too slow for the round
        time.sleep(float(context.run_config.get("stall-seconds", 0.0)))


def _node_query(msg, context):
    """Which partition this SuperNode holds (read from its node.json). A node worker also builds the run's node
    now (the query carries the run's settings), so the first round does not wait for it."""
    meta = _meta(context)
    if context.node_config.get("worker"):
        _request(context, {"op": "prepare", "settings": msg.content["task"]["settings"]}, {})
    return Message(RecordDict({"result": ConfigRecord({"partition": int(meta["node"]), "users": len(meta["users"])})}), reply_to=msg)


def _node_train(msg, context):
    task = msg.content["task"]
    users = [int(u) for u in task["clients"]]
    _failures(context, users)
    header = {key: task[key] for key in ("settings", "round", "epochs", "clients", "rows", "local_names", "keep_round", "task")}
    arrays = {"orders": np.asarray(task["orders"], dtype=np.int64), **_arrays(msg.content["global"], "global"), **_arrays(msg.content["local_init"], "local_init")}
    reply, reply_arrays = _request(context, {"op": "train", **header}, arrays)
    sums = ArrayRecord({name[len("sums/") :]: Array(value) for name, value in reply_arrays.items()})
    return Message(RecordDict({"result": ConfigRecord(reply), "sums": sums}), reply_to=msg)


def _node_train_secure(msg, context):
    """A SecAgg+ round's training (stage 2 of ``secaggplus_mod``): the task in ``fitins.config``, the global
    parameters in ``fitins.parameters``; reply the node's partial aggregate as one vector for the masked sum."""
    config = dict(msg.content["fitins.config"])
    partition = int(_meta(context)["node"])
    _failures(context, [int(u) for u in config[f"clients.{partition}"]])
    fit = {f"fit/{i}": array.numpy() for i, array in enumerate(msg.content["fitins.parameters"].values())}
    reply, vector = _request(context, {"op": "train_secure", "config": config}, fit)
    metrics = ConfigRecord({  # legacy fit metrics hold scalars only: the lists travel as JSON text
        "max_count": float(reply["max_count"]), "included": json.dumps(reply["included"]),
        "excluded": json.dumps(reply["excluded"]), "losses": json.dumps(reply["losses"]),
    })
    return Message(RecordDict({
        "fitres.parameters": ArrayRecord({str(i): Array(vector[f"vector/{i}"]) for i in range(len(vector))}),
        "fitres.num_examples": MetricRecord({"num_examples": 1}),
        "fitres.metrics": metrics,
        "fitres.status": ConfigRecord({"code": 0, "message": ""}),
    }), reply_to=msg)


def _node_evaluate(msg, context):
    task = msg.content["task"]
    header = {"op": "evaluate", **{key: task[key] for key in ("settings", "split", "local_names", "local_round")}}
    arrays = {**_arrays(msg.content["global"], "global"), **_arrays(msg.content["local_init"], "local_init")}
    reply, _ = _request(context, header, arrays)
    return Message(RecordDict({"result": ConfigRecord(reply)}), reply_to=msg)


client_app = ClientApp()
client_app.query()(_node_query)
client_app.train("plain")(_node_train)
client_app.train(mods=[secaggplus_mod])(_node_train_secure)  # SecAgg+'s four stages; the mod calls it in stage 2
client_app.evaluate()(_node_evaluate)
