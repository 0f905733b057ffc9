"""FedDMMR and its federated trainer: fusion, masks, FedAvg, sampling, partial aggregation, engines, failures, DP,
resume and learning a tiny dataset."""
import copy
import math
import os

import numpy as np
import pytest
import torch
from model_fixtures import (
    assert_best_file_holds,
    assert_user_values_are_the_results,
    build_model,
    changed_groups,
    count_checkpoint_reads,
    snapshot,
)
from ur4rec_fixtures import NO_TEXT_ITEM, item_token, write_genre_dataset, write_image_features

from recbole_ur4rec.common.checkpoint_io import load_checkpoint
from recbole_ur4rec.federated import FedAvg, LoopEngine, ServerOptimizer, round_plan
from recbole_ur4rec.federated.privacy import node_noise_std
from recbole_ur4rec.model import FedDMMR
from recbole_ur4rec.model.layers import SampledCandidates
from recbole_ur4rec.quick_start import run_recbole_ur4rec
from recbole_ur4rec.registry import get_model, get_trainer
from recbole_ur4rec.trainer import FedDMMRTrainer


@pytest.fixture(scope="module")
def genre_root(tmp_path_factory):
    return write_genre_dataset(tmp_path_factory.mktemp("data"), n_users=60, n_items=120)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # item texts are encoded once per module


def text_settings(genre_root, cache_dir, tmp_path, **overrides):
    return {
        "data_path": genre_root,
        "feature_cache_dir": str(cache_dir),
        "checkpoint_dir": str(tmp_path / "saved"),
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
        "item_text_template": "{movie_title} ({release_year}). Genres: {class:, }.",
        "show_progress": False,
        "state": "WARNING",
        "seed": 3,
        "threads": 1,
        "hidden_size": 16,
        "inner_size": 32,
        "n_layers": 1,
        "n_heads": 1,
        "expert_dim": 16,
        "MAX_ITEM_LIST_LENGTH": 20,
        "hidden_dropout_prob": 0.0,
        "attn_dropout_prob": 0.0,
        "expert_dropout": 0.0,
        "train_batch_size": 4,
        **overrides,
    }


def build(settings, dataset="genre", **overrides):
    return build_model("FedDMMR", dataset, {**settings, **overrides})


