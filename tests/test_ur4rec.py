"""UR4Rec and its staged trainer: losses, masks, what each stage trains, alternation, resume, learning from text."""
import math
import os
import re
import shutil

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
from ur4rec_fixtures import NO_TEXT_ITEM, item_token, ur4rec_config, write_genre_dataset, write_image_features

from recbole_ur4rec.common.checkpoint_io import load_checkpoint
from recbole_ur4rec.model import UR4Rec
from recbole_ur4rec.model.layers import SampledCandidates, ranking_loss, supervised_positions, view_info_nce
from recbole_ur4rec.quick_start import load_data_and_model, run_recbole_ur4rec
from recbole_ur4rec.registry import get_model, get_trainer
from recbole_ur4rec.trainer import UR4RecTrainer
from recbole_ur4rec.trainer.staged_trainer import Alternator

ALL_GROUPS = {"item_embedding", "backbone", "retriever", "fusion", "cold_mapping"}
BACKBONE_PART, RETRIEVER_PART = {"item_embedding", "backbone"}, {"retriever", "fusion"}
MAPPING = {"cold_mapping"}  # the text map of unseen items follows the ID embeddings: trained with the backbone part


@pytest.fixture(scope="module")
def genre_root(tmp_path_factory):
    return write_genre_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # the texts are encoded once per module


@pytest.fixture
def settings(genre_root, cache_dir, tmp_path):
    return ur4rec_config(genre_root, cache_dir, tmp_path / "saved")


def build(settings, **overrides):
    return build_model("UR4Rec", "genre", {**settings, **overrides})


def test_registered_with_its_trainer():
    assert get_model("UR4Rec") is UR4Rec
    assert get_trainer(UR4Rec.type, "UR4Rec") is UR4RecTrainer


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"moe_type": "hierarchical", "memory_size": 3, "contrastive_type": "memory_bank", "memory_bank_size": 32},
        {"fusion_type": "gate", "ranking_loss_type": "InfoNCE", "ranking_negatives": 20},
        {"fusion_type": "fixed", "ranking_loss_type": "BPR", "ranking_negatives": 20, "loss_position": "last"},
    ],
)
def test_loss_terms_are_finite_and_differentiable_for_every_objective(settings, overrides):
    _, model, train_data, _, _ = build(settings, **overrides)
    batch = next(iter(train_data))
    expected = {  # every objective also trains the text map of items without training interactions
        "backbone": {"rank", "cold_mapping"},
        "retriever": {"rank", "consistency", "contrastive", "diversity", "load_balance", "cold_mapping"},
        "fused": {"rank", "rank_backbone", "rank_retriever", "distillation", "consistency", "contrastive", "diversity", "load_balance", "cold_mapping"},
    }
    for objective, names in expected.items():
        model.set_objective(objective)
        model.zero_grad()
        terms = model.loss_terms(batch)
        assert set(terms) == names
        assert all(math.isfinite(value.item()) for value in terms.values()), terms
        model.calculate_loss(batch).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    if overrides.get("moe_type") == "hierarchical":
        assert terms["diversity"].item() > 0 and model.retriever.memory.count.sum() > 0
        assert int(model.memory_bank.filled) > 0


@pytest.mark.parametrize("use_image", [False, True])
def test_sampled_losses_score_only_the_candidates_as_the_full_scoring_does(settings, genre_root, tmp_path, use_image):
    """InfoNCE/BPR score the batch's targets and shared negatives; those scores equal the full scores' columns."""
    extra = {}
    if use_image:
        extra = {"use_image": True, "image_feature_file": write_image_features(genre_root, tmp_path / "clip.pt")[0]}
    _, model, train_data, _, _ = build(settings, ranking_loss_type="InfoNCE", ranking_negatives=9, **extra)
    model.eval()
    batch = next(iter(train_data))
    with torch.no_grad():
        hidden = model.forward(batch["item_id_list"], batch["item_length"])
        states, targets, users = supervised_positions(model, batch, hidden)
        candidates = SampledCandidates(targets, model.n_items, 9)
        full = model.retriever(states, users)
        sampled = model.retriever(states, users, candidates.items)
    assert sampled["scores"].shape == (len(targets), len(candidates.items)) < full["scores"].shape
    assert torch.allclose(sampled["scores"], full["scores"][:, candidates.items], atol=1e-5)
    for name in full["keys"]:
        assert torch.allclose(sampled["keys"][name], full["keys"][name][:, candidates.items], atol=1e-6)
    # the InfoNCE of the candidates equals InfoNCE computed from the full score rows
    scores = full["scores"]
    positive = scores.gather(1, targets.unsqueeze(1))
    negative = scores[:, candidates.negatives].masked_fill(candidates.clash, float("-inf"))
    expected = torch.nn.functional.cross_entropy(torch.cat([positive, negative], 1), torch.zeros_like(targets))
    assert torch.allclose(ranking_loss(sampled["scores"], targets, "InfoNCE", candidates), expected, atol=1e-5)


