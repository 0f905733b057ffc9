"""Privacy of FedDMMR's federation against a curious server: a node's refusals (too few users, rows that are not
permutations, plain rounds at a SecAgg-only node, an evaluation budget, DP settings beyond its limits), node-side DP
noise that no config or seed regenerates, the accountant's epsilon against a hand computation, owner-only files,
test hooks that production refuses; and a curious-server harness that tries each leak, in process and through the
ClientApp's Flower messages, and finds each refused or empty."""
import json
import os
import stat

import numpy as np
import pytest
import torch

from conftest import write_sequential_dataset
from model_fixtures import build_model

from recbole_ur4rec.apps.partition_dataset import write_partitions
from recbole_ur4rec.build import build
from recbole_ur4rec.federated import FedAvg, round_plan
from recbole_ur4rec.federated.catalog import FederationClients, read_federation
from recbole_ur4rec.federated.node import LocalStore, Node
from recbole_ur4rec.federated.privacy import (
    TEST_HOOKS_ENV,
    NodePolicy,
    PrivacyRefusal,
    UserLevelAccountant,
    node_noise_std,
)
from recbole_ur4rec.registry import get_model


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return {
        "data_path": write_sequential_dataset(tmp_path_factory.mktemp("data")),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "state": "WARNING", "show_progress": False, "seed": 7, "threads": 1, "epochs": 1, "eval_step": 0,
        "train_batch_size": 4, "eval_batch_size": 256, "hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1,
        "MAX_ITEM_LIST_LENGTH": 20, "use_text": False, "hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "expert_dropout": 0.0,
    }


@pytest.fixture(scope="module")
def partitions(settings, tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    write_partitions(build("FedDMMR", "tiny", config_dict=settings, log=False), str(root), 2)
    return root


@pytest.fixture
def server(settings, partitions, tmp_path):
    """The curious server's knowledge: its config and model, the clients' ids, nodes and row counts."""
    config, model, *_ = build_model("FedDMMR", "tiny", {**settings, "data_path": "/nonexistent", "federation_dir": str(partitions), "checkpoint_dir": str(tmp_path)})
    return config, model, FederationClients(read_federation(str(partitions)))


@pytest.fixture
def task_identity(monkeypatch):
    """The run, node and task ids a Flower message takes (as inside a ClientApp)."""
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)


def make_node(server, partitions, state, policy=None):
    config, model, _ = server
    return Node(config, str(partitions / "node-0"), str(state), type(model), policy=policy)


def global_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


TASK = {"learning_rate": 0.01, "batch_size": 4, "optimizer": "sgd", "dp_clip_norm": None, "dp_noise_multiplier": 0.0}


def plan(clients, users, epochs=1, seed=7):
    rng = np.random.default_rng(seed)
    return {u: [torch.as_tensor(rng.permutation(clients.n_rows[u])) for _ in range(epochs)] for u in users}


# ---- the node's refusals ---------------------------------------------------------------------------------------------
def test_a_node_refuses_replies_over_too_few_users(server, partitions, tmp_path):
    _, model, clients = server
    node = make_node(server, partitions, tmp_path / "state")
    users = node.partition.users
    with pytest.raises(PrivacyRefusal, match=r"training reply would cover 4 user\(s\); this node answers for at least 5 .*'min-users'"):
        node.train(0, users[:4], plan(clients, users[:4]), global_of(model), [], None, TASK)
    partial, (loss_sum, count) = node.train(0, users[:5], plan(clients, users[:5]), global_of(model), [], None, TASK)
    assert partial["included"] == 5 and count == 5 and np.isfinite(loss_sum)
    # a node's evaluation covers all its users: a node with fewer than min-users refuses to evaluate
    small = make_node(server, partitions, tmp_path / "small", NodePolicy(min_users=len(users) + 1))
    with pytest.raises(PrivacyRefusal, match="test evaluation would cover"):
        small.evaluate("test", global_of(model), [], 0)


def test_row_orders_must_be_permutations_of_the_users_own_rows(server, partitions, tmp_path):
    _, model, clients = server
    node = make_node(server, partitions, tmp_path / "state")
    users = sorted(node.partition.users, key=lambda u: -clients.n_rows[u])[:5]  # users with 2 rows first
    orders = plan(clients, users)
    repeated = {**orders, users[0]: [torch.zeros(clients.n_rows[users[0]], dtype=torch.long)]}  # one row, many times
    with pytest.raises(PrivacyRefusal, match=rf"row order of user {users[0]}, local epoch 0, is not a permutation"):
        node.train(0, users, repeated, global_of(model), [], None, TASK)
    short = {**orders, users[1]: [orders[users[1]][0][:-1]]}
    with pytest.raises(PrivacyRefusal, match=rf"user {users[1]}"):
        node.train(0, users, short, global_of(model), [], None, TASK)