@pytest.fixture
def plain(quick_config):
    """Settings for the ``tiny`` walk dataset without any modality (fast: no encoder)."""
    return {**quick_config, "use_text": False, "threads": 1, "hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "train_batch_size": 4}


def test_registered_with_its_trainer():
    assert get_model("FedDMMR") is FedDMMR
    assert get_trainer(FedDMMR.type, "FedDMMR") is FedDMMRTrainer


@pytest.mark.parametrize("fusion", ["residual", "competitive"])
def test_fusion_loss_is_finite_and_missing_text_is_masked(genre_root, cache_dir, tmp_path, fusion):
    config, model, train_data, _, _ = build(text_settings(genre_root, cache_dir, tmp_path), fusion=fusion)
    assert model.modalities == ["semantic"]
    batch = next(iter(train_data))
    loss = model.calculate_loss(batch)
    assert math.isfinite(loss.item())
    loss.backward()
    assert model.experts["semantic"].query.weight.grad.abs().sum() > 0

    no_text = train_data._dataset.field2token_id["item_id"][item_token(NO_TEXT_ITEM)]
    model.eval()
    with torch.no_grad():
        states = torch.randn(5, config["hidden_size"])
        semantic = model.experts["semantic"](states)
        assert torch.all(semantic[:, no_text] == 0) and torch.all(semantic[:, 0] == 0)
        fused, weights, backbone = model.fuse(states)
        assert weights.shape == (5, 1 if fusion == "residual" else 2)
        if fusion == "residual":  # the item without text gets the backbone score only
            assert torch.equal(fused[:, no_text], backbone[:, no_text])
        scores = model.full_sort_predict(next(iter(train_data)))
        assert scores.shape[1] == model.n_items


@pytest.mark.parametrize("fusion", ["residual", "competitive"])
def test_sampled_softmax_scores_candidates_as_the_full_scores_do(genre_root, cache_dir, tmp_path, fusion):
    """SSM encodes only the batch's targets and negatives; their fused scores equal those of the full scoring."""
    config, model, train_data, _, _ = build(text_settings(genre_root, cache_dir, tmp_path), fusion=fusion, loss_type="SSM", neg_sample_num=7)
    model.eval()
    states = torch.randn(6, config["hidden_size"])
    targets = torch.tensor([3, 5, 5, 9, 3, 11])
    negatives = torch.tensor([5, 2, 40, 2, 17, 9, 60])
    with torch.no_grad():
        candidates = SampledCandidates(targets, model.n_items, len(negatives), negatives=negatives)
        assert torch.equal(candidates.items, torch.unique(torch.cat([targets, negatives])))
        logits, weights = model.sampled_logits(states, targets, candidates)
        full, full_weights, _ = model.fuse(states)
    assert logits.shape == (6, 8) and torch.equal(weights, full_weights)
    assert torch.allclose(logits[:, 0], full.gather(1, targets.unsqueeze(1)).squeeze(1), atol=1e-6)
    clash = negatives.unsqueeze(0) == targets.unsqueeze(1)  # a negative equal to the target is left out
    assert torch.all(logits[:, 1:][clash] == float("-inf"))
    assert torch.allclose(logits[:, 1:][~clash], full[:, negatives][~clash], atol=1e-6)

    model.train()
    batch = next(iter(train_data))
    loss = model.calculate_loss(batch)
    assert math.isfinite(loss.item())
    loss.backward()
    assert model.experts["semantic"].query.weight.grad.abs().sum() > 0
    trainer = FedDMMRTrainer(config, model)  # a federated round on the loop engine
    trainer.run_round(train_data, 0)
    assert trainer.last_round["included"] == len(trainer.last_round["sampled"])
    assert all(p.isfinite().all() for p in model.parameters())


def test_sampled_softmax_is_refused_by_the_batched_engine_and_checked(genre_root, cache_dir, tmp_path):
    settings = text_settings(genre_root, cache_dir, tmp_path)
    config, model, train_data, _, _ = build(settings, loss_type="SSM", federated_engine="batched")
    with pytest.raises(ValueError, match="federated_engine 'batched' needs loss_type CE"):
        FedDMMRTrainer(config, model).run_round(train_data, 0)
    with pytest.raises(ValueError, match="loss_type"):
        build(settings, loss_type="BPR")
    with pytest.raises(ValueError, match="neg_sample_num"):
        build(settings, loss_type="SSM", neg_sample_num=0)


@pytest.mark.parametrize("use_text", [True, False])
def test_visual_expert_trains_and_items_without_an_image_are_masked(genre_root, cache_dir, tmp_path, use_text):
    path, no_image_token = write_image_features(genre_root, tmp_path / "clip.pt")
    settings = text_settings(genre_root, cache_dir, tmp_path, use_image=True, use_text=use_text, image_feature_file=path)
    config, model, train_data, _, _ = build(settings, client_fraction=0.5)
    assert sorted(model.modalities) == (["semantic", "visual"] if use_text else ["visual"])
    batch = next(iter(train_data))
    loss = model.calculate_loss(batch)
    assert math.isfinite(loss.item())
    loss.backward()
    assert model.experts["visual"].query.weight.grad.abs().sum() > 0
    no_image = train_data._dataset.field2token_id["item_id"][no_image_token]
    with torch.no_grad():
        visual = model.experts["visual"](torch.randn(5, config["hidden_size"]))
    assert torch.all(visual[:, no_image] == 0) and torch.all(visual[:, 0] == 0) and visual[:, 1:].abs().sum() > 0
    model.zero_grad()
    trainer = FedDMMRTrainer(config, model)  # a federated round with the visual expert
    trainer.run_round(train_data, 0)
    assert trainer.last_round["included"] == len(trainer.last_round["sampled"])
    assert all(p.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("fusion", ["residual", "competitive"])
def test_without_modalities_scores_are_the_backbones(plain, fusion):
    _, model, train_data, _, _ = build(plain, dataset="tiny", fusion=fusion, gating_init=0.7)
    assert model.modalities == [] and len(model.experts) == 0
    model.eval()
    batch = next(iter(train_data))
    with torch.no_grad():
        hidden = model.backbone(batch["item_id_list"], batch["item_length"])
        last = model.backbone.gather_last(hidden, batch["item_length"])
        expected = last @ model.backbone.item_embedding.weight.t()
        assert torch.equal(model.full_sort_predict(batch), expected)
    assert math.isfinite(model.calculate_loss(batch).item())


def test_fedavg_weights_updates_by_sample_counts_and_leaves_out_non_finite():
    theta = {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor(0.0)}
    aggregator = FedAvg(theta)
    left_out = aggregator.add(
        [4, 7, 9],
        {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0], [float("nan"), 0.0]]), "b": torch.tensor([1.0, -1.0, 5.0])},
        [1, 3, 100],
    )
    assert left_out == [9] and aggregator.included == [4, 7]
    new = aggregator.result()
    # theta + (1 * delta_4 + 3 * delta_7) / 4
    assert torch.allclose(new["w"], torch.tensor([1 + (1 + 9) / 4, 1 + (2 + 12) / 4]))
    assert torch.allclose(new["b"], torch.tensor((1 - 3) / 4))


