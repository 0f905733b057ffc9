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

from recbole_ur4rec.build import build  # noqa: E402
from recbole_ur4rec.checkpoints import load_checkpoint  # noqa: E402
from recbole_ur4rec.federated import FedAvg, round_plan  # noqa: E402
from recbole_ur4rec.federated.flower.engine import FlowerNodes, FlowerSession  # noqa: E402
from recbole_ur4rec.federated.flower.local import LocalFederation  # noqa: E402
from recbole_ur4rec.federated.node import LocalNodes  # noqa: E402
from recbole_ur4rec.federated.partition import FederationClients, read_federation, write_partitions  # noqa: E402
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
        self.sent = []

    def nodes(self):
        return sorted(self.contexts)

    def exchange(self, messages):
        from recbole_ur4rec.federated.flower import client_app

        handlers = {"query": client_app._node_query, "train": client_app._node_train, "evaluate": client_app._node_evaluate}
        replies = {}
        for node, message in messages.items():
            self.sent.append(message)
            replies[node] = handlers[message.metadata.message_type](message, self.contexts[node])
        return replies


def test_messages_carry_no_interaction_nor_personal_parameter_and_replies_match_the_in_process_nodes(settings, partitions, tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_run_id", "_node_id", "_task_id"):  # what the ServerApp process knows about itself
        monkeypatch.setattr(TaskIdentity, key, 1)
    server = server_settings(settings, partitions, tmp_path / "saved")
    config, model, *_ = build_model("FedDMMR", "tiny", server)
    clients = FederationClients(read_federation(str(partitions)))
    session = LoopbackSession({"model": "FedDMMR", "dataset": "tiny", "config_file_list": None, "config_dict": server}, partitions, tmp_path / "flower")
    flower, local = FlowerNodes(clients, session=session), LocalNodes(config, clients, str(tmp_path / "local"))
    sampled, orders = round_plan(7, 0, clients.clients, 0.5, 2, clients.n_rows)
    local_names = list(model.local_names)
    global_params = {n: p.detach().clone() for n, p in model.named_parameters() if n not in local_names}
    local_init = {n: model.get_parameter(n).detach().clone() for n in local_names}
    task = {"learning_rate": 0.01, "batch_size": 4, "optimizer": "adam", "dp_clip_norm": 1.0}
    a, b = FedAvg(global_params), FedAvg(global_params)
    losses_a = flower.train_round(1, sampled, orders, global_params, local_names, local_init, task, a)
    losses_b = local.train_round(1, sampled, orders, global_params, local_names, local_init, task, b)
    assert sorted(a.included) == sorted(b.included) == sorted(sampled) and losses_a == pytest.approx(losses_b)
    for name, value in b.result().items():
        assert torch.equal(a.result()[name], value), name
    # what crossed: to a node the global parameters (no personal ones), its users' ids, row counts and orders;
    # from a node one weighted sum of its users' updates of the global parameters
    train = [m for m in session.sent if m.metadata.message_type == "train"]
    assert len(train) == 2
    for message in train:
        spec = message.content["task"]
        assert set(message.content["global"]) == set(global_params) and not set(message.content["global"]) & set(local_names)
        assert set(spec) == {"settings", "round", "clients", "rows", "epochs", "orders", "local_names", "keep_round", "task"}
        assert len(spec["orders"]) == 2 * sum(spec["rows"])  # row permutations, no item id or target
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
    assert len(rounds) == ROUNDS and all(r["nodes"] == 2 and r["included"] == sorted(r["sampled"]) for r in rounds)
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
    assert rounds[0]["excluded"] == [bad_client]
    # users are on node u % 2: the failed node's users are those of bad_node_user's parity
    lost = sorted({u for u in second if u % 2 == bad_node_user % 2} | ({bad_client} & set(second)))
    assert rounds[1]["excluded"] == lost
    for r in rounds:
        assert sorted(r["included"] + r["excluded"]) == sorted(r["sampled"]) and r["included"]
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
    assert rounds[0]["excluded"] == sorted(u for u in first if u % 2 == late_user % 2)
    assert rounds[0]["included"] == sorted(u for u in first if u % 2 != late_user % 2)
    for r in rounds:
        assert sorted(r["included"] + r["excluded"]) == sorted(r["sampled"])
    assert flower["result"]["test_result"] is not None
