"""The ClientApp of every SuperNode: trains the node's users of a round (LoopEngine's client update) and replies
their updates and local parameters (see :mod:`recbole_ur4rec.federated.flower`)."""
import json
import time

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

from recbole_ur4rec.federated.aggregation import FedAvg
from recbole_ur4rec.federated.engine import ClientData, LoopEngine


class _Collect(FedAvg):
    """A FedAvg that also keeps every client's update, for the node's reply."""

    def __init__(self, global_params):
        super().__init__(global_params)
        self.updates, self.failed = {}, {}

    def add(self, clients, deltas, counts):
        for i, client in enumerate(clients):
            self.updates[client] = ({name: d[i] for name, d in deltas.items()}, int(counts[i]))
        return super().add(clients, deltas, counts)

    def fail(self, client, error):
        self.failed[client] = f"{type(error).__name__}: {error}"
        super().fail(client, error)


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


class _Rows(dict):
    """user -> one local parameter's value, indexed by a list of users like the [n_users ..] buffers."""

    def __getitem__(self, users):
        return torch.stack([dict.__getitem__(self, u) for u in users])


def _ids(text):
    """User ids from a comma- or space-separated run config string."""
    return {int(t) for t in str(text).replace(",", " ").split()}


def _node_setup(settings, node_config):
    """RecBole config, model and clients of the node, built from the server's settings as the server builds them."""
    from recbole_ur4rec.build import build
    from recbole_ur4rec.data.sequence_dataset import target_list_field

    config_dict = dict(settings["config_dict"])
    if node_config.get("data-path"):
        config_dict["data_path"] = str(node_config["data-path"])
    run = build(settings["model"], settings["dataset"], settings["config_file_list"], config_dict, log=False)
    return run.config, run.model, ClientData(run.train_data._dataset, target_list_field(run.config))


def _node_train(msg, context):
    """Train the node's users of this round (LoopEngine's update) and reply their updates."""
    task = msg.content["task"]
    users = [int(u) for u in task["clients"]]
    crash = _ids(context.run_config.get("fail-node-of", "")) & set(users)
    if crash:
        raise RuntimeError(f"run config 'fail-node-of' names user {min(crash)} of this node (test failure of a whole node)")
    if _ids(context.run_config.get("stall-node-of", "")) & set(users):  # a node too slow for the round (tests)
        time.sleep(float(context.run_config.get("stall-seconds", 0.0)))
    _, model, data = _node_setup(json.loads(task["settings"]), context.node_config)
    problems = {}
    for user, rows in zip(users, task["rows"]):
        have = len(data.rows[user]) if user in data.rows else 0
        if have != rows:
            problems[user] = ValueError(
                f"user {user}: this node's dataset has {have} training rows for the user, the server's {rows}: every "
                "SuperNode must read the same dataset (RecBole data_path, or node-config data-path)"
            )
    for user in _ids(context.run_config.get("fail-clients", "")) & set(users):
        problems.setdefault(user, RuntimeError(f"run config 'fail-clients' names user {user} (test failure of one client)"))
    flat, epochs, orders, at = list(task["orders"]), int(task["epochs"]), {}, 0
    for user, rows in zip(users, task["rows"]):
        orders[user] = [torch.tensor(flat[at + e * rows : at + (e + 1) * rows], dtype=torch.long) for e in range(epochs)]
        at += epochs * rows
    global_params = {name: torch.from_numpy(a.numpy()) for name, a in msg.content["global"].items()}

    # local parameters: the server's copy when sent, else this node's copy from an earlier round
    local_names, sent = list(task["local_names"]), [int(u) for u in task["local_clients"]]
    local = {name: _Rows() for name in local_names}
    for name in local_names:
        stored = context.state[f"local:{name}"] if f"local:{name}" in context.state else ArrayRecord()
        values = torch.from_numpy(msg.content["local"][name].numpy()) if sent else None
        for user in users:
            if user in sent:
                local[name][user] = values[sent.index(user)]
            elif str(user) in stored:
                local[name][user] = torch.from_numpy(stored[str(user)].numpy())
    for user in users:
        if local_names and any(user not in local[name] for name in local_names):
            problems.setdefault(user, LookupError(f"user {user}: no local parameters on this node and none sent (node state lost?)"))

    engine = _NodeEngine(model, data, float(task["learning_rate"]), int(task["batch_size"]), str(task["optimizer"]), problems)
    collect = _Collect(global_params)
    new_local, losses = engine.run(users, orders, global_params, local, collect)
    held = [u for u in users if local_names and all(u in local[name] for name in local_names)]
    for name in local_names:
        stored = context.state[f"local:{name}"] if f"local:{name}" in context.state else ArrayRecord()
        for user in held:
            value = new_local[user][name] if user in new_local else local[name][user]
            stored[str(user)] = Array(value.detach().numpy())
        context.state[f"local:{name}"] = stored

    trained = list(collect.updates)
    result = ConfigRecord({
        "clients": trained,
        "counts": [collect.updates[u][1] for u in trained],
        "losses": [float(x) for x in losses],
        "failed": list(collect.failed),
        "errors": list(collect.failed.values()),
        "local_clients": list(new_local),
        "held": held,
    })
    deltas = {name: torch.stack([collect.updates[u][0][name] for u in trained]).numpy() for name in global_params} if trained else {}
    local_out = {name: torch.stack([new_local[u][name] for u in new_local]).detach().numpy() for name in local_names} if new_local else {}
    content = RecordDict({
        "result": result,
        "deltas": ArrayRecord({name: Array(v) for name, v in deltas.items()}),
        "local": ArrayRecord({name: Array(v) for name, v in local_out.items()}),
    })
    return Message(content, reply_to=msg)


client_app = ClientApp()
client_app.train()(_node_train)