def test_the_model_reads_user_text_written_from_training_interactions_only(settings):
    """Through the model: its user-text features are the encodings of texts that name the user's training items
    and none of its validation or test targets (unless also in its training history)."""
    from recbole_ur4rec.features.item_text import item_titles_and_genres
    from recbole_ur4rec.features.pipeline import text_encoder, user_texts_of

    def names(text, title):
        return re.search(re.escape(title) + r"\b", text) is not None

    config, model, train_data, valid_data, test_data = build(settings, user_text_recent_items=8)
    train_split = train_data._dataset.training_split
    _, tokens, texts, _ = user_texts_of(config, train_split)
    text_of = dict(zip(tokens, texts))
    titles, _ = item_titles_and_genres(config)
    users, items = train_split.field2id_token["user_id"], train_split.field2id_token["item_id"]
    trained = {}
    for u, i in zip(train_split.inter_feat["user_id"].tolist(), train_split.inter_feat["item_id"].tolist()):
        trained.setdefault(users[u], set()).add(items[i])
    checked = 0
    for split in (valid_data, test_data):
        feat = split._dataset.inter_feat
        for u, i in zip(feat["user_id"].tolist(), feat["item_id"].tolist()):
            user, item = users[u], items[i]
            if item in titles and item not in trained[user]:
                assert not names(text_of[user], titles[item]), f"user {user}'s text names its held-out item {item}"
                checked += 1
    assert checked > 50
    assert all(any(names(text_of[u], titles[i]) for i in trained[u] if i in titles) for u in list(trained)[:20])
    # the model's user features are these texts' encodings
    sample = [u for u in tokens[:10]]
    encoded = text_encoder(config).encode([text_of[u] for u in sample])
    ids = torch.tensor([train_split.field2token_id["user_id"][u] for u in sample])
    assert torch.allclose(model.retriever.user_features[ids].float(), torch.as_tensor(encoded).float(), atol=1e-4)


@pytest.mark.parametrize("calibration", ["affine", "standardize"])
@pytest.mark.parametrize("fusion_type", ["fixed", "residual"])
def test_calibrated_fusions_train_and_put_the_branches_on_one_scale(settings, calibration, fusion_type):
    _, model, train_data, _, _ = build(settings, fusion_type=fusion_type, fusion_calibration=calibration)
    model.set_objective("fused")
    batch = next(iter(train_data))
    loss = model.calculate_loss(batch)
    assert math.isfinite(loss.item())
    loss.backward()
    if calibration == "affine":
        assert model.fusion.log_scale.grad is not None and model.fusion.log_scale.grad.abs().sum() > 0
    backbone, retriever = torch.randn(4, 50) * 8 + 3, torch.rand(4, 50) / 0.1
    with torch.no_grad():
        if calibration == "affine":
            model.fusion.log_scale.fill_(0.7)
        b, r = model.fusion.calibrate(backbone, retriever)
    if calibration == "standardize":
        for x in (b, r):
            assert torch.allclose(x.mean(-1), torch.zeros(4), atol=1e-5) and torch.allclose(x.std(-1), torch.ones(4), atol=1e-5)
    else:
        assert torch.allclose(b, backbone * math.exp(0.7)) and torch.allclose(r, retriever * math.exp(0.7))
    # rankings inside each branch are unchanged by the calibration
    assert torch.equal(b.argsort(-1), backbone.argsort(-1)) and torch.equal(r.argsort(-1), retriever.argsort(-1))


