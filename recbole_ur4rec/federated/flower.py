"""FedDMMR's federated rounds on Flower's deployment runtime: clients on SuperNodes, separate processes or machines.

``federated_engine: flower`` makes :class:`FlowerEngine` run the client updates of each round. The whole RecBole run
(:func:`~recbole_ur4rec.quick_start.run_recbole_ur4rec`: data, ``fit``, aggregation, evaluation) is the main of a
Flower ``ServerApp``; the ``ClientApp`` on every SuperNode trains the users assigned to that node:

- the server sorts the connected SuperNodes and gives user ``u`` to node ``u % n_nodes``; each round it sends every
  node with sampled users one ``train`` Message: the global parameters (ArrayRecord), the node's users, their row
  orders of the round (from :func:`~recbole_ur4rec.federated.round_plan`), the local optimizer, learning rate and
  batch size, and the RecBole settings the node rebuilds the same dataset and model from (its users' rows are read
  on the node; raw interactions never travel);
- the ClientApp runs :class:`~recbole_ur4rec.federated.LoopEngine`'s client update for each of its users (the same
  local optimizer steps) and replies per-client deltas, sample counts and losses, plus the users' new local parameters
  (``local_groups`` after the warm-up): the in-process engines hand those to the trainer too, which keeps them in the
  model's ``local__*`` buffers for personalised evaluation and checkpoints. The node also keeps them in its node state
  between rounds, so the server sends a user's local parameters only when that node does not hold the current copy
  (the first local round, after a resume, or when the user moved to another node);
- the server adds the updates to the round's :class:`~recbole_ur4rec.federated.FedAvg` client by client in the
  sampled order, as :class:`~recbole_ur4rec.federated.LoopEngine` does, so the aggregate equals the in-process one
  up to float rounding (exactly with the same ``threads``) when the model has no dropout (with dropout each process
  draws its own masks). A client whose update fails on its node, and every client of a node that fails or does not
  reply within ``round-timeout`` seconds, is logged and left out (``FedAvg.fail``); the round completes.

Run it (all on 127.0.0.1 here; for nodes on other machines start the SuperLink with ``--host 0.0.0.0``)::

    flower-superlink --insecure --port 9091 --disable-runtime-dependency-installation
    flower-supernode --insecure --superlink 127.0.0.1:9091 --port 9094   # one per node, each its own --port
    flwr run recbole_ur4rec/federated/flower_app local --run-config run.toml

with ``local`` a connection of ``$FLWR_HOME/config.toml`` (``[superlink] default = "local"``, ``[superlink.local]``
``address = "127.0.0.1:9091"``, ``insecure = true``) and ``run.toml`` overriding the run config of
``flower_app/pyproject.toml`` (documented there), e.g. ``dataset = "ml-100k"``, ``config-json = '{"threads": 1}'``.
The apps are the installed recbole-ur4rec's (hence ``--disable-runtime-dependency-installation``: nothing is
installed per run). Relative RecBole paths resolve against the SuperLink's working directory (server) and the
SuperNodes' (nodes); ``--node-config 'data-path="..."'`` overrides ``data_path`` on a node. Every round starts one
ClientApp process per node, which rebuilds the dataset and model. :class:`LocalFederation` starts such a runtime on
loopback for tests and benchmarks (``bench/flower_round_time.py``).
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from logging import getLogger
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from recbole_ur4rec.federated.aggregation import FedAvg
from recbole_ur4rec.federated.engine import ClientData, Engine, LoopEngine

APP_DIR = Path(__file__).parent / "flower_app"
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
            f"{APP_DIR}: start a SuperLink and SuperNodes and `flwr run` that app (see recbole_ur4rec.federated.flower)"
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


# ---- the ClientApp --------------------------------------------------------------------------------------------------
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
    """RecBole config, model and clients of the node, built from the server's settings as the trainer builds them."""
    from recbole.utils import init_seed

    from recbole_ur4rec.config import Config
    from recbole_ur4rec.data import create_dataset, data_preparation
    from recbole_ur4rec.data.sequence_dataset import target_list_field
    from recbole_ur4rec.utils import get_model

    config_dict = dict(settings["config_dict"])
    if node_config.get("data-path"):
        config_dict["data_path"] = str(node_config["data-path"])
    config = Config(model=settings["model"], dataset=settings["dataset"], config_file_list=settings["config_file_list"], config_dict=config_dict)
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    init_seed(config["seed"], config["reproducibility"])
    train_data, _, _ = data_preparation(config, create_dataset(config))
    model = get_model(config["model"])(config, train_data._dataset)
    return config, model, ClientData(train_data._dataset, target_list_field(config))


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


# ---- the ServerApp --------------------------------------------------------------------------------------------------
def _settings(run_config):
    """RecBole settings from the run config (keys of flower_app/pyproject.toml)."""
    text = str(run_config.get("config-json", "{}"))
    try:
        config_dict = json.loads(text or "{}")
    except json.JSONDecodeError as err:
        raise ValueError(f"run config key 'config-json' must be a JSON object of RecBole settings, got {text!r} ({err})") from None
    if not isinstance(config_dict, dict):
        raise ValueError(f"run config key 'config-json' must be a JSON object of RecBole settings, got {text!r}")
    return {
        "model": str(run_config.get("model", "FedDMMR")),
        "dataset": str(run_config.get("dataset", "ml-100k")),
        "config_file_list": str(run_config.get("config-files", "")).split() or None,
        "config_dict": {**config_dict, "federated_engine": "flower"},
    }