def test_the_evaluation_budget_is_per_run_and_kept_on_disk(server, partitions, tmp_path):
    _, model, _ = server
    node = make_node(server, partitions, tmp_path / "state", NodePolicy(max_evaluations=2))
    for _ in range(2):
        node.evaluate("valid", global_of(model), [], 0, run_key="run-a")
    with pytest.raises(PrivacyRefusal, match=r"answered 2 evaluations of this run, its limit \(node policy 'max-evaluations'\)"):
        node.evaluate("valid", global_of(model), [], 0, run_key="run-a")
    again = make_node(server, partitions, tmp_path / "state", NodePolicy(max_evaluations=2))  # a restarted node
    with pytest.raises(PrivacyRefusal, match="answered 2 evaluations"):
        again.evaluate("test", global_of(model), [], 0, run_key="run-a")
    assert again.evaluate("test", global_of(model), [], 0, run_key="run-b")[1] > 0  # another run has its own budget


def test_the_node_bounds_the_clip_norm_and_the_noise(server, partitions, tmp_path):
    _, model, clients = server
    node = make_node(server, partitions, tmp_path / "state", NodePolicy(max_clip_norm=1.0, min_noise_multiplier=0.5))
    users = node.partition.users[:5]
    for task, message in [
        ({**TASK, "dp_clip_norm": 2.0, "dp_noise_multiplier": 1.0}, "dp_clip_norm 2.0; this node allows at most 1.0"),
        ({**TASK, "dp_clip_norm": None}, "dp_clip_norm None; this node allows at most 1.0"),
        ({**TASK, "dp_clip_norm": 1.0, "dp_noise_multiplier": 0.1}, "dp_noise_multiplier 0.1; this node adds at least 0.5"),
    ]:
        with pytest.raises(PrivacyRefusal, match=message):
            node.train(0, users, plan(clients, users), global_of(model), [], None, task)


def test_node_policy_settings_are_checked():
    assert NodePolicy.from_settings({"min-users": "7", "secagg-only": "true"}, "node config") == NodePolicy(min_users=7, secagg_only=True)
    with pytest.raises(ValueError, match=r"node config: 'min-users' must be an int >= 1, got 0"):
        NodePolicy.from_settings({"min-users": 0}, "node config")
    with pytest.raises(ValueError, match=r"unknown node policy key\(s\) \['min_users'\]"):
        NodePolicy.from_settings({"min_users": 3}, "config key 'node_policy'")
    with pytest.raises(ValueError, match="'max-clip-norm' must be a number > 0"):
        NodePolicy.from_settings({"max-clip-norm": "-1"}, "node config")


# ---- DP: secure node-side noise and the accountant ------------------------------------------------------------------
def test_dp_noise_is_added_on_the_node_at_2zC_and_no_seed_regenerates_it(server, partitions, tmp_path):
    _, model, clients = server
    users = make_node(server, partitions, tmp_path / "x").partition.users[:5]
    orders, params = plan(clients, users), global_of(model)
    task = {**TASK, "dp_clip_norm": 0.05, "dp_noise_multiplier": 2.0}
    torch.manual_seed(0)
    first, loss = make_node(server, partitions, tmp_path / "a").train(0, users, orders, params, [], None, task)
    torch.manual_seed(0)  # the same process RNG, config, seed and request: only the node's secure noise differs
    second, _ = make_node(server, partitions, tmp_path / "b").train(0, users, orders, params, [], None, task)
    assert loss == (None, 0), "no loss leaves a node under DP"
    assert first["total"] == second["total"] == 5  # weight 1 per user
    diff = torch.cat([(first["sums"][n] - second["sums"][n]).reshape(-1) for n in params]).double()
    # the difference of two independent draws has std sqrt(2) * 2 z C
    assert diff.std().item() == pytest.approx(2 ** 0.5 * node_noise_std(0.05, 2.0), rel=0.05)
    # the old server-side recipe (config seed and round) and the config seed itself regenerate none of it
    for generator in (torch.Generator().manual_seed(int(np.random.default_rng([7, 0, 1]).integers(2**62))), torch.Generator().manual_seed(7)):
        guess = torch.cat([torch.randn(params[n].shape, generator=generator).reshape(-1) for n in params]).double() * node_noise_std(0.05, 2.0)
        clean = torch.cat([first["sums"][n].reshape(-1) for n in params]).double() - guess
        assert clean.std().item() > node_noise_std(0.05, 2.0)  # subtracting the guess adds noise instead of removing it


