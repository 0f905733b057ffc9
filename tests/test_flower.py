"""FedDMMR on Flower's deployment runtime (``federated_engine: flower``): a real SuperLink and two SuperNodes on
loopback, each its own process, ``flwr run`` of the app; the aggregate equals the in-process loop engine's, and a
failing client or node is left out while the rounds complete."""
import json

import pytest
import torch

pytest.importorskip("flwr", reason="flwr is not installed: the Flower engine needs `pip install 'flwr==1.41.*'`")

from conftest import write_sequential_dataset  # noqa: E402
from model_fixtures import build_model  # noqa: E402

from recbole_ur4rec.checkpoints import load_checkpoint  # noqa: E402
from recbole_ur4rec.config import Config  # noqa: E402
from recbole_ur4rec.data import create_dataset, data_preparation  # noqa: E402
from recbole_ur4rec.data.sequence_dataset import target_list_field  # noqa: E402
from recbole_ur4rec.federated import ClientData, round_plan  # noqa: E402
from recbole_ur4rec.federated.flower.engine import FlowerEngine, FlowerSession  # noqa: E402
from recbole_ur4rec.federated.flower.local import LocalFederation  # noqa: E402
from recbole_ur4rec.quick_start import run_recbole_ur4rec  # noqa: E402
from recbole_ur4rec.trainer import FedDMMRTrainer  # noqa: E402