def test_dp_clipping_bounds_each_update_and_noise_follows_the_formula():
    theta = {"w": torch.zeros(3)}
    clipped = FedAvg(theta, clip_norm=0.5)
    clipped.add([0, 1], {"w": torch.tensor([[3.0, 4.0, 0.0], [0.1, 0.0, 0.0]])}, [1, 1])
    new = clipped.result()["w"]
    assert torch.allclose(new, (torch.tensor([0.3, 0.4, 0.0]) + torch.tensor([0.1, 0.0, 0.0])) / 2)
    # DP: weight 1 per client, a node's noise std 2 z C (replace-one sensitivity), divided by the public count
    noisy = FedAvg({"w": torch.zeros(20000)}, clip_norm=0.5, uniform=True)
    noisy.add([0, 1], {"w": torch.zeros(2, 20000)}, [1, 3])
    assert noisy.total == 2 and noisy.n_included == 2
    noisy.add_noise(node_noise_std(0.5, 2.0))
    assert noisy.result(denominator=4)["w"].std().item() == pytest.approx(2 * 2.0 * 0.5 / 4, rel=0.03)


def test_server_optimizers_match_a_hand_computation():
    theta = {"w": torch.tensor([1.0, -2.0])}
    rounds = [torch.tensor([0.5, 0.0]), torch.tensor([-0.25, 1.0])]  # FedAvg's mean update of two rounds
    plain = ServerOptimizer("fedavg", lr=0.5)
    assert torch.allclose(plain.step(theta, {"w": theta["w"] + rounds[0]})["w"], torch.tensor([1.25, -2.0]))
    momentum, adam = ServerOptimizer("fedavgm", lr=1.0, momentum=0.5), ServerOptimizer("fedadam", lr=0.1, momentum=0.9, tau=0.01)
    t_m, t_a = dict(theta), dict(theta)
    for delta in rounds:
        t_m = momentum.step(t_m, {"w": t_m["w"] + delta})
        t_a = adam.step(t_a, {"w": t_a["w"] + delta})
    v = 0.5 * rounds[0] + rounds[1]  # momentum buffer after round 2
    assert torch.allclose(t_m["w"], theta["w"] + rounds[0] + v)
    m1, v1 = 0.1 * rounds[0], 0.01 * rounds[0] ** 2
    m2, v2 = 0.9 * m1 + 0.1 * rounds[1], 0.99 * v1 + 0.01 * rounds[1] ** 2
    expected = theta["w"] + 0.1 * m1 / (v1.sqrt() + 0.01) + 0.1 * m2 / (v2.sqrt() + 0.01)
    assert torch.allclose(t_a["w"], expected)
    restored = ServerOptimizer("fedadam", lr=0.1, momentum=0.9, tau=0.01)
    restored.load_state_dict(adam.state_dict())
    nxt = {"w": t_a["w"] + 1.0}
    assert torch.equal(restored.step(t_a, nxt)["w"], adam.step(t_a, nxt)["w"])
    with pytest.raises(ValueError, match="server_optimizer.*fedavg, fedavgm, fedadam"):
        ServerOptimizer("sgd")


def test_client_sampling_fraction_and_seeding():
    clients = np.arange(1, 101)
    n_rows = {c: 2 for c in clients}
    sampled, orders = round_plan(7, 0, clients, 0.2, 3, n_rows)
    assert len(sampled) == 20 and len(set(sampled)) == 20 and set(orders) == set(sampled)
    assert all(len(orders[c]) == 3 for c in sampled)
    assert round_plan(7, 0, clients, 0.2, 3, n_rows)[0] == sampled
    assert round_plan(7, 1, clients, 0.2, 3, n_rows)[0] != sampled
    assert round_plan(8, 0, clients, 0.2, 3, n_rows)[0] != sampled
    assert len(round_plan(7, 0, clients, 0.001, 1, n_rows)[0]) == 1