def test_accountant_epsilon_matches_a_hand_computation():
    """Gaussian mechanism, noise multiplier z, composed k times: RDP of order a is k a / (2 z^2); epsilon at delta is
    the minimum over the orders of rdp - (ln delta + ln a) / (a - 1) + ln((a - 1) / a) (Balle et al. 2020's
    conversion, Opacus' get_privacy_spent)."""
    z, k, delta = 1.5, 12, 1e-5
    accountant = UserLevelAccountant(z, delta)
    for _ in range(k):
        accountant.step([3, 4])
    accountant.step([4])
    assert accountant.max_participations() == k + 1
    orders = np.asarray(UserLevelAccountant.ORDERS, dtype=float)
    hand = np.min(k * orders / (2 * z**2) - (np.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders))
    assert accountant.epsilon(rounds=k) == pytest.approx(hand, rel=1e-9)
    assert 5.0 < hand < k / (2 * z**2) + 2 * np.sqrt(k / (2 * z**2) * np.log(1 / delta))  # below the zCDP bound
    assert accountant.epsilon() > accountant.epsilon(rounds=k)  # the worst user's k + 1 rounds
    restored = UserLevelAccountant(z, delta)
    restored.load_state_dict(accountant.state_dict())
    assert restored.epsilon() == accountant.epsilon()


def test_a_dp_run_reports_epsilon_after_every_round(settings, tmp_path):
    from recbole_ur4rec.quick_start import run_recbole_ur4rec

    result = run_recbole_ur4rec("FedDMMR", "tiny", config_dict={
        **settings, "epochs": 2, "client_fraction": 0.3, "dp_clip_norm": 0.5, "dp_noise_multiplier": 1.0, "checkpoint_dir": str(tmp_path),
    })
    privacy = result["privacy"]
    assert [r for r, _ in privacy["epsilon_per_round"]] == [0, 1] and privacy["delta"] == 1e-5
    rounds = privacy["max_rounds_per_user"]
    assert privacy["epsilon"] == pytest.approx(UserLevelAccountant(1.0, 1e-5).epsilon(rounds)) and rounds in (1, 2)


# ---- files and hooks -------------------------------------------------------------------------------------------------
def test_node_state_partitions_and_keys_are_owner_only(partitions, tmp_path):
    from recbole_ur4rec.apps.flower.loopback import write_credentials

    def mode(path):
        return stat.S_IMODE(os.stat(path).st_mode)

    store = LocalStore(str(tmp_path / "state"))
    store.save_init({"w": torch.zeros(2)})
    store.save(0, {3: {"w": torch.ones(2)}})
    assert mode(store.folder) == 0o700 and {mode(p) for p in (tmp_path / "state").iterdir()} == {0o600}
    assert mode(partitions / "node-0") == 0o700
    assert mode(partitions / "node-0" / "partition.npz") == mode(partitions / "node-0" / "node.json") == 0o600
    certs = write_credentials(tmp_path / "certs", 1)
    assert mode(certs) == 0o700 and mode(certs / "server.key") == mode(certs / "node0") == 0o600


def test_test_hooks_are_refused_without_the_test_switch(partitions, tmp_path, monkeypatch, task_identity):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from recbole_ur4rec.apps.flower import client_app
    from recbole_ur4rec.apps.flower.node_service import NodeService

    monkeypatch.delenv(TEST_HOOKS_ENV, raising=False)
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={"stall-node-of": "0,1,2,3", "stall-seconds": 1e9},
                      node_config={"partition": str(partitions / "node-0")})
    message = Message(RecordDict({"task": ConfigRecord({"clients": [0, 2]})}), dst_node_id=1, message_type="train.plain")
    with pytest.raises(PermissionError, match=r"test hook\(s\) stall-node-of, stall-seconds; .*RECBOLE_UR4REC_TEST_HOOKS=1"):
        client_app._node_train(message, context)
    with pytest.raises(PrivacyRefusal, match=r"test hooks \(fail_users\)"):  # a caller of the node service directly
        NodeService(str(partitions / "node-0"), str(tmp_path / "s")).handle({"op": "train", "fail_users": [2]}, {})