ROUNDS = 2


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A SuperLink and 2 SuperNodes on 127.0.0.1 (free ports); their processes end at teardown."""
    with LocalFederation(num_nodes=2, cwd=str(tmp_path_factory.mktemp("flower"))) as fed:
        yield fed


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    """Tiny walk dataset, no dropout, 2 rounds without validation (a checkpoint after every round), partial
    aggregation of the backbone from round 1, so local parameters travel too."""
    return {
        "data_path": write_sequential_dataset(tmp_path_factory.mktemp("data")),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "state": "WARNING", "show_progress": False, "seed": 7, "threads": 1,
        "epochs": ROUNDS, "eval_step": 0, "train_batch_size": 4, "eval_batch_size": 256,
        "hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1, "MAX_ITEM_LIST_LENGTH": 20,
        "use_text": False, "hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "expert_dropout": 0.0,
        "client_fraction": 0.3, "local_groups": ["backbone"], "partial_aggregation_warmup_rounds": 1,
    }


def flower_run(federation, settings, checkpoint_dir, **run_config):
    config_json = json.dumps({**settings, "checkpoint_dir": str(checkpoint_dir)})
    return federation.run({"model": "FedDMMR", "dataset": "tiny", "config-json": config_json, **run_config}, timeout=600)


def sampled_per_round(settings):
    config = Config(model="FedDMMR", dataset="tiny", config_dict=settings)
    train_data, _, _ = data_preparation(config, create_dataset(config))
    data = ClientData(train_data._dataset, target_list_field(config))
    n_rows = {c: len(r) for c, r in data.rows.items()}
    return [round_plan(config["seed"], r, data.clients, config["client_fraction"], 1, n_rows)[0] for r in range(ROUNDS)]


def test_flower_engine_outside_the_server_app_is_refused(settings):
    config, model, *_ = build_model("FedDMMR", "tiny", {**settings, "federated_engine": "flower"})
    with pytest.raises(ValueError, match="'federated_engine' is 'flower'.*flwr run"):
        FedDMMRTrainer(config, model)


def test_a_node_receives_parameters_and_row_orders_only(settings, monkeypatch):
    """What leaves the server for a node: the global parameters, the node's user ids, their row counts and row
    permutations, and training settings; no interaction (item ids, targets) of any user."""
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_run_id", "_node_id", "_task_id"):  # what the ServerApp process knows about itself
        monkeypatch.setattr(TaskIdentity, key, 1)
    config, model, train_data, _, _ = build_model("FedDMMR", "tiny", settings)
    data = ClientData(train_data._dataset, target_list_field(config))
    users = [int(u) for u in data.clients[:3]]
    _, orders = round_plan(config["seed"], 0, data.clients, 1.0, 2, {c: len(r) for c, r in data.rows.items()})
    global_params = {n: p.detach() for n, p in model.named_parameters()}
    engine = FlowerEngine(model, data, 0.5, 4, "sgd", session=FlowerSession(None, {"model": "FedDMMR"}))
    content = engine._message(5, users, orders, global_params, {}).content
    assert set(content["global"]) == set(global_params)
    assert all(tuple(content["global"][n].shape) == tuple(p.shape) for n, p in global_params.items())
    assert len(content["local"]) == 0
    task = content["task"]
    assert set(task) == {
        "settings", "clients", "rows", "epochs", "orders", "learning_rate", "batch_size", "optimizer", "local_names", "local_clients"
    }
    assert list(task["clients"]) == users and list(task["rows"]) == [len(data.rows[u]) for u in users]
    at = 0
    for user, rows in zip(users, task["rows"]):  # per user and local epoch: a permutation of 0..rows-1, no data
        for _ in range(task["epochs"]):
            assert sorted(task["orders"][at : at + rows]) == list(range(rows))
            at += rows
    assert at == len(task["orders"]) and json.loads(task["settings"]) == {"model": "FedDMMR"}


def test_a_node_replies_each_users_update_as_the_loop_engine_computes_it(settings, monkeypatch):
    """What a node sends back: per user the delta, sample count and loss that LoopEngine computes in process
    from the same global parameters and row orders, and the users' new local parameters (kept in its node state)."""
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from recbole_ur4rec.federated import FedAvg, LoopEngine
    from recbole_ur4rec.federated.flower.client_app import _node_train

    for key in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)
    config, model, train_data, _, _ = build_model("FedDMMR", "tiny", settings)
    data = ClientData(train_data._dataset, target_list_field(config))
    users = [int(u) for u in data.clients[:3]]
    _, orders = round_plan(config["seed"], 0, data.clients, 1.0, 1, {c: len(r) for c, r in data.rows.items()})
    names = [n for n, p in model.named_parameters()]
    local_names = [n for n in names if n.startswith("backbone.")]
    global_params = {n: p.detach().clone() for n, p in model.named_parameters() if n not in local_names}
    local_params = {n: model.get_parameter(n).detach().unsqueeze(0).repeat(model.n_users, *[1] * model.get_parameter(n).dim()) for n in local_names}
    session = FlowerSession(None, {"model": "FedDMMR", "dataset": "tiny", "config_file_list": None, "config_dict": settings})
    engine = FlowerEngine(model, data, 0.5, 4, "sgd", session=session)
    message = engine._message(5, users, orders, global_params, local_params)
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})

    reply = _node_train(message, context)
    got, failed, local, held = FlowerEngine._parse(reply.content, users, global_params, local_names)
    assert not failed and sorted(got) == sorted(users) and sorted(local) == sorted(users) and sorted(held) == sorted(users)
    assert all(f"local:{name}" in context.state for name in local_names), "the node keeps the users' local parameters"

    expected = FedAvg({n: p.clone() for n, p in global_params.items()})
    loop_local, loop_losses = LoopEngine(model, data, 0.5, 4, "sgd").run(users, orders, global_params, local_params, expected)
    for i, user in enumerate(users):
        deltas, count, loss = got[user]
        assert count == data.counts[user] and loss == pytest.approx(loop_losses[i], rel=1e-5)
        for name in local_names:
            assert torch.allclose(local[user][name], loop_local[user][name], atol=1e-6), name
    # the aggregate of the node's deltas equals the loop engine's aggregate
    replied = FedAvg({n: p.clone() for n, p in global_params.items()})
    for user in users:
        deltas, count, _ = got[user]
        replied.add([user], {n: d.unsqueeze(0) for n, d in deltas.items()}, [count])
    for name, value in expected.result().items():
        assert torch.allclose(replied.result()[name], value, atol=1e-6), name