def make_trainer(config, model):
    trainer = FedDMMRTrainer(config, model)
    return trainer


def test_round_aggregate_is_fedavg_of_the_clients_own_updates(plain):
    config, model, train_data, _, _ = build(
        plain, dataset="tiny", client_fraction=0.1, federated_engine="loop", server_optimizer="fedavg", server_learning_rate=1.0
    )
    trainer = make_trainer(config, model)
    before = snapshot(model)
    trainer.run_round(train_data, 0)
    sampled = trainer.last_round["sampled"]
    assert trainer.last_round["included"] == len(sampled)
    data = trainer.clients
    # each client's raw rows are only its own: the rows of a client all belong to that user
    users = data.interaction["user_id"]
    assert all(torch.all(users[data.rows[c]] == c) for c in sampled)
    # by hand: train every sampled client alone from the same start, then average by sample counts
    engine = LoopEngine(model, data, trainer.local_learning_rate, config["train_batch_size"], trainer.local_optimizer)
    _, orders = round_plan(config["seed"], 0, data.clients, 0.1, 1, {c: len(r) for c, r in data.rows.items()})
    counts = torch.tensor([data.counts[c] for c in sampled], dtype=torch.float64)
    expected = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in before.items()}
    for client, count in zip(sampled, counts):
        single = FedAvg(before)
        engine.run([client], orders, before, {}, single)
        for n, value in single.result().items():
            expected[n] += count / counts.sum() * value.double()
    for n, p in model.named_parameters():
        assert torch.allclose(p.double(), expected[n], atol=1e-6), n


@pytest.mark.parametrize("local", [{"local_optimizer": "adam", "local_learning_rate": 0.002}, {"local_optimizer": "sgd", "local_learning_rate": 0.5}])
def test_batched_engine_equals_the_loop(genre_root, cache_dir, tmp_path, local):
    settings = text_settings(
        genre_root, cache_dir, tmp_path, client_fraction=0.5, local_epochs=2, client_batch_size=7,
        local_groups=["router", "gate"], partial_aggregation_warmup_rounds=1, fusion="competitive", **local,
        server_optimizer="fedavg", server_learning_rate=1.0,  # the aggregate itself (fedadam divides float noise by ~0)
    )
    config, model, train_data, _, _ = build(settings)
    assert model.local_names == ["router.linear.weight", "router.linear.bias", "gate"]
    results = {}
    for engine in ("loop", "batched"):
        cfg = copy.deepcopy(config)
        cfg["federated_engine"] = engine
        m = copy.deepcopy(model)
        trainer = FedDMMRTrainer(cfg, m)
        for round_idx in range(2):
            trainer.run_round(train_data, round_idx)
        results[engine] = {**snapshot(m), **{n: b.clone() for n, b in m.named_buffers() if n.startswith("local__")}}
    assert results["loop"].keys() == results["batched"].keys()
    for name, value in results["loop"].items():
        assert torch.allclose(value, results["batched"][name], atol=2e-5, rtol=1e-4), name
    assert not torch.equal(results["loop"]["local__router__linear__weight"], model.local__router__linear__weight)


def test_partial_aggregation_keeps_local_groups_local_after_warmup(genre_root, cache_dir, tmp_path):
    settings = text_settings(
        genre_root, cache_dir, tmp_path, client_fraction=0.3, local_groups=["gate", "router"],
        partial_aggregation_warmup_rounds=1, learning_rate=0.01,
    )
    config, model, train_data, _, _ = build(settings)
    trainer = FedDMMRTrainer(config, model)
    gate_0 = model.gate.item()
    trainer.run_round(train_data, 0)  # warm-up: the gate is aggregated
    assert not bool(model.local_active) and trainer.last_round["local"] == []
    gate_1 = model.gate.item()
    assert gate_1 != gate_0
    trainer.run_round(train_data, 1)  # after the warm-up: it stays on the clients
    assert bool(model.local_active) and model.gate.item() == gate_1
    sampled = trainer.last_round["sampled"]
    others = [u for u in range(1, model.n_users) if u not in sampled]
    assert all(float(model.local__gate[u]) != gate_1 for u in sampled)
    assert all(float(model.local__gate[u]) == gate_1 for u in others)  # not sampled yet: the value at warm-up end
    # evaluation is personal: user u's scores are the model's with u's own gate and router
    model.eval()
    batch = next(iter(train_data))
    scores = model.full_sort_predict(batch)
    user = int(batch["user_id"][0])
    personal = copy.deepcopy(model)
    personal.local_active.fill_(False)
    with torch.no_grad():
        for name in model.local_names:
            personal.get_parameter(name).copy_(getattr(model, model.local_buffer(name))[user])
    assert torch.allclose(scores[0], personal.full_sort_predict(batch)[0], atol=1e-5)


