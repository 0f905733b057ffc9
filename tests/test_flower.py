"""FedDMMR on Flower's deployment runtime (``federated_engine: flower``) over a partitioned dataset: a real SuperLink
and two SuperNodes on loopback, each its own process holding one partition, ``flwr run`` of the app; the global
parameters and metrics equal the in-process nodes', a failing client or node is left out while the rounds complete,
and the messages carry no interaction and no personal parameter."""
import json
import shutil

import pytest
import torch

pytest.importorskip("flwr", reason="flwr is not installed: the Flower engine needs `pip install 'flwr==1.41.*'`")

from conftest import write_sequential_dataset  # noqa: E402
from model_fixtures import build_model  # noqa: E402

from recbole_ur4rec.apps.flower.loopback import LocalFederation  # noqa: E402
from recbole_ur4rec.apps.partition_dataset import write_partitions  # noqa: E402
from recbole_ur4rec.build import build  # noqa: E402
from recbole_ur4rec.common.checkpoint_io import load_checkpoint  # noqa: E402
from recbole_ur4rec.federated import FedAvg, round_plan  # noqa: E402
from recbole_ur4rec.federated.catalog import FederationClients, read_federation  # noqa: E402
from recbole_ur4rec.federated.flower_nodes import FlowerNodes, FlowerSession  # noqa: E402
from recbole_ur4rec.federated.node import LocalNodes  # noqa: E402
from recbole_ur4rec.federated.privacy import TEST_HOOKS_ENV  # noqa: E402
from recbole_ur4rec.quick_start import run_recbole_ur4rec  # noqa: E402
from recbole_ur4rec.trainer import FedDMMRTrainer  # noqa: E402

ROUNDS = 2


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_sequential_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def settings(data_root):
    """Tiny walk dataset, no dropout, 2 rounds without validation (a checkpoint after every round), partial
    aggregation of the backbone from round 1, so personal parameters are kept on the nodes."""
    return {
        "data_path": data_root,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "state": "WARNING", "show_progress": False, "seed": 7, "threads": 1,
        "epochs": ROUNDS, "eval_step": 0, "train_batch_size": 4, "eval_batch_size": 256,
        "hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1, "MAX_ITEM_LIST_LENGTH": 20,
        "use_text": False, "hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "expert_dropout": 0.0,
        "client_fraction": 0.3, "local_groups": ["backbone"], "partial_aggregation_warmup_rounds": 1,
    }


@pytest.fixture(scope="module")
def partitions(settings, tmp_path_factory):
    """Two partitions of the tiny dataset (node-0, node-1, server, items)."""
    root = tmp_path_factory.mktemp("fed")
    run = build("FedDMMR", "tiny", config_dict=settings, log=False)
    write_partitions(run, str(root), 2)
    return root


@pytest.fixture(scope="module")
def federation(partitions, tmp_path_factory):
    """A SuperLink and 2 SuperNodes on 127.0.0.1 (free ports), node k holding partition k; their processes end at
    teardown."""
    with LocalFederation(num_nodes=2, cwd=str(tmp_path_factory.mktemp("flower")), partition_root=str(partitions)) as fed:
        yield fed


def server_settings(settings, partitions, checkpoint_dir):
    """The server's settings: the partition's server/ and items/ only (data_path points nowhere)."""
    return {**settings, "data_path": "/nonexistent", "federation_dir": str(partitions), "checkpoint_dir": str(checkpoint_dir)}


def flower_run(federation, settings, partitions, checkpoint_dir, **run_config):
    config_json = json.dumps(server_settings(settings, partitions, checkpoint_dir))
    return federation.run({"model": "FedDMMR", "dataset": "tiny", "config-json": config_json, **run_config}, timeout=600)


def sampled_per_round(settings, partitions):
    clients = FederationClients(read_federation(str(partitions)))
    return [round_plan(settings["seed"], r, clients.clients, settings["client_fraction"], 1, clients.n_rows)[0] for r in range(ROUNDS)]