def test_uncalibrated_fusion_is_todays(settings):
    _, model, _, _, _ = build(settings, fusion_type="fixed")
    backbone, retriever, context = torch.randn(3, 20), torch.randn(3, 20), torch.randn(3, 32)
    fused, w = model.fusion(backbone, retriever, context)
    assert torch.equal(fused, (1 - w) * backbone + w * retriever) and not list(model.fusion.parameters())
    with pytest.raises(ValueError, match="config key 'fusion_calibration' must be one of none, affine, standardize"):
        build(settings, fusion_calibration="zscore")


def test_full_sort_scores_every_item_and_predict_agrees(settings):
    _, model, _, valid_data, _ = build(settings)
    model.eval()
    batch = next(iter(valid_data))[0]
    for objective in ("backbone", "retriever", "fused"):
        model.set_objective(objective)
        scores = model.full_sort_predict(batch)
        assert scores.shape == (len(batch), model.n_items) and torch.isfinite(scores).all()
        items = torch.randint(1, model.n_items, (len(batch),))
        batch.interaction[model.ITEM_ID] = items
        assert torch.allclose(model.predict(batch), scores.gather(1, items.unsqueeze(1)).squeeze(1))


def test_contrastive_other_windows_of_the_same_user_are_not_negatives():
    torch.manual_seed(0)
    anchors, positives = torch.randn(4, 8), torch.randn(4, 8)
    positives[1] = positives[0]  # two windows of user 7 share the user's text view
    groups = torch.tensor([7, 7, 3, 5])
    a, p = torch.nn.functional.normalize(anchors, dim=-1), torch.nn.functional.normalize(positives, dim=-1)
    logits = a @ p.t() / 0.1
    # each row's negatives are the other users' views only
    expected = torch.stack([
        torch.nn.functional.cross_entropy(logits[i, keep].unsqueeze(0), torch.tensor([keep.index(i)]))
        for i, keep in enumerate([[0, 2, 3], [1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]])
    ]).mean()
    assert torch.allclose(view_info_nce(anchors, positives, temperature=0.1, groups=groups), expected, atol=1e-6)
    assert not torch.allclose(view_info_nce(anchors, positives, temperature=0.1), expected, atol=1e-3)


@pytest.mark.parametrize("design", ["modality", "experts"])
def test_items_and_users_without_text_never_read_other_rows(settings, design):
    config, model, _, valid_data, _ = build(settings, hidden_dropout_prob=0.0, attn_dropout_prob=0.0, moe_design=design)
    model.eval()
    model.set_objective("retriever")
    retriever = model.retriever
    dataset = valid_data._dataset
    no_text = dataset.token2id(dataset.iid_field, item_token(NO_TEXT_ITEM))
    assert not retriever.text_mask[no_text] and retriever.text_mask[1:].sum() == model.n_items - 2
    batch = next(iter(valid_data))[0]
    scores = model.full_sort_predict(batch)
    if design == "modality":
        assert torch.all(scores[:, no_text] == 0), "an item with no modality is scored by none"
    else:  # the item-ID expert scores it (it has training interactions), the text experts do not
        assert retriever.id_mask[no_text] and torch.all(scores[:, no_text] != 0)

    # the feature row of an item without text is never read; an item's row changes only its own scores
    retriever.text_features[no_text] = torch.randn(retriever.text_features.size(1))
    assert torch.equal(model.full_sort_predict(batch), scores)
    other = int(torch.nonzero(retriever.text_mask)[0])
    retriever.text_features[other] += 1.0
    moved = (model.full_sort_predict(batch) != scores).any(0)
    assert moved[other] and moved.sum() == 1

    # a user whose text is masked gets the learned missing vector, whatever the feature row holds
    user = int(batch[model.USER_ID][0])
    retriever.user_mask[user] = False
    masked = model.full_sort_predict(batch)
    retriever.user_features[user] = torch.randn(retriever.user_features.size(1))
    assert torch.equal(model.full_sort_predict(batch), masked)
    assert torch.allclose(retriever.user_view(torch.tensor([user]))[0], retriever.missing_user)