def test_failing_client_is_left_out_and_the_round_completes(plain):
    config, model, train_data, _, _ = build(plain, dataset="tiny", client_fraction=0.5, client_batch_size=8)
    trainer = FedDMMRTrainer(config, model)
    trainer._setup(train_data)
    sampled, _ = round_plan(config["seed"], 0, trainer.clients.clients, 0.5, 1, {c: len(r) for c, r in trainer.clients.rows.items()})
    bad = sampled[3]
    trainer.clients.targets[trainer.clients.rows[bad][0], 0] = model.n_items + 5  # this client's update raises
    trainer.run_round(train_data, 0)
    assert trainer.last_round["excluded_known"] == [bad] and trainer.last_round["excluded"] == 1
    assert trainer.last_round["included"] == len(sampled) - 1
    assert all(p.isfinite().all() for p in model.parameters())


def test_a_round_without_enough_clients_fails_visibly_and_stops_the_run(plain, caplog):
    config, model, train_data, _, _ = build(
        plain, dataset="tiny", client_fraction=0.5, server_optimizer="fedavgm", min_round_clients=2, max_failed_rounds=2
    )
    trainer = FedDMMRTrainer(config, model)
    trainer._setup(train_data)
    n_rows = {c: len(r) for c, r in trainer.clients.rows.items()}
    targets = trainer.clients.targets.clone()
    trainer.clients.targets[:, 0] = model.n_items + 5  # every client's update raises
    before, momentum = snapshot(model), trainer.server_optimizer.state_dict()
    trainer.run_round(train_data, 0)
    assert trainer.last_round["failed"] and trainer.failed_rounds == 1 and trainer.last_round["included"] == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "a failed round leaves the model as it was"
    assert trainer.server_optimizer.state_dict() == momentum
    assert "round 0 failed: 0 of" in caplog.text and "'max_failed_rounds' = 2" in caplog.text
    # a round that succeeds resets the count
    trainer.clients.targets.copy_(targets)
    trainer.run_round(train_data, 1)
    assert not trainer.last_round["failed"] and trainer.failed_rounds == 0
    # fewer clients aggregated than min_round_clients is a failed round too (here one of the sampled clients is left)
    sampled, _ = round_plan(config["seed"], 2, trainer.clients.clients, 0.5, 1, n_rows)
    for client in sampled[1:]:
        trainer.clients.targets[trainer.clients.rows[client], 0] = model.n_items + 5
    trainer.run_round(train_data, 2)
    assert trainer.last_round["failed"] and trainer.last_round["included"] == 1 and trainer.failed_rounds == 1
    # max_failed_rounds failed rounds in a row stop the run with the reason
    trainer.clients.targets[:, 0] = model.n_items + 5
    with pytest.raises(RuntimeError, match=r"federated training stopped: round 3 failed: 0 of \d+ sampled clients aggregated"):
        trainer.run_round(train_data, 3)


def test_failed_rounds_stop_a_whole_run_and_resume_with_their_count(plain, tmp_path, monkeypatch):
    settings = {**plain, "epochs": 6, "client_fraction": 0.3, "max_failed_rounds": 2, "checkpoint_dir": str(tmp_path)}
    run_round = FedDMMRTrainer.run_round

    def broken_from_round_2(self, train_data, round_idx):
        if round_idx >= 2:
            self.clients.targets[:, 0] = self.model.n_items + 5
        return run_round(self, train_data, round_idx)

    monkeypatch.setattr(FedDMMRTrainer, "run_round", broken_from_round_2)
    with pytest.raises(RuntimeError, match=r"round 3 failed"):
        run_recbole_ur4rec("FedDMMR", "tiny", config_dict=settings)
    (last_file,) = [f for f in os.listdir(tmp_path) if f.endswith("-last.pth")]
    assert load_checkpoint(tmp_path / last_file)["failed_rounds"] == 1  # round 2 failed; saved after it