def test_flower_needs_partitions_and_the_server_app(settings, partitions):
    config, model, *_ = build_model("FedDMMR", "tiny", {**settings, "federated_engine": "flower"})
    with pytest.raises(ValueError, match=r"'flower' trains on SuperNodes that each hold one partition.*'federation_dir'"):
        FedDMMRTrainer(config, model)
    config, model, *_ = build_model("FedDMMR", "tiny", {**server_settings(settings, partitions, "saved"), "federated_engine": "flower"})
    with pytest.raises(ValueError, match="'federated_engine' is 'flower'.*flwr run"):
        FedDMMRTrainer(config, model)


class LoopbackSession(FlowerSession):
    """A FlowerSession whose messages go straight to the ClientApp's handlers in this process (one Context per
    partition), recording every message and reply."""

    def __init__(self, settings, partitions, state):
        from flwr.app import Context, RecordDict

        super().__init__(None, settings)
        self.contexts = {
            10 + k: Context(run_id=1, node_id=10 + k, state=RecordDict(), run_config={},
                            node_config={"partition": str(partitions / f"node-{k}"), "state-dir": str(state / f"node-{k}")})
            for k in range(2)
        }
        self.sent, self.replies = [], []

    def nodes(self):
        return sorted(self.contexts)

    def exchange(self, messages, timeout=None):
        from flwr.app import Error, Message

        from recbole_ur4rec.apps.flower import client_app

        handlers = {"query": client_app._node_query, "train.plain": client_app._node_train, "evaluate": client_app._node_evaluate}
        replies = {}
        for node, message in messages.items():
            self.sent.append(message)
            try:
                replies[node] = handlers[message.metadata.message_type](message, self.contexts[node])
            except Exception as error:  # as the SuperNode does: an error reply (ClientApp raised)
                replies[node] = Message(Error(code=2, reason=f"{type(error).__name__}: {error}"), reply_to=message)
            self.replies.append(replies[node])
        return replies


def loopback_server(settings, partitions, tmp_path, monkeypatch):
    """The server's settings, model and clients for messages delivered in this process (as the ServerApp knows
    its run, node and task ids)."""
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)
    server = server_settings(settings, partitions, tmp_path / "saved")
    config, model, *_ = build_model("FedDMMR", "tiny", server)
    return server, config, model, FederationClients(read_federation(str(partitions)))


def test_messages_carry_no_interaction_nor_personal_parameter_and_replies_match_the_in_process_nodes(settings, partitions, tmp_path, monkeypatch):
    server, config, model, clients = loopback_server(settings, partitions, tmp_path, monkeypatch)
    session = LoopbackSession({"model": "FedDMMR", "dataset": "tiny", "config_file_list": None, "config_dict": server}, partitions, tmp_path / "flower")
    flower, local = FlowerNodes(clients, session=session), LocalNodes(config, clients, str(tmp_path / "local"), type(model))
    sampled, orders = round_plan(7, 0, clients.clients, 0.5, 2, clients.n_rows)
    local_names = list(model.local_names)
    global_params = {n: p.detach().clone() for n, p in model.named_parameters() if n not in local_names}
    local_init = {n: model.get_parameter(n).detach().clone() for n in local_names}
    task = {"learning_rate": 0.01, "batch_size": 4, "optimizer": "adam", "dp_clip_norm": 1.0}
    a, b = FedAvg(global_params), FedAvg(global_params)
    losses_a = flower.train_round(1, sampled, orders, global_params, local_names, local_init, task, a)
    losses_b = local.train_round(1, sampled, orders, global_params, local_names, local_init, task, b)
    assert a.n_included == b.n_included == len(sampled) and losses_a == pytest.approx(losses_b) and losses_a[1] == len(sampled)
    for name, value in b.result().items():
        assert torch.equal(a.result()[name], value), name
    # what crossed: to a node the global parameters (no personal ones), its users' ids, row counts and orders;
    # from a node one weighted sum of its users' updates of the global parameters, counts and a loss sum
    train = [m for m in session.sent if m.metadata.message_type == "train.plain"]
    assert len(train) == 2
    for message in train:
        spec = message.content["task"]
        assert set(message.content["global"]) == set(global_params) and not set(message.content["global"]) & set(local_names)
        assert set(spec) == {"settings", "round", "clients", "rows", "epochs", "orders", "local_names", "keep_round", "task"}
        assert len(spec["orders"]) == 2 * sum(spec["rows"])  # row permutations, no item id or target
    for reply in session.replies:
        if reply.metadata.message_type == "train.plain":
            assert set(reply.content["result"]) == {"total", "included", "excluded", "loss_sum", "loss_count"}  # no per-user value
    for k in range(2):
        stored = list((tmp_path / "flower" / f"node-{k}").iterdir())
        assert {p.name for p in stored} == {"init.npz", "local-1.npz"}, "the personal parameters stay on the node"
    # evaluation: the nodes' metric sums, the same from both
    got = flower.evaluate("test", global_params, local_names, 1)
    expected = local.evaluate("test", global_params, local_names, 1)
    assert got == expected and sum(users for _, users in got) == len(clients.clients)