@pytest.mark.parametrize("design", ["experts", "modality"])
def test_the_retriever_scores_the_routed_mixture_of_its_experts(settings, design):
    """The retriever's one product equals its definition: per expert, the router-weighted sum of its sub-experts'
    cosines, mixed over the experts that have the item's evidence and divided by the temperature."""
    _, model, *_ = build(settings, moe_design=design, moe_type="hierarchical", num_sub_experts=2)
    retriever = model.retriever.eval()
    torch.manual_seed(0)
    states, users = torch.randn(3, 5, model.backbone.item_embedding.weight.size(1)), torch.tensor([1, 2, 3])
    out = retriever(states, users)
    masks, n_sub = retriever.item_mask().float(), 2
    numerator, denominator = 0, 0
    for e, name in enumerate(retriever.expert_names):
        queries = out["expert_queries"][..., e * n_sub : (e + 1) * n_sub, :]  # [B L S D]
        cosines = torch.einsum("blsd,snd->blsn", queries, out["keys"][name])
        expert = (out["sub_weights"][name].unsqueeze(-1) * cosines).sum(-2)  # [B L n]
        numerator = numerator + out["expert_weights"][..., e : e + 1] * masks[e] * expert
        denominator = denominator + out["expert_weights"][..., e : e + 1] * masks[e]
    expected = numerator / denominator.clamp(min=1e-6) / retriever.temperature
    assert torch.allclose(out["scores"], expected, atol=1e-5)
    items = torch.tensor([1, 4, 2])
    assert torch.allclose(retriever(states, users, items)["scores"], expected[..., items], atol=1e-5)


def test_image_modality_trains_and_an_item_without_an_image_keeps_its_text_score(settings, genre_root, tmp_path):
    path, no_image_token = write_image_features(genre_root, tmp_path / "clip.pt")
    config, model, train_data, valid_data, _ = build(
        settings, use_image=True, image_feature_file=path, hidden_dropout_prob=0.0, attn_dropout_prob=0.0
    )
    retriever = model.retriever
    assert retriever.modalities == ["text", "image"]
    assert retriever.expert_names == ["user_preference", "item_description", "item_id", "image"]
    no_image = valid_data._dataset.token2id(valid_data._dataset.iid_field, no_image_token)
    assert not retriever.image_mask[no_image] and retriever.text_mask[no_image]
    batch = next(iter(train_data))
    model.set_objective("fused")
    model.calculate_loss(batch).backward()
    assert all(p.grad is not None for p in retriever.experts["image"].parameters())
    model.eval()
    model.set_objective("retriever")
    batch = next(iter(valid_data))[0]
    scores = model.full_sort_predict(batch)
    assert torch.isfinite(scores).all()
    # the missing image row is never read: the item is scored by its text alone
    retriever.image_features[no_image] = torch.randn(retriever.image_features.size(1))
    assert torch.equal(model.full_sort_predict(batch), scores)


def test_features_are_not_saved_and_a_checkpoint_refuses_other_features(settings):
    _, model, _, _, _ = build(settings)
    state = model.state_dict()
    assert not any(key.endswith(("_features", "_mask")) for key in state), "frozen features stay out of checkpoints"
    with pytest.raises(ValueError, match="trained on other features"):
        model.load_other_parameter({"objective": "fused", "feature_fingerprint": "0123456789abcdef"})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"fusion_type": "sum"}, "fusion_type must be one of fixed, gate, residual, got 'sum'"),
        ({"moe_heads": 3}, r"retriever_dim \(16\) must be a multiple of moe_heads \(3\)"),
        ({"retriever_temperature": 0}, "config key 'retriever_temperature' must be a number > 0, got 0"),
        ({"ranking_loss_type": "CE2"}, "config key 'ranking_loss_type' must be one of CE, InfoNCE, BPR, got 'CE2'"),
        ({"use_image": True}, "config key 'use_image' is True but no image features are configured"),
    ],
)
def test_bad_model_settings_are_clear_errors(settings, overrides, message):
    with pytest.raises(ValueError, match=message):
        build(settings, **overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"stages": ["pretrain", "joint"]}, "config key 'stages' must be a list of distinct stages"),
        ({"stage_epochs": {"joint": 2}}, "config key 'stage_epochs' must give a value for every stage .*missing: pretrain_backbone"),
        ({"curriculum_ramps": {"diversity": [0.5, 0.2]}}, "curriculum_ramps' entry 'diversity'"),
        ({"max_grad_norm": {"encoder": 1.0}}, "max_grad_norm' names group 'encoder'"),
        ({"alternation": "random"}, "config key 'alternation' must be one of fixed, adaptive, got 'random'"),
        ({"warmup_ratio": 2}, r"config key 'warmup_ratio' must be a number in \[0, 1\], got 2"),
    ],
)
def test_bad_trainer_settings_are_clear_errors(settings, overrides, message):
    config, model, _, _, _ = build(settings, **overrides)
    with pytest.raises(ValueError, match=message):
        UR4RecTrainer(config, model)