# ---- the curious server ----------------------------------------------------------------------------------------------
class CuriousServer:
    """Sends a node whatever it likes: in process (the :class:`Node` itself) or as Flower messages to the ClientApp
    (``flower``: the ClientApp's handlers on a node of its own state folder)."""

    def __init__(self, server, partitions, state, flower, node_config=None):
        self.config, self.model, self.clients = server
        self.partitions, self.state, self.flower = partitions, state, flower
        self.node_config = dict(node_config or {})
        self.settings = json.dumps({"model": "FedDMMR", "dataset": "tiny", "config_file_list": None, "config_dict": {
            k: v for k, v in self.config.final_config_dict.items() if k in ("seed", "threads", "hidden_size", "inner_size", "n_layers",
                                                                            "n_heads", "MAX_ITEM_LIST_LENGTH", "use_text", "train_batch_size",
                                                                            "eval_batch_size", "hidden_dropout_prob", "attn_dropout_prob",
                                                                            "expert_dropout", "load_col", "state", "show_progress")}})
        self.node = None if flower else Node(self.config, str(partitions / "node-0"), str(state), type(self.model),
                                             policy=NodePolicy.from_settings(self.node_config, "node config"))

    def users(self):
        """Node 0's users, those with most rows first."""
        return sorted((u for u in self.clients.clients.tolist() if self.clients.node_of[u] == 0), key=lambda u: (-self.clients.n_rows[u], u))

    def train(self, users, orders, task=TASK, secure=False):
        params = global_of(self.model)
        if not self.flower:
            return self.node.train(0, users, orders, params, [], None, task, secure)
        from flwr.app import ConfigRecord, Context, Message, RecordDict

        from recbole_ur4rec.apps.flower import client_app
        from recbole_ur4rec.federated.flower_nodes import array_record, flat_orders

        spec = ConfigRecord({"settings": self.settings, "round": 0, "clients": list(users), "rows": [self.clients.n_rows[u] for u in users],
                             "epochs": len(orders[users[0]]), "orders": flat_orders(users, orders), "local_names": [], "keep_round": -1,
                             "task": json.dumps(task)})
        message = Message(RecordDict({"task": spec, "global": array_record(params), "local_init": array_record({})}), dst_node_id=1, message_type="train.plain")
        reply = client_app._node_train(message, self.context())
        return dict(reply.content["result"])

    def evaluate(self, split="test"):
        params = global_of(self.model)
        if not self.flower:
            return self.node.evaluate(split, params, [], 0, run_key="curious")
        from flwr.app import ConfigRecord, Message, RecordDict

        from recbole_ur4rec.apps.flower import client_app
        from recbole_ur4rec.federated.flower_nodes import array_record

        spec = ConfigRecord({"settings": self.settings, "split": split, "local_names": [], "local_round": 0})
        message = Message(RecordDict({"task": spec, "global": array_record(params), "local_init": array_record({})}), dst_node_id=1, message_type="evaluate")
        return dict(client_app._node_evaluate(message, self.context()).content["result"])

    def context(self):
        from flwr.app import Context, RecordDict

        node_config = {"partition": str(self.partitions / "node-0"), "state-dir": str(self.state), **self.node_config}
        return Context(run_id=1, node_id=1, state=RecordDict(), run_config={}, node_config=node_config)


@pytest.mark.parametrize("flower", [False, True], ids=["in-process", "flower-messages"])
def test_a_curious_server_gets_nothing_per_user(server, partitions, tmp_path, task_identity, flower):
    curious = CuriousServer(server, partitions, tmp_path / "state", flower, {"max-evaluations": 2})
    users = curious.users()
    # 1. one user's update alone
    with pytest.raises(PrivacyRefusal, match="would cover 1 user"):
        curious.train(users[:1], plan(curious.clients, users[:1]))
    # 2. duplicated rows: one interaction weighted as the server likes
    five = users[:5]
    orders = plan(curious.clients, five)
    orders[five[0]] = [orders[five[0]][0] * 0]
    with pytest.raises(PrivacyRefusal, match="not a permutation"):
        curious.train(five, orders)
    # 3. per-user losses: a reply holds sums and counts only
    reply = curious.train(five, plan(curious.clients, five))
    if flower:
        assert set(reply) == {"total", "included", "excluded", "loss_sum", "loss_count"}
    else:
        partial, loss = reply
        assert set(partial) == {"sums", "total", "included", "excluded"} and loss[1] == 5
    # 4. repeated evaluations of chosen parameters: refused once the run's budget is spent
    curious.evaluate()
    curious.evaluate("valid")
    with pytest.raises(PrivacyRefusal, match="'max-evaluations'"):
        curious.evaluate()
    # 5. a plain round at a node that trains only inside SecAgg+
    strict = CuriousServer(server, partitions, tmp_path / "strict", flower, {"secagg-only": True})
    with pytest.raises(PrivacyRefusal, match=r"trains only inside SecAgg\+ \(node policy 'secagg-only'\): a plain round is refused"):
        strict.train(five, plan(curious.clients, five))
    # 6. regenerating the noise from the seed: two identical DP requests give different replies (see the noise test)
    dp = {**TASK, "dp_clip_norm": 0.05, "dp_noise_multiplier": 1.0}
    orders = plan(curious.clients, five)
    torch.manual_seed(0)
    first = curious.train(five, orders, dp)
    torch.manual_seed(0)
    second = curious.train(five, orders, dp)
    if flower:
        assert first["loss_count"] == second["loss_count"] == 0
    else:
        assert not any(torch.equal(first[0]["sums"][n], second[0]["sums"][n]) for n in first[0]["sums"] if first[0]["sums"][n].numel() > 1)