def test_flower_run_equals_the_in_process_nodes_and_the_server_has_no_data(federation, settings, partitions, tmp_path):
    flower = flower_run(federation, settings, partitions, tmp_path / "flower")
    rounds = flower["rounds"]
    assert len(rounds) == ROUNDS and all(r["nodes"] == 2 and r["included"] == len(r["sampled"]) for r in rounds)
    assert [r["sampled"] for r in rounds] == sampled_per_round(settings, partitions)
    loop = run_recbole_ur4rec("FedDMMR", "tiny", config_dict={
        **server_settings(settings, partitions, tmp_path / "loop"), "federated_engine": "loop", "node_state_dir": str(tmp_path / "nodes"),
    })
    expected = load_checkpoint(loop["model_file"])["state_dict"]
    got = load_checkpoint(flower["result"]["model_file"])["state_dict"]
    assert got.keys() == expected.keys() and not any(name.startswith("local__") for name in got)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert flower["result"]["test_result"] == loop["test_result"]


def test_failing_client_and_failing_node_are_left_out_and_rounds_complete(federation, settings, partitions, tmp_path):
    first, second = sampled_per_round(settings, partitions)
    bad_client = first[0]  # its update raises on its node, in every round it is sampled
    bad_node_user = next(u for u in second if u not in first)  # its node fails as a whole in round 1
    flower = flower_run(federation, settings, partitions, tmp_path / "flower", **{"fail-clients": str(bad_client), "fail-node-of": str(bad_node_user)})
    rounds = flower["rounds"]
    assert len(rounds) == ROUNDS
    assert rounds[0]["excluded"] == 1 and rounds[0]["excluded_known"] == []  # a node says how many failed, not which
    # users are on node u % 2: the failed node's users are those of bad_node_user's parity
    down = sorted(u for u in second if u % 2 == bad_node_user % 2)
    assert rounds[1]["excluded_known"] == down
    assert rounds[1]["excluded"] == len(set(down) | ({bad_client} & set(second)))
    for r in rounds:
        assert r["included"] + r["excluded"] == len(r["sampled"]) and r["included"]
    state = load_checkpoint(flower["result"]["model_file"])["state_dict"]
    assert all(value.isfinite().all() for value in state.values() if value.is_floating_point())
    assert flower["result"]["test_result"] is not None