def test_flower_aggregate_equals_the_in_process_loop_engine(federation, settings, tmp_path):
    flower = flower_run(federation, settings, tmp_path / "flower")
    rounds = flower["rounds"]
    assert len(rounds) == ROUNDS and all(r["nodes"] == 2 and r["included"] == r["sampled"] for r in rounds)
    assert [r["sampled"] for r in rounds] == sampled_per_round(settings)

    loop = run_recbole_ur4rec("FedDMMR", "tiny", config_dict={**settings, "federated_engine": "loop", "checkpoint_dir": str(tmp_path / "loop")})
    expected = load_checkpoint(loop["model_file"])["state_dict"]
    got = load_checkpoint(flower["result"]["model_file"])["state_dict"]
    assert got.keys() == expected.keys()
    for name, value in expected.items():  # global parameters and every user's local copies
        if value.is_floating_point():
            assert torch.allclose(got[name], value, rtol=1e-6, atol=1e-7), name
        else:
            assert torch.equal(got[name], value), name
    assert flower["result"]["test_result"] == pytest.approx(dict(loop["test_result"]))
    # round 1 trained the sampled users' own backbones: their copies moved away from the others' (the warm-up's end)
    trained, untrained = rounds[1]["sampled"][0], next(u for u in range(1, 61) if u not in rounds[1]["sampled"])
    local = [name for name in got if name.startswith("local__backbone")]
    assert bool(got["local_active"]) and local
    assert all(not torch.equal(got[name][trained], got[name][untrained]) for name in local)


def test_failing_client_and_failing_node_are_left_out_and_rounds_complete(federation, settings, tmp_path):
    first, second = sampled_per_round(settings)
    bad_client = first[0]  # its update raises on its node, in every round it is sampled
    bad_node_user = next(u for u in second if u not in first)  # its node fails as a whole in round 1
    flower = flower_run(federation, settings, tmp_path / "flower", **{"fail-clients": str(bad_client), "fail-node-of": str(bad_node_user)})
    rounds = flower["rounds"]
    assert len(rounds) == ROUNDS
    assert rounds[0]["excluded"] == [bad_client]
    # users go to the sorted SuperNodes by user id modulo 2: the failed node's users are those of bad_node_user's parity
    lost = sorted({u for u in second if u % 2 == bad_node_user % 2} | ({bad_client} & set(second)))
    assert sorted(rounds[1]["excluded"]) == lost
    for r in rounds:
        assert sorted(r["included"] + r["excluded"]) == sorted(r["sampled"]) and r["included"]
    state = load_checkpoint(flower["result"]["model_file"])["state_dict"]
    assert all(value.isfinite().all() for value in state.values() if value.is_floating_point())
    assert flower["result"]["test_result"] is not None


def test_a_node_without_a_reply_in_time_is_left_out_and_the_round_completes(federation, settings, tmp_path):
    first, second = sampled_per_round(settings)
    late_user = next(u for u in first if u not in second)  # its node stalls in round 0 only
    flower = flower_run(
        # a timeout with room for a node's ClientApp (dataset and model rebuilt every round) on a loaded 2-core machine
        federation, settings, tmp_path / "flower", **{"stall-node-of": str(late_user), "stall-seconds": 90.0, "round-timeout": 45.0}
    )
    rounds = flower["rounds"]
    assert len(rounds) == ROUNDS
    assert sorted(rounds[0]["excluded"]) == sorted(u for u in first if u % 2 == late_user % 2)
    assert rounds[0]["included"] == [u for u in first if u % 2 != late_user % 2]
    for r in rounds:
        assert sorted(r["included"] + r["excluded"]) == sorted(r["sampled"])
    assert flower["result"]["test_result"] is not None