def _server_main(grid: Grid, context: Context) -> None:
    """Run the whole RecBole training with ``federated_engine: flower``; write the result to run config ``output``."""
    from recbole_ur4rec.quick_start import run_recbole_ur4rec

    run_config = context.run_config
    output = str(run_config.get("output", ""))
    session = None
    try:
        session = FlowerSession(
            grid, _settings(run_config), round_timeout=float(run_config.get("round-timeout", 600.0)),
            min_nodes=int(run_config.get("min-nodes", 1)), node_wait=float(run_config.get("node-wait", 60.0)),
        )
        with session:
            settings = session.settings
            result = run_recbole_ur4rec(settings["model"], settings["dataset"], settings["config_file_list"], settings["config_dict"])
    except Exception:
        if output:
            _write_json(output, {"error": traceback.format_exc(), "rounds": session.rounds if session else []})
        raise
    if output:
        _write_json(output, {"result": result, "rounds": session.rounds})


def _write_json(path, value):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, default=float)
    os.replace(tmp, path)  # readers never see a partial file


server_app = ServerApp()
server_app.main()(_server_main)


# ---- a loopback runtime for tests and benchmarks --------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalFederation:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1 (free ports), each its own process, and ``flwr run``.

    Everything Flower writes goes to a temporary ``FLWR_HOME``; :meth:`close` (or leaving the ``with`` block) ends
    the processes it started and their children. ``cwd`` is the working directory of every process (RecBole's
    relative paths).
    """

    def __init__(self, num_nodes=2, cwd=None, startup_timeout=60.0):
        self.num_nodes, self.cwd, self.startup_timeout = num_nodes, cwd, startup_timeout
        self.processes, self.logs = [], []
        self.home = Path(tempfile.mkdtemp(prefix="ur4rec-flower-"))
        self.port = None
        self.bin = Path(sys.executable).parent
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _spawn(self, name, args):
        log = open(self.home / f"{name}.log", "wb")
        self.logs.append(log)
        self.processes.append(subprocess.Popen([str(self.bin / args[0]), *args[1:]], cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def start(self):
        self.port = _free_port()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self._spawn("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port), "--disable-runtime-dependency-installation"])
        deadline = time.time() + self.startup_timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or self.processes[0].poll() is not None:
                    raise RuntimeError(f"flower-superlink did not start: {self.log_tail('superlink')}") from None
                time.sleep(0.2)
        for i in range(self.num_nodes):
            self._spawn(f"supernode{i}", [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}", "--host", "127.0.0.1",
                "--port", str(_free_port()), "--node-config", f"partition-id={i} num-partitions={self.num_nodes}",
            ])

    def log_tail(self, name, chars=3000):
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def _flwr(self, *args, timeout=120):
        done = subprocess.run([str(self.bin / "flwr"), *args], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        return done.stdout

    def run(self, run_config, timeout=900.0):
        """``flwr run`` the FedDMMR app with ``run_config`` (keys of flower_app/pyproject.toml); wait for it to end.

        Returns:
            dict: ``result`` (of ``run_recbole_ur4rec``) and ``rounds`` (one record per round) of the ServerApp.
        """
        import tomli_w

        output = self.home / f"output-{time.time_ns()}.json"
        overrides = self.home / f"run-config-{time.time_ns()}.toml"
        overrides.write_text(tomli_w.dumps({"min-nodes": self.num_nodes, **run_config, "output": str(output)}))
        started = json.loads(self._flwr("run", str(APP_DIR), "local", "--run-config", str(overrides), "--format", "json"))
        run_id = started["run-id"]
        deadline, checked = time.time() + timeout, time.time()
        while not output.exists():
            if time.time() > deadline:
                raise TimeoutError(f"Flower run {run_id} did not finish within {timeout} s:\n{self.run_log(run_id)}")
            if time.time() - checked > 5:  # a ServerApp that dies before writing its output
                checked = time.time()
                status = json.loads(self._flwr("ls", "local", "--run-id", str(run_id), "--format", "json"))
                if any(str(r.get("status", "")).startswith("finished") for r in status.get("runs", [])) and not output.exists():
                    time.sleep(1)
                    if not output.exists():
                        raise RuntimeError(f"Flower run {run_id} ended without output:\n{self.run_log(run_id)}")
            time.sleep(0.2)
        value = json.loads(output.read_text())
        if "error" in value:
            raise RuntimeError(f"the ServerApp of Flower run {run_id} failed:\n{value['error']}")
        return value

    def run_log(self, run_id):
        try:
            return self._flwr("log", str(run_id), "local", "--show", timeout=30)[-6000:]
        except Exception as error:  # the log is for the error message only
            return f"(no log: {error})"

    def close(self):
        """End the started processes and their children (Flower's SuperExec and app processes)."""
        import psutil

        family = []  # psutil handles: kill() refuses a pid that was reused meanwhile
        for process in self.processes:
            try:
                family += psutil.Process(process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        for child in family:  # children a terminated parent left behind
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self.processes = []
        for log in self.logs:
            log.close()
        self.logs = []
        shutil.rmtree(self.home, ignore_errors=True)