def test_a_node_without_a_reply_in_time_is_left_out_and_the_round_completes(federation, settings, partitions, tmp_path):
    first, second = sampled_per_round(settings, partitions)
    late_user = next(u for u in first if u not in second)  # its node stalls in round 0 only
    flower = flower_run(
        # a timeout with room for a node's ClientApp on a loaded 2-core machine
        federation, settings, partitions, tmp_path / "flower", **{"stall-node-of": str(late_user), "stall-seconds": 90.0, "round-timeout": 45.0}
    )
    rounds = flower["rounds"]
    assert len(rounds) == ROUNDS
    assert rounds[0]["excluded_known"] == sorted(u for u in first if u % 2 == late_user % 2)
    assert rounds[0]["included"] == len([u for u in first if u % 2 != late_user % 2])
    for r in rounds:
        assert r["included"] + r["excluded"] == len(r["sampled"])
    assert flower["result"]["test_result"] is not None


def test_non_finite_partials_are_dropped_and_a_round_without_any_leaves_the_model_unchanged(federation, settings, partitions, tmp_path):
    """Every node replies NaN sums (test hook nan-node-of): the server drops each partial as a failed node, both
    rounds fail, and the run's model is the initial one."""
    everyone = FederationClients(read_federation(str(partitions))).clients.tolist()
    flower = flower_run(federation, settings, partitions, tmp_path / "flower", **{"nan-node-of": ",".join(map(str, everyone))})
    rounds = flower["rounds"]
    assert len(rounds) == ROUNDS
    for r in rounds:
        assert r["included"] == 0 and r["excluded_known"] == sorted(r["sampled"])
    _, initial, *_ = build_model("FedDMMR", "tiny", server_settings(settings, partitions, tmp_path / "initial"))
    got = load_checkpoint(flower["result"]["model_file"])["state_dict"]
    for name, value in initial.named_parameters():  # (buffers: local_active turns on with the partial aggregation)
        assert torch.equal(got[name], value), name


@pytest.mark.parametrize("attack", ["few users per node", "secagg with 2 nodes"])
def test_a_curious_server_is_refused_on_flower(federation, settings, partitions, tmp_path, attack):
    """On real SuperNodes: a round that asks each node for 1 or 2 users (client_fraction 0.05) is refused by the
    nodes (min-users 5), and SecAgg+ over 2 nodes by the server itself; every round fails, the model stays initial."""
    run_config = {"secagg": True} if attack == "secagg with 2 nodes" else {}
    run_settings = {**settings, "client_fraction": 0.05} if attack == "few users per node" else settings
    flower = flower_run(federation, run_settings, partitions, tmp_path / "flower", **run_config)
    for r in flower["rounds"]:
        assert r["included"] == 0 and r["excluded_known"] == sorted(r["sampled"])
    _, initial, *_ = build_model("FedDMMR", "tiny", server_settings(run_settings, partitions, tmp_path / "initial"))
    got = load_checkpoint(flower["result"]["model_file"])["state_dict"]
    assert all(torch.equal(got[name], value) for name, value in initial.named_parameters())


def test_the_server_drops_a_non_finite_partial_and_merges_the_others(settings, partitions, tmp_path, monkeypatch):
    monkeypatch.setenv(TEST_HOOKS_ENV, "1")
    server, config, model, clients = loopback_server(settings, partitions, tmp_path, monkeypatch)
    session = LoopbackSession({"model": "FedDMMR", "dataset": "tiny", "config_file_list": None, "config_dict": server}, partitions, tmp_path / "flower")
    sampled, orders = round_plan(7, 0, clients.clients, 0.5, 1, clients.n_rows)
    for context in session.contexts.values():
        context.run_config["nan-node-of"] = str(sampled[0])  # the node of this user replies NaN sums
    global_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    task = {"learning_rate": 0.01, "batch_size": 4, "optimizer": "adam", "dp_clip_norm": None, "dp_noise_multiplier": 0.0}
    aggregator = FedAvg(global_params)
    FlowerNodes(clients, session=session).train_round(0, sampled, orders, global_params, [], None, task, aggregator)
    dropped = sorted(u for u in sampled if u % 2 == sampled[0] % 2)
    assert sorted(aggregator.excluded) == dropped and aggregator.n_included == len(sampled) - len(dropped)
    assert all(v.isfinite().all() for v in aggregator.result().values())