def trainer_for(settings, **overrides):
    config, model, train_data, _, _ = build(settings, **overrides)
    trainer = UR4RecTrainer(config, model)
    trainer.steps_per_epoch = len(train_data)
    return trainer, model, train_data


def test_each_stage_trains_only_its_parameter_groups(settings):
    trainer, model, train_data = trainer_for(settings, alternation_steps=1)
    expected = {
        "pretrain_backbone": BACKBONE_PART | MAPPING, "pretrain_retriever": RETRIEVER_PART | MAPPING,
        "joint": ALL_GROUPS, "end_to_end": ALL_GROUPS,
    }
    for index, stage in enumerate(trainer.stages):
        trainer._enter_stage(index)
        before = snapshot(model)
        loss = trainer._train_epoch(train_data, 0)
        assert math.isfinite(loss)
        assert changed_groups(model, before) == expected[stage.name], stage.name
    assert trainer.alternator is None


def test_joint_stage_alternates_between_backbone_and_retriever(settings):
    trainer, model, train_data = trainer_for(settings, stages=["joint"], alternation_steps=10_000)
    trainer._enter_stage(0)
    before = snapshot(model)
    trainer._train_epoch(train_data, 0)
    assert changed_groups(model, before) == BACKBONE_PART | MAPPING, "the first turn trains the backbone (and the text map) only"
    assert trainer.alternator.switches == 0

    trainer, model, train_data = trainer_for(settings, stages=["joint"], alternation_steps=2)
    trainer._enter_stage(0)
    trainer._train_epoch(train_data, 0)
    assert trainer.alternator.switches == len(train_data) // 2
    assert trainer.alternator.current == (len(train_data) // 2) % 2


def test_alternator_fixed_and_adaptive_schedules():
    fixed = Alternator(2, "fixed", 3, 0.01)
    assert [fixed.update([1.0, 1.0]) for _ in range(7)] == [False, False, True, False, False, True, False]
    assert fixed.current == 0 and fixed.switches == 2

    adaptive = Alternator(2, "adaptive", 4, 0.01)
    assert not any(adaptive.update([10.0 - i, 5.0]) for i in range(8)), "a falling loss keeps its part training"
    assert [adaptive.update([2.0, 5.0]) for _ in range(4)][-1], "a flat loss hands over"
    assert adaptive.current == 1
    restored = Alternator(2, "adaptive", 4, 0.01)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.state_dict() == adaptive.state_dict()


def test_progressive_unfreezing_goes_from_fusion_to_embeddings(settings):
    trainer, model, train_data = trainer_for(settings, stages=["end_to_end"], progressive_unfreezing=True)
    trainer._enter_stage(0)
    seen = []
    for epoch in range(4):
        before = snapshot(model)
        trainer._train_epoch(train_data, epoch)
        seen.append(changed_groups(model, before))
    # the text map (a regression on detached targets) is not part of the unfreezing order: it trains throughout
    assert seen == [{"fusion"} | MAPPING, {"fusion", "retriever"} | MAPPING, {"fusion", "retriever", "backbone"} | MAPPING, ALL_GROUPS]


def test_progressive_unfreezing_skips_a_fusion_without_parameters(settings):
    # fixed fusion has no parameters: the first step unfreezes the retriever instead of training nothing
    trainer, model, train_data = trainer_for(settings, stages=["end_to_end"], progressive_unfreezing=True, fusion_type="fixed")
    trainer._enter_stage(0)
    seen = []
    for epoch in range(3):
        before = snapshot(model)
        trainer._train_epoch(train_data, epoch)
        seen.append(changed_groups(model, before))
    assert seen == [{"retriever"} | MAPPING, {"retriever", "backbone"} | MAPPING, ALL_GROUPS - {"fusion"}]


def test_curriculum_ramps_auxiliary_weights_and_lr_warms_up_then_decays(settings):
    trainer, model, train_data = trainer_for(settings, stages=["joint"], warmup_ratio=0.25, min_lr_ratio=0.0)
    trainer._enter_stage(0)
    total = trainer.stage.epochs * trainer.steps_per_epoch
    weights, factors = [], []
    for step in range(total):
        trainer.stage_step = step
        weights.append(trainer.loss_weights())
        factors.append(trainer._learning_rate_factor())
    assert weights[0]["consistency"] == 0 and weights[-1]["consistency"] == model.loss_weights["consistency"]
    assert weights[total // 2]["diversity"] == 0 and weights[-1]["diversity"] > 0
    assert weights[0]["rank"] == weights[-1]["rank"] == 1.0
    peak = int(np.argmax(factors))
    assert factors[peak] == pytest.approx(1.0) and 0 < peak < total - 1
    assert all(a <= b for a, b in zip(factors[:peak], factors[1 : peak + 1]))
    assert all(a >= b for a, b in zip(factors[peak:], factors[peak + 1 :]))


class Interrupted(Exception):
    pass


def test_resume_mid_stage_matches_an_uninterrupted_run(settings, tmp_path, monkeypatch):
    run_settings = {
        **settings,
        "stage_epochs": {"pretrain_backbone": 2, "pretrain_retriever": 2, "joint": 3, "end_to_end": 2},
        "alternation_steps": 3,
        "memory_size": 2,
        "contrastive_type": "memory_bank",
        "memory_bank_size": 64,
    }
    uninterrupted = run_recbole_ur4rec("UR4Rec", "genre", config_dict={**run_settings, "checkpoint_dir": str(tmp_path / "a")}, keep_user_values=True)
    assert_user_values_are_the_results(uninterrupted)  # the best stage's weights, evaluated again on validation

    def stop_in_joint(epoch_idx, valid_score):
        if epoch_idx == 5:  # joint's second epoch of three
            raise Interrupted

    def stop_in_end_to_end(epoch_idx, valid_score):
        if epoch_idx == 7:
            raise Interrupted

    def stop_at_first(epoch_idx, valid_score):
        raise Interrupted

    with pytest.raises(Interrupted):
        run_recbole_ur4rec("UR4Rec", "genre", config_dict={**run_settings, "checkpoint_dir": str(tmp_path / "b")}, callback_fn=stop_in_joint)
    (last_file,) = [f for f in os.listdir(tmp_path / "b") if f.endswith("-last.pth")]
    state = load_checkpoint(tmp_path / "b" / last_file)
    assert state["staged"]["stage_index"] == 2 and state["epoch"] == 1 and state["staged"]["alternator"]["switches"] > 0

    # resumed in end_to_end, whose best is below the run's (from joint), and stopped at its first validation: the
    # best-model file written on resuming holds the run's best, not the stage's
    shutil.copytree(tmp_path / "b", tmp_path / "b2")
    for stop in (stop_in_end_to_end, stop_at_first):
        with pytest.raises(Interrupted):
            run_recbole_ur4rec(resume_file=str(tmp_path / "b2" / last_file), callback_fn=stop)
    again = load_checkpoint(tmp_path / "b2" / last_file)
    best = load_checkpoint(tmp_path / "b2" / last_file.replace("-last.pth", ".pth"))
    assert (best["best_valid_score"], best["best_valid_result"]) == (again["run_best_score"], again["run_best_result"])

    epochs_run, reads = [], count_checkpoint_reads(monkeypatch)
    resumed = run_recbole_ur4rec(resume_file=str(tmp_path / "b" / last_file), callback_fn=lambda epoch, score: epochs_run.append(epoch))
    assert epochs_run == [6, 7, 8], "training continues after the last saved epoch, through the last stage"
    assert reads.count(str(tmp_path / "b" / last_file)) == 1, "the resume state is read once"
    assert resumed["best_valid_result"] == uninterrupted["best_valid_result"]
    assert resumed["test_result"] == uninterrupted["test_result"]
    for run in (uninterrupted, resumed):
        assert_best_file_holds(run, uninterrupted)
    # the run's budget counts over the stages, across the resume: 2 + 2 + 3 + 2 epochs, the best's the same
    assert state["trained_epochs"] == 2 + 2 + 2
    last = lambda run: load_checkpoint(os.path.splitext(run["model_file"])[0] + "-last.pth")
    assert last(resumed)["trained_epochs"] == last(uninterrupted)["trained_epochs"] == 9
    assert load_checkpoint(resumed["model_file"])["trained_epochs"] == load_checkpoint(uninterrupted["model_file"])["trained_epochs"]


def test_trained_epochs_count_what_every_stage_trained_not_its_schedule(settings, tmp_path):
    """A stage that stops early counts the epochs it trained: the run's budget (run_compare's epochs and best epoch)
    is the sum over the stages, and the best file's is the epoch of the run's best validation."""
    from recbole_ur4rec.experiments.compare import trained_epochs

    schedule = {"pretrain_backbone": 12, "pretrain_retriever": 12}
    validations = []
    run = run_recbole_ur4rec(
        "UR4Rec", "genre", config_dict={**settings, "stages": list(schedule), "stage_epochs": schedule, "stopping_step": 1,
                                        "checkpoint_dir": str(tmp_path)},
        callback_fn=lambda epoch, score: validations.append(score),
    )
    assert len(validations) < sum(schedule.values()), "a stage must stop early for this test to tell trained from scheduled"
    last = load_checkpoint(os.path.splitext(run["model_file"])[0] + "-last.pth")
    best = load_checkpoint(run["model_file"])
    assert trained_epochs(last) == len(validations)  # one validation per epoch (eval_step 1)
    assert trained_epochs(best) == int(np.argmax(validations)) + 1  # the first of equal best scores is kept
    assert last["stage"]["index"] == 1 and last["epoch"] + 1 < trained_epochs(last)  # "epoch" is the stage's own


def test_learns_from_text_better_than_the_backbone_alone(settings):
    budget = {"pretrain_backbone": 30, "pretrain_retriever": 20, "joint": 10, "end_to_end": 10}
    results = {}
    for name, stages, epochs in (
        ("backbone", ["pretrain_backbone"], {"pretrain_backbone": sum(budget.values())}),
        ("ur4rec", list(budget), budget),
    ):
        result = run_recbole_ur4rec("UR4Rec", "genre", config_dict={**settings, "stages": stages, "stage_epochs": epochs, "stopping_step": 5})
        results[name] = (result["best_valid_result"]["ndcg@10"] + result["test_result"]["ndcg@10"]) / 2
    random_ndcg10 = 0.025  # about 10 / 400 items hit, discounted
    assert results["backbone"] > random_ndcg10
    assert results["ur4rec"] > 1.15 * results["backbone"], results


def test_items_without_training_interactions_are_scored_through_the_text_map(settings):
    cold = {"cold_items": True, "cold_item_share": 0.3, "cold_item_seed": 1}
    config, model, train_data, valid_data, _ = build(settings, **cold)
    split = train_data._dataset.training_split
    seen = torch.zeros(model.n_items, dtype=torch.bool)
    seen[split.inter_feat[split.iid_field].long()] = True
    expected = ~seen & model.retriever.text_mask
    expected[0] = False
    assert torch.equal(model.mapped_items, expected) and expected.any()
    # training: the map learns the warm targets' ID embeddings (detached), nothing else moves through it
    model.train()
    terms = model.loss_terms(next(iter(train_data)))
    assert "cold_mapping" in terms and torch.isfinite(terms["cold_mapping"])
    model.zero_grad()
    terms["cold_mapping"].backward()
    assert model.cold_mapping.weight.grad.abs().sum() > 0 and model.backbone.item_embedding.weight.grad is None
    # evaluation: the backbone scores unseen items with their mapped text embeddings, the others as before
    model.eval()
    model.set_objective("backbone")
    batch = next(iter(valid_data))[0]
    scores = model.full_sort_predict(batch)
    last = model.backbone.gather_last(model(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]), batch[model.ITEM_SEQ_LEN])
    mapped = model.cold_mapping(model.retriever.text_features)  # [n H]
    assert torch.allclose(scores[:, expected], (last @ mapped.t())[:, expected], atol=1e-5)
    assert torch.allclose(scores[:, ~expected], (last @ model.backbone.item_embedding.weight.t())[:, ~expected], atol=1e-5)
    # off: no map, the ID embeddings score every item
    _, plain, *_ = build(settings, cold_item_mapping=False, **cold)
    assert plain.cold_mapping is None and plain.parameter_groups()["cold_mapping"] == []


def test_the_ranking_text_map_scores_random_items_through_the_map_against_the_other_ids(settings):
    """cold_mapping_loss 'ranking': a random share of the items is scored through the map, the rest by ID, and
    every row gives the cross-entropy."""
    cold = {"cold_items": True, "cold_item_share": 0.3, "cold_item_seed": 1, "cold_mapping_loss": "ranking", "cold_mapping_share": 0.5}
    _, model, train_data, _, _ = build(settings, **cold)
    model.train()
    model.set_objective("backbone")
    batch = next(iter(train_data))
    torch.manual_seed(0)
    terms = model.loss_terms(batch)
    torch.manual_seed(0)  # the same dropout, then the same draw of simulated new items
    hidden = model(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
    states, targets, _ = supervised_positions(model, batch, hidden)
    simulated = model.retriever.text_mask & (torch.rand(model.n_items) < 0.5)
    assert 0 < simulated[targets].sum() < len(targets)
    scores = states @ model.backbone.item_embedding.weight.t()  # [N n]
    scores[:, simulated] = states @ model.cold_mapping(model.retriever.text_features[simulated]).t()
    expected = torch.nn.functional.cross_entropy(scores, targets)  # every row: mapped items lose where not the target
    assert terms["cold_mapping"].item() == pytest.approx(expected.item(), rel=1e-5)
    model.zero_grad()
    terms["cold_mapping"].backward()  # only the map learns from it
    assert model.cold_mapping.weight.grad.abs().sum() > 0 and model.backbone.item_embedding.weight.grad is None
    with pytest.raises(ValueError, match="cold_mapping_loss"):
        build(settings, cold_mapping_loss="hinge")


@pytest.mark.parametrize("model_name", ["UR4Rec", "FTRagRec"])
def test_learning_rate_is_refused_by_staged_models(settings, model_name):
    if model_name != "UR4Rec":  # UR4Rec's stage settings
        settings = {k: v for k, v in settings.items() if not k.startswith("stage")}
    config, model, *_ = build_model(model_name, "genre", {**settings, "learning_rate": 0.01})
    with pytest.raises(ValueError, match=r"config key 'learning_rate' \(0.01\) is not used by .*'stage_learning_rate' \(now \{"):
        get_trainer(config["MODEL_TYPE"], model_name)(config, model)
    config, model, *_ = build_model(model_name, "genre", settings)
    trainer = get_trainer(config["MODEL_TYPE"], model_name)(config, model)  # without it, the stages' own rates
    assert [stage.learning_rate for stage in trainer.stages] == [config["stage_learning_rate"][s.name] for s in trainer.stages]


@pytest.mark.parametrize("moe_type", ["flat", "hierarchical"])
def test_the_experts_router_routes_users_differently_after_training(settings, moe_type):
    """The prototype's experts (user preference, item description, item ID) under a learned router: after training,
    the router's weights at the last position differ across users, for each expert."""
    result = run_recbole_ur4rec(
        "UR4Rec", "genre",
        config_dict={**settings, "moe_design": "experts", "moe_type": moe_type, "stages": ["pretrain_backbone", "pretrain_retriever"],
                     "stage_epochs": {"pretrain_backbone": 2, "pretrain_retriever": 3}},
    )
    config, model, _, _, valid_data, _ = load_data_and_model(result["model_file"])
    model.eval()
    assert model.retriever.expert_names == ["user_preference", "item_description", "item_id"]  # no images here
    weights = torch.cat([model.router_weights(batch[0]) for batch in valid_data])  # [users E]
    assert weights.shape == (len(valid_data._dataset.inter_feat), 3)
    assert torch.allclose(weights.sum(1), torch.ones(len(weights)))
    spread = weights.max(0).values - weights.min(0).values  # per expert, over users
    assert (spread > 0.01).all(), f"the router gives every user nearly the same weights: spread {spread.tolist()}"
    if moe_type == "hierarchical":  # every expert has its own sub-experts and router, the user preference's included
        assert all(len(model.retriever.experts[name].query_proj) == config["num_sub_experts"] for name in model.retriever.expert_names)
