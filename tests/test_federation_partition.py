"""Partitioned federated data: per-node partitions, a server without interactions, personal state and evaluation
on the nodes, equal to the whole-dataset federated run."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from model_fixtures import build_model

from recbole_ur4rec.apps.partition_dataset import write_partitions
from recbole_ur4rec.build import build
from recbole_ur4rec.common.checkpoint_io import load_checkpoint
from recbole_ur4rec.federated.catalog import PartitionError
from recbole_ur4rec.federated.node import LocalStore, Node
from recbole_ur4rec.federated.privacy import NodePolicy, PrivacyRefusal
from recbole_ur4rec.model import FedDMMR
from recbole_ur4rec.quick_start import run_recbole_ur4rec


@pytest.fixture
def plain(quick_config):
    """FedDMMR without modalities or dropout on ``tiny`` (fast; the same updates in every process)."""
    return {
        **quick_config, "use_text": False, "threads": 1, "hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0,
        "train_batch_size": 4, "epochs": 4, "client_fraction": 0.3, "stopping_step": 100,
    }


def partition(settings, out, nodes=2):
    run = build("FedDMMR", "tiny", config_dict=settings, log=False)
    return run, write_partitions(run, str(out), nodes)


def test_each_node_holds_only_its_users_and_the_server_no_interaction(plain, tmp_path):
    run, federation = partition(plain, tmp_path / "fed")
    uid = run.config["USER_ID_FIELD"]
    users = {int(u) for u in run.train_data._dataset.inter_feat[uid].tolist()}
    held = []
    for k in range(2):
        meta = json.loads((tmp_path / "fed" / f"node-{k}" / "node.json").read_text())
        assert all(u % 2 == k for u in meta["users"])
        held += meta["users"]
        with np.load(tmp_path / "fed" / f"node-{k}" / "partition.npz", allow_pickle=False) as arrays:
            for split in ("train", "valid", "test"):
                assert set(arrays[f"{split}.{uid}"].tolist()) <= set(meta["users"])
            # the node's training rows are exactly the whole-dataset rows of its users
            expected = run.train_data._dataset.inter_feat
            mask = np.isin(expected[uid].numpy(), meta["users"])
            assert np.array_equal(arrays["train.item_id_list"], expected["item_id_list"].numpy()[mask])
    assert sorted(held) == sorted(users)
    # the server's folder holds no interaction: client ids, nodes, counts and row numbers only
    assert sorted(os.listdir(tmp_path / "fed" / "server")) == ["federation.json"]
    assert {c for c, _, _, _ in federation["clients"]} == users
    assert set(federation) == {"format", "dataset", "nodes", "n_items", "n_users", "clients", "cold_items"}


def test_partitioned_run_equals_the_whole_dataset_run_and_the_server_reads_no_interaction(plain, tmp_path, monkeypatch):
    settings = {**plain, "local_groups": ["router", "gate"], "partial_aggregation_warmup_rounds": 2}
    central = run_recbole_ur4rec("FedDMMR", "tiny", config_dict={**settings, "checkpoint_dir": str(tmp_path / "central")})
    partition(settings, tmp_path / "fed")
    shutil.rmtree(plain["data_path"])  # from here on no process can read the dataset's interaction file
    opened = []
    real_open = open

    def watch(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", watch)
    server = {**settings, "federation_dir": str(tmp_path / "fed"), "checkpoint_dir": str(tmp_path / "server"),
              "node_state_dir": str(tmp_path / "nodes")}
    federated = run_recbole_ur4rec("FedDMMR", "tiny", config_dict=server)
    assert not any(p.endswith(".inter") for p in opened)
    # the same global parameters, and the same metrics from the nodes' sums as from RecBole's evaluation
    overall = [key for key in central["test_result"] if "/" not in key]  # node-side evaluation reports no slices
    assert set(federated["test_result"]) == set(overall) and len(overall) == 9
    # (the nodes sum their clients' updates, the server the nodes' sums: float rounding apart, the same aggregate)
    assert federated["best_valid_result"] == pytest.approx({key: central["best_valid_result"][key] for key in overall}, abs=2e-4)
    assert federated["test_result"] == pytest.approx({key: central["test_result"][key] for key in overall}, abs=2e-4)
    a, b = load_checkpoint(central["model_file"]), load_checkpoint(federated["model_file"])
    assert a["epoch"] == b["epoch"]
    for name, value in b["state_dict"].items():
        assert torch.allclose(value.float(), a["state_dict"][name].float(), rtol=1e-4, atol=1e-6), name
    # the server's checkpoint holds the global parameters only: no user's local copy
    assert not any(name.startswith("local__") for name in b["state_dict"])
    assert any(name.startswith("local__") for name in a["state_dict"])
    # the users' local parameters are on the nodes, one version per round they trained in
    assert os.listdir(tmp_path / "nodes" / "node-0") and os.listdir(tmp_path / "nodes" / "node-1")


def test_node_state_survives_a_restart_and_a_missing_state_fails_clearly(plain, tmp_path, caplog):
    settings = {**plain, "local_groups": ["backbone"], "partial_aggregation_warmup_rounds": 0}
    run, _ = partition(settings, tmp_path / "fed")
    config = run.config
    policy = NodePolicy(min_users=3)
    node = Node(config, str(tmp_path / "fed" / "node-0"), str(tmp_path / "state"), FedDMMR, policy=policy)
    local = list(node.model.local_names)
    users = node.partition.users[:3]
    orders = {u: [torch.arange(len(node.clients.rows[u]))] for u in users}
    params = {n: p.detach().clone() for n, p in node.model.named_parameters() if n not in local}
    init = {n: p.detach().clone() for n, p in node.model.named_parameters() if n in local}
    task = {"learning_rate": 0.01, "batch_size": 4, "optimizer": "adam"}
    partial, (_, count) = node.train(0, users, orders, params, local, init, task)
    assert partial["included"] == count == len(users) and partial["excluded"] == 0
    # the node replies one weighted sum of its clients' updates, of the global parameters only
    assert set(partial["sums"]) == set(params) and partial["total"] == sum(node.clients.counts[u] for u in users)
    restarted = Node(config, str(tmp_path / "fed" / "node-0"), str(tmp_path / "state"), FedDMMR, policy=policy)  # a new process, same folder
    before = node.store.load(users, local, 0)
    after_restart = restarted.store.load(users, local, 0)
    assert all(torch.equal(after_restart[n], before[n]) for n in local)
    assert any(not torch.equal(before[n][0], init[n]) for n in local), "training moved the users' local parameters"
    assert not torch.equal(before[local[0]][0], before[local[0]][1]), "each user has its own copy"
    fresh = Node(config, str(tmp_path / "fed" / "node-0"), str(tmp_path / "lost"), FedDMMR, policy=policy)
    with pytest.raises(PrivacyRefusal, match=r"after 3 failed client\(s\)\) would cover 0 user\(s\)"):  # the reason: in its log
        fresh.train(1, users, orders, params, local, None, task)
    assert "was the node state lost?" in caplog.text
    # a user this node does not hold
    stranger = next(u for u in range(1, 60) if u not in node.partition.users)
    with pytest.raises(PartitionError, match=rf"node 0 .* does not hold users \[{stranger}\]: the server assigned them to the wrong node"):
        node.train(1, [stranger], {stranger: [torch.arange(3)]}, params, [], None, task)


def test_local_store_prunes_what_no_round_needs(tmp_path):
    store = LocalStore(str(tmp_path))
    store.save_init({"w": torch.zeros(2)})
    for r in range(4):
        store.save(r, {1: {"w": torch.full((2,), float(r))}, 2: {"w": torch.full((2,), 10.0 + r)}} if r % 2 == 0 else {1: {"w": torch.full((2,), float(r))}})
    store.prune(keep_round=2)  # user 1 keeps rounds 2 and 3, user 2 round 2
    assert sorted(os.listdir(tmp_path)) == ["init.npz", "local-2.npz", "local-3.npz"]
    got = store.load([1, 2, 3], ["w"], 2)["w"]
    assert got.tolist() == [[2.0, 2.0], [12.0, 12.0], [0.0, 0.0]]
    assert LocalStore(str(tmp_path)).load([1], ["w"], 3)["w"].tolist() == [[3.0, 3.0]]


def test_a_wrong_partition_is_named(plain, tmp_path):
    run, _ = partition(plain, tmp_path / "fed")
    os.remove(tmp_path / "fed" / "node-1" / "partition.npz")
    with pytest.raises(PartitionError, match=r"node-1/partition.npz is missing"):
        Node(run.config, str(tmp_path / "fed" / "node-1"), str(tmp_path / "s"), FedDMMR)
    with pytest.raises(PartitionError, match=r"server/federation.json is missing"):
        build_model("FedDMMR", "tiny", {**plain, "federation_dir": str(tmp_path / "nowhere")})


def test_node_side_evaluation_equals_recboles_evaluation_of_the_same_parameters(plain, tmp_path):
    from recbole_ur4rec.federated.catalog import FederationClients, read_federation
    from recbole_ur4rec.federated.node import LocalNodes, merge_metric_sums
    from recbole_ur4rec.trainer import FedDMMRTrainer

    settings = {**plain, "local_groups": ["backbone"], "partial_aggregation_warmup_rounds": 0}
    run, _ = partition(settings, tmp_path / "fed")
    model = run.model
    with torch.no_grad():  # personal parameters: every user's own copy differs
        model.local_active.fill_(True)
        for name in model.local_names:
            buffer = getattr(model, model.local_buffer(name))
            buffer.add_(torch.randn(buffer.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    trainer = FedDMMRTrainer(run.config, model)
    federation = FederationClients(read_federation(str(tmp_path / "fed")))
    nodes = LocalNodes(run.config, federation, str(tmp_path / "state"), FedDMMR, root=str(tmp_path / "fed"))
    local = list(model.local_names)
    for node in nodes.nodes:  # each node holds its users' copies, as training would have left them
        node.store.save_init({n: model.get_parameter(n).detach() for n in local})
        node.store.save(0, {u: {n: getattr(model, model.local_buffer(n))[u] for n in local} for u in node.partition.users})
    global_params = {n: p.detach().clone() for n, p in model.named_parameters() if n not in local}
    for split, data in (("valid", run.valid_data), ("test", run.test_data)):
        expected = trainer.evaluate(data, load_best_model=False)
        got = merge_metric_sums(nodes.evaluate(split, global_params, local, 0), run.config["metric_decimal_place"])
        assert got == {key: value for key, value in expected.items() if "/" not in key}, split


class Interrupted(Exception):
    pass


def test_a_partitioned_run_resumes_on_the_server_and_the_nodes(plain, tmp_path):
    settings = {**plain, "epochs": 5, "local_groups": ["backbone"], "partial_aggregation_warmup_rounds": 1, "hidden_dropout_prob": 0.0}
    partition(settings, tmp_path / "fed")
    server = {**settings, "federation_dir": str(tmp_path / "fed"), "data_path": "/nonexistent"}
    uninterrupted = run_recbole_ur4rec("FedDMMR", "tiny", config_dict={**server, "checkpoint_dir": str(tmp_path / "a"), "node_state_dir": str(tmp_path / "na")})

    def stop_after_round_2(epoch_idx, valid_score):
        if epoch_idx == 2:
            raise Interrupted

    interrupted = {**server, "checkpoint_dir": str(tmp_path / "b"), "node_state_dir": str(tmp_path / "nb")}
    with pytest.raises(Interrupted):
        run_recbole_ur4rec("FedDMMR", "tiny", config_dict=interrupted, callback_fn=stop_after_round_2)
    (last_file,) = [f for f in os.listdir(tmp_path / "b") if f.endswith("-last.pth")]
    state = load_checkpoint(tmp_path / "b" / last_file)
    assert state["epoch"] == 2 and not any(name.startswith("local__") for name in state["state_dict"])
    resumed = run_recbole_ur4rec(resume_file=str(tmp_path / "b" / last_file))  # the nodes kept their state folders
    assert resumed["best_valid_result"] == uninterrupted["best_valid_result"]
    assert resumed["test_result"] == uninterrupted["test_result"]