def test_the_superlink_speaks_tls_and_refuses_an_unregistered_node(federation):
    superlink = federation.processes[0].args
    assert "--insecure" not in superlink and "--enable-supernode-auth" in superlink and "--ssl-certfile" in superlink
    intruder = federation.start_node(0, key=False, name="intruder")  # no authentication key
    try:
        intruder.wait(timeout=120)
    finally:
        if intruder.poll() is None:
            intruder.kill()
    assert intruder.returncode != 0
    assert "SuperNode authentication is enabled. All SuperNodes must be registered" in federation.log_tail("intruder")


class LoopbackGrid:
    """The Grid SecAgg+'s workflow talks to, delivering each message to the ClientApp of its node in this process."""

    def __init__(self, contexts):
        from types import SimpleNamespace

        self.contexts, self.run, self.calls = contexts, SimpleNamespace(run_id=1), 0

    def send_and_receive(self, messages, *, timeout=None):
        import copy

        from flwr.app import Error, Message

        from recbole_ur4rec.apps.flower.client_app import client_app

        replies = []
        for message in messages:
            self.calls += 1
            message.metadata.__dict__["_message_id"] = f"m{self.calls}"
            message.metadata.__dict__["_src_node_id"] = 0
            try:
                replies.append(client_app(copy.deepcopy(message), self.contexts[message.metadata.dst_node_id]))
            except Exception as error:  # as the SuperNode does: an error reply (ClientApp raised)
                replies.append(Message(Error(code=2, reason=f"{type(error).__name__}: {error}"), reply_to=message))
        return replies


@pytest.fixture(scope="module")
def three_partitions(settings, tmp_path_factory):
    root = tmp_path_factory.mktemp("fed3")
    write_partitions(build("FedDMMR", "tiny", config_dict=settings, log=False), str(root), 3)
    return root


@pytest.mark.parametrize("dropout", [False, True])
def test_secure_aggregation_equals_fedavg_and_survives_a_dropout(settings, three_partitions, tmp_path, monkeypatch, dropout):
    from flwr.app import Context, RecordDict

    monkeypatch.setenv(TEST_HOOKS_ENV, "1")  # the fail-node-of hook
    server, config, model, clients = loopback_server(settings, three_partitions, tmp_path, monkeypatch)
    sampled, orders = round_plan(7, 0, clients.clients, 0.5, 1, clients.n_rows)
    dropped = sampled[0] % 3 if dropout else None  # this partition's node fails inside SecAgg+ (stage 2)
    run_config = {"fail-node-of": str(sampled[0])} if dropout else {}
    contexts = {
        10 + k: Context(run_id=1, node_id=10 + k, state=RecordDict(), run_config=run_config,
                        node_config={"partition": str(three_partitions / f"node-{k}"), "state-dir": str(tmp_path / f"secure-{k}")})
        for k in range(3)
    }
    session = LoopbackSession({"model": "FedDMMR", "dataset": "tiny", "config_file_list": None, "config_dict": server}, three_partitions, tmp_path)
    session.contexts = contexts
    session.grid = LoopbackGrid(contexts)
    session.secagg = {"num_shares": 3, "reconstruction_threshold": 2, "clipping_range": 8.0, "quantization_range": 2**22, "timeout": None}
    secure, local = FlowerNodes(clients, session=session), LocalNodes(config, clients, str(tmp_path / "plain"), type(model))
    global_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    task = {"learning_rate": 0.01, "batch_size": 4, "optimizer": "adam", "dp_clip_norm": None}
    a, b = FedAvg(global_params), FedAvg(global_params)
    losses_a = secure.train_round(0, sampled, orders, global_params, [], None, task, a)
    kept = [c for c in sampled if c % 3 != dropped]
    losses_b = local.train_round(0, kept, orders, global_params, [], None, task, b)
    assert a.n_included == len(kept) and sorted(a.excluded) == sorted(set(sampled) - set(kept))
    assert a.total == pytest.approx(b.total, rel=1e-5) and losses_a[1] == losses_b[1] and losses_a[0] == pytest.approx(losses_b[0], rel=1e-4)
    step = 2 * 8.0 / 2**22 * sum(clients.counts[c] for c in sampled)  # quantisation step, times the weight scale
    for name, value in b.result().items():
        assert torch.allclose(a.result()[name], value, atol=3 * step / b.total), name
    # the server saw only the sum: no reply carried a node's update in the clear
    assert session.grid.calls >= 4 * (3 - dropout)