def test_dp_clipping_bounds_the_round_update(plain):
    # the bound holds for the FedAvg aggregate, applied as it is (server_optimizer fedavg at 1.0)
    config, model, train_data, _, _ = build(
        plain, dataset="tiny", dp_clip_norm=0.01, local_learning_rate=0.05, server_optimizer="fedavg", server_learning_rate=1.0
    )
    trainer = FedDMMRTrainer(config, model)
    before = snapshot(model)
    trainer.run_round(train_data, 0)
    norm = torch.sqrt(sum((p.detach() - before[n]).pow(2).sum() for n, p in model.named_parameters()))
    assert 0 < float(norm) <= 0.01 + 1e-6


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("server", [{}, {"server_optimizer": "fedadam", "server_learning_rate": 0.01}])
def test_resume_after_interruption_matches_uninterrupted_run(plain, tmp_path, server, monkeypatch):
    settings = {
        **plain, "epochs": 5, "stopping_step": 100, "client_fraction": 0.3, "local_groups": ["backbone"],
        "partial_aggregation_warmup_rounds": 2, "hidden_dropout_prob": 0.1, **server,
    }
    uninterrupted = run_recbole_ur4rec("FedDMMR", "tiny", config_dict={**settings, "checkpoint_dir": str(tmp_path / "a")})

    def stop_after_round_2(epoch_idx, valid_score):
        if epoch_idx == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_recbole_ur4rec("FedDMMR", "tiny", config_dict={**settings, "checkpoint_dir": str(tmp_path / "b")}, callback_fn=stop_after_round_2)
    (last_file,) = [f for f in os.listdir(tmp_path / "b") if f.endswith("-last.pth")]
    state = load_checkpoint(tmp_path / "b" / last_file)
    assert state["epoch"] == 2 and bool(state["state_dict"]["local_active"])
    epochs_run, reads = [], count_checkpoint_reads(monkeypatch)
    resumed = run_recbole_ur4rec(resume_file=str(tmp_path / "b" / last_file), callback_fn=lambda e, s: epochs_run.append(e))
    assert epochs_run == [3, 4]
    assert reads.count(str(tmp_path / "b" / last_file)) == 1, "the resume state is read once"
    assert resumed["test_result"] == uninterrupted["test_result"]
    assert resumed["best_valid_result"] == uninterrupted["best_valid_result"]
    for run in (uninterrupted, resumed):
        assert_best_file_holds(run, uninterrupted)


def test_federated_feddmmr_learns_the_tiny_dataset(plain):
    settings = {**plain, "epochs": 25, "client_fraction": 0.5, "learning_rate": 0.01, "hidden_size": 32, "inner_size": 64}
    result = run_recbole_ur4rec("FedDMMR", "tiny", config_dict=settings, keep_user_values=True)
    assert_user_values_are_the_results(result)
    # 40 items, each followed by the next: random ranking gives NDCG@10 about 0.07
    print(result["test_result"])
    assert result["test_result"]["ndcg@10"] > 0.5


def test_partial_aggregation_from_its_flag_alone_keeps_the_multimodal_groups_local(genre_root, cache_dir, tmp_path):
    """partial_aggregation_warmup_rounds without local_groups is never inert: the experts, the router and the gate
    (the groups that have parameters) stay on the clients after the warm-up, and the other groups are aggregated."""
    settings = text_settings(genre_root, cache_dir, tmp_path, client_fraction=0.3, partial_aggregation_warmup_rounds=1,
                             learning_rate=0.01, fusion="competitive")
    config, model, train_data, _, _ = build(settings)
    assert config["local_groups"] == [] and model.local_groups == ["experts", "router", "gate"]
    trainer = FedDMMRTrainer(config, model)
    trainer.run_round(train_data, 0)  # the warm-up round aggregates everything
    assert trainer.last_round["local"] == []
    before = snapshot(model)
    trainer.run_round(train_data, 1)
    assert bool(model.local_active) and sorted(trainer.last_round["local"]) == sorted(model.local_names)
    moved = changed_groups(model, before)
    assert "backbone" in moved and not moved & {"experts", "router", "gate"}  # the global copies of local groups stay
    sampled = trainer.last_round["sampled"]  # competitive fusion routes with the router (the gate is unused there)
    assert all(not torch.equal(model.local__router__linear__weight[u], model.router.linear.weight) for u in sampled)
    # no warm-up and no local_groups: nothing is local
    _, plain_model, _, _, _ = build({**settings, "partial_aggregation_warmup_rounds": 0})
    assert plain_model.local_groups == []