def test_secure_aggregation_refuses_two_nodes_and_values_beyond_its_clipping_range(settings, tmp_path, tmp_path_factory, monkeypatch):
    """The server refuses SecAgg+ with fewer than 3 nodes; a node refuses a round of fewer than 3 or whose values the
    clipping range would clip (SecAgg+'s dropout then fails the round's clients: nothing is clipped silently)."""
    from recbole_ur4rec.apps.flower.node_service import NodeService
    from recbole_ur4rec.federated.flower_nodes import FlowerNodes

    root = tmp_path_factory.mktemp("fed3")
    write_partitions(build("FedDMMR", "tiny", config_dict=settings, log=False), str(root), 3)
    clients = FederationClients(read_federation(str(root)))
    config, model, *_ = build_model("FedDMMR", "tiny", {**settings, "data_path": "/nonexistent", "federation_dir": str(root), "checkpoint_dir": str(tmp_path)})

    class Session:
        secagg = {"num_shares": 3, "reconstruction_threshold": 2, "clipping_range": 8.0, "quantization_range": 2**22, "timeout": None}
        settings = {"model": "FedDMMR", "dataset": "tiny", "config_file_list": None, "config_dict": {}}
        round_timeout, rounds = 10.0, []

        def nodes(self):
            return [10, 11, 12]

    flower = FlowerNodes(clients, session=Session())
    flower.node_of_partition = {0: 10, 1: 11, 2: 12}
    users = [u for u in clients.clients.tolist() if clients.node_of[u] in (0, 1)][:12]  # two nodes only
    orders = plan(clients, users)
    aggregator = FedAvg(global_of(model))
    assert flower.train_round(0, users, orders, global_of(model), [], None, TASK, aggregator) == (None, 0)
    assert aggregator.n_included == 0 and sorted(aggregator.excluded) == sorted(users)
    # the node's own checks, whatever the server's workflow
    service = NodeService(str(root / "node-0"), str(tmp_path / "n0"))
    with pytest.raises(PrivacyRefusal, match=r"this SecAgg\+ round has 2 nodes"):
        service.handle({"op": "train_secure", "config": {}, "secagg": {"clipping_range": 8.0, "nodes": 2}}, {})
    node_users = [u for u in clients.clients.tolist() if clients.node_of[u] == 0][:5]
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    fit = {f"fit/{i}": model.get_parameter(n).detach().numpy().astype(np.float64) for i, n in enumerate(names)}
    secure_config = {
        "settings": json.dumps({"model": "FedDMMR", "dataset": "tiny", "config_file_list": None, "config_dict": {**settings, "federation_dir": None}}),
        "round": 0, "epochs": 1, "local_names": [], "keep_round": -1, "task": json.dumps({**TASK, "learning_rate": 1.0}),
        "weight_scale": 1.0, "local_init": False, "clients.0": node_users, "rows.0": [clients.n_rows[u] for u in node_users],
        "orders.0": [int(i) for u in node_users for i in np.arange(clients.n_rows[u])],
    }
    with pytest.raises(PrivacyRefusal, match=r"beyond the clipping range 1e-06 .*which SecAgg\+ would clip silently: refused"):
        service.handle({"op": "train_secure", "config": secure_config, "secagg": {"clipping_range": 1e-6, "nodes": 3}}, fit)