def test_secure_aggregation_under_dp_sums_the_nodes_noisy_partials(settings, three_partitions, tmp_path, monkeypatch):
    """Under DP each node adds its own noise (std 2 z C) before masking; the server gets their sum, weighted 1 per
    user, and no loss."""
    from flwr.app import Context, RecordDict

    server, config, model, clients = loopback_server(settings, three_partitions, tmp_path, monkeypatch)
    sampled, orders = round_plan(7, 0, clients.clients, 0.5, 1, clients.n_rows)
    contexts = {
        10 + k: Context(run_id=1, node_id=10 + k, state=RecordDict(), run_config={},
                        node_config={"partition": str(three_partitions / f"node-{k}"), "state-dir": str(tmp_path / f"secure-{k}")})
        for k in range(3)
    }
    session = LoopbackSession({"model": "FedDMMR", "dataset": "tiny", "config_file_list": None, "config_dict": server}, three_partitions, tmp_path)
    session.contexts, session.grid = contexts, LoopbackGrid(contexts)
    session.secagg = {"num_shares": 3, "reconstruction_threshold": 2, "clipping_range": 8.0, "quantization_range": 2**22, "timeout": None}
    global_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    task = {"learning_rate": 0.01, "batch_size": 4, "optimizer": "sgd", "dp_clip_norm": 0.1, "dp_noise_multiplier": 1.0}
    aggregator = FedAvg(global_params, uniform=True)
    assert FlowerNodes(clients, session=session).train_round(0, sampled, orders, global_params, [], None, task, aggregator) == (None, 0)
    assert aggregator.n_included == len(sampled) and aggregator.total == pytest.approx(len(sampled), abs=1e-3)
    noise = torch.cat([v.reshape(-1) for v in aggregator.sums.values()]).double()
    assert noise.std().item() == pytest.approx(3**0.5 * 2 * 1.0 * 0.1, rel=0.05)  # three nodes' draws


def test_a_node_runs_on_the_run_settings_threads(settings, partitions, tmp_path):
    """A node worker is its own process: it takes the run's ``threads`` (and anomaly mode) from the settings."""
    from recbole_ur4rec.apps.flower.node_service import NodeService

    before = torch.get_num_threads()
    service = NodeService(str(partitions / "node-0"), str(tmp_path / "state"), reuse=True)
    config_dict = {**server_settings(settings, partitions, tmp_path / "unused"), "threads": before + 1}
    try:
        torch.autograd.set_detect_anomaly(True)  # as importing RecBole's SINE leaves it
        service.node(json.dumps({"model": "FedDMMR", "dataset": "tiny", "config_file_list": None, "config_dict": config_dict}))
        assert torch.get_num_threads() == before + 1 and not torch.is_anomaly_enabled()
    finally:
        torch.set_num_threads(before)
        torch.autograd.set_detect_anomaly(False)


def test_the_client_app_imports_neither_torch_nor_recbole(tmp_path):
    """With a node worker, a ClientApp process (one per message) only translates messages: no torch import."""
    import subprocess
    import sys

    code = "import sys, recbole_ur4rec.apps.flower.client_app; print(sorted(m for m in ('torch', 'recbole') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.fixture
