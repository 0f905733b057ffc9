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

The node's limits (:class:`~recbole_ur4rec.federated.privacy.NodePolicy`: ``min-users``, ``secagg-only``,
``max-evaluations``, ``max-clip-norm``, ``min-noise-multiplier``) are node config keys without a worker, and the
worker's own options with one (the worker serves whatever calls it, so the limits live there). The run config's
test hooks (``fail-clients``, ``fail-node-of``, ``stall-node-of``, ``stall-seconds``, ``nan-node-of``) are obeyed
only where the environment variable ``RECBOLE_UR4REC_TEST_HOOKS`` is ``1`` (set by the loopback test federation);
elsewhere a run that sets one is refused.
"""
import json
import os
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
from flwr.clientapp import ClientApp

from recbole_ur4rec.apps.flower import worker
from recbole_ur4rec.federated.privacy import TEST_HOOKS_ENV, NodePolicy

MAX_STALL_SECONDS = 600.0  # test hook stall-seconds, at most


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


def _test_hooks(context):
    """The run config's test hooks that are set (see the module docstring); refused unless test hooks are on."""
    defaults = {"fail-clients": "", "fail-node-of": "", "stall-node-of": "", "stall-seconds": 0.0, "nan-node-of": ""}
    hooks = {key: context.run_config.get(key, value) for key, value in defaults.items()}
    used = sorted(key for key, value in hooks.items() if value not in ("", 0, 0.0, None))
    if used and os.environ.get(TEST_HOOKS_ENV) != "1":
        raise PermissionError(
            f"run config sets the test hook(s) {', '.join(used)}; this SuperNode obeys them only with {TEST_HOOKS_ENV}=1 in "
            "its environment (the loopback test federation): the run is refused"
        )
    return hooks


def _request(context, header, arrays, users=()):
    """The node's reply ``(header, arrays)`` to a request of ``users``: from the node worker (node config
    ``worker``) or from a node built in this process."""
    hooks = _test_hooks(context)
    fail_users = sorted(_ids(hooks["fail-clients"]))
    if fail_users:
        header = {**header, "fail_users": fail_users}
    if _ids(hooks["nan-node-of"]) & set(users):
        header = {**header, "nan_partial": True}
    address = context.node_config.get("worker")
    policy = {key: context.node_config[key] for key in NodePolicy.KEYS if key in context.node_config}
    if address:
        if policy:
            raise ValueError(
                f"node config {sorted(policy)} has no effect beside 'worker': give the node worker these limits "
                f"(python -m recbole_ur4rec.apps.flower.worker --{' --'.join(sorted(policy))} ...)"
            )
        return worker.call(str(address), header, arrays)
    from recbole_ur4rec.apps.flower.node_service import NodeService  # lazy: a ClientApp that forwards imports no torch

    service = NodeService(
        _partition(context), context.node_config.get("state-dir") or None, context.node_config.get("items") or None,
        policy=NodePolicy.from_settings(policy, "node config"),
    )
    return service.handle(header, arrays)


def _arrays(record, prefix):
    return {f"{prefix}/{name}": array.numpy() for name, array in record.items()}


def _failures(context, users):
    """Test hooks: raise for a whole node (run config ``fail-node-of``) or wait (``stall-node-of``)."""
    hooks = _test_hooks(context)
    if _ids(hooks["fail-node-of"]) & set(users):
        raise RuntimeError("run config 'fail-node-of' names a user of this node (test failure of a whole node)")
    if _ids(hooks["stall-node-of"]) & set(users):  # a node too slow for the round
        time.sleep(min(float(hooks["stall-seconds"]), MAX_STALL_SECONDS))


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
    reply, reply_arrays = _request(context, {"op": "train", **header}, arrays, users)
    sums = ArrayRecord({name[len("sums/") :]: Array(value) for name, value in reply_arrays.items()})
    return Message(RecordDict({"result": ConfigRecord(reply), "sums": sums}), reply_to=msg)


def _node_train_secure(msg, context):
    """A SecAgg+ round's training (stage 2 of ``secaggplus_mod``): the task in ``fitins.config``, the global
    parameters in ``fitins.parameters``; reply the node's partial aggregate as one vector for the masked sum. The
    round's clipping range and number of nodes come from the node's own SecAgg+ state (what the mod will use)."""
    config = dict(msg.content["fitins.config"])
    partition = int(_meta(context)["node"])
    users = [int(u) for u in config[f"clients.{partition}"]]
    _failures(context, users)
    state = context.state.config_records[RECORD_KEY_STATE]
    secagg = {"clipping_range": float(state["clipping_range"]), "nodes": int(state["sample_num"])}
    fit = {f"fit/{i}": array.numpy() for i, array in enumerate(msg.content["fitins.parameters"].values())}
    _, vector = _request(context, {"op": "train_secure", "config": config, "secagg": secagg}, fit, users)
    return Message(RecordDict({
        "fitres.parameters": ArrayRecord({str(i): Array(vector[f"vector/{i}"]) for i in range(len(vector))}),
        "fitres.num_examples": MetricRecord({"num_examples": 1}),
        "fitres.metrics": ConfigRecord({}),  # nothing in the clear
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