def workers(partitions, tmp_path):
    """A node worker per partition (``python -m recbole_ur4rec.apps.flower.worker``), each its own process."""
    import subprocess

    from recbole_ur4rec.apps.flower import worker

    sockets = [tmp_path / f"worker-{k}" / "worker.sock" for k in range(2)]
    processes = [subprocess.Popen(worker.command(partitions / f"node-{k}", tmp_path / f"worker-{k}", sockets[k])) for k in range(2)]
    try:
        for socket, process in zip(sockets, processes):
            worker.wait_listening(str(socket), process, 300)
        yield sockets
    finally:
        for p in processes:
            p.kill()
            p.wait()


def test_node_workers_answer_as_the_in_process_nodes_across_rounds_and_refuse_a_wrong_key(settings, partitions, workers, tmp_path, monkeypatch):
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Client

    from recbole_ur4rec.apps.flower import worker

    server, config, model, clients = loopback_server(settings, partitions, tmp_path, monkeypatch)
    session = LoopbackSession({"model": "FedDMMR", "dataset": "tiny", "config_file_list": None, "config_dict": server}, partitions, tmp_path / "unused")
    for k, context in enumerate(session.contexts.values()):  # the ClientApp forwards to node k's worker
        context.node_config.update({"state-dir": str(workers[k].parent), "worker": str(workers[k])})
    flower, local = FlowerNodes(clients, session=session), LocalNodes(config, clients, str(tmp_path / "local"), type(model))
    local_names = list(model.local_names)
    global_params = {n: p.detach().clone() for n, p in model.named_parameters() if n not in local_names}
    local_init = {n: model.get_parameter(n).detach().clone() for n in local_names}
    task = {"learning_rate": 0.01, "batch_size": 4, "optimizer": "adam", "dp_clip_norm": 1.0}
    flower._nodes()  # the server's query: each worker builds its node before the first round
    for k, socket in enumerate(workers):
        assert worker.call(socket, {"op": "prepare", "settings": json.dumps(session.settings)}, {})[0] == {"partition": k, "built": False}
    for round_idx in (1, 2):  # round 2 starts from the local parameters the workers kept in round 1
        sampled, orders = round_plan(7, round_idx, clients.clients, 0.6, 1, clients.n_rows)
        a, b = FedAvg(global_params), FedAvg(global_params)
        losses_a = flower.train_round(round_idx, sampled, orders, global_params, local_names, local_init, task, a)
        losses_b = local.train_round(round_idx, sampled, orders, global_params, local_names, local_init, task, b)
        assert a.n_included == b.n_included == len(sampled) and losses_a == pytest.approx(losses_b)
        for name, value in b.result().items():
            assert torch.equal(a.result()[name], value), name
        global_params = {n: v.clone() for n, v in b.result().items()}
    assert flower.evaluate("test", global_params, local_names, 2) == local.evaluate("test", global_params, local_names, 2)
    for socket in workers:  # the personal parameters are in the worker's state folder
        assert {p.name for p in socket.parent.glob("*.npz")} >= {"init.npz", "local-1.npz"}
    with pytest.raises(AuthenticationError):  # a client without the worker's key is not served
        Client(str(workers[0]), family="AF_UNIX", authkey=b"not the key")
    with pytest.raises(RuntimeError, match="node worker .*unknown node request 'nope'"):  # the worker goes on serving
        worker.call(workers[0], {"op": "nope"}, {})
    with pytest.raises(RuntimeError, match="another node worker is listening on"):  # a second worker on the same socket
        worker.serve(workers[0], None)
    with pytest.raises(ConnectionError, match="no node worker answers at .*python -m recbole_ur4rec.apps.flower.worker"):
        worker.call(tmp_path / "nowhere.sock", {"op": "evaluate"}, {})
