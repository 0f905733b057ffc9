"""DuoRec: contrastive terms, same-target positives, config errors, shapes, warm-start names, learning."""
import math

import pytest
import torch
from model_fixtures import build_model, untrained_test_ndcg10

from recbole_ur4rec.data.sequence_dataset import prefix_item_lists
from recbole_ur4rec.model import DuoRec, FastSASRec
from recbole_ur4rec.model.duorec import CONTRASTS, sample_in_batch_partners, simclr_info_nce
from recbole_ur4rec.model.layers import position_loss
from recbole_ur4rec.quick_start import run_recbole_ur4rec
from recbole_ur4rec.registry import get_model


@pytest.fixture
def duo_config(quick_config):
    return {**quick_config, "train_batch_size": 64}


def build(config_dict, model="DuoRec", **overrides):
    _, net, train_data, valid_data, _ = build_model(model, "tiny", {**config_dict, **overrides})
    return net, train_data, valid_data


def test_registered_as_plugin_model():
    assert get_model("DuoRec") is DuoRec


@pytest.mark.parametrize("loss_position", ["all", "last"])
@pytest.mark.parametrize("contrast", CONTRASTS)
def test_losses_are_finite_and_reach_the_encoder(duo_config, loss_position, contrast):
    model, train_data, _ = build(duo_config, loss_position=loss_position, contrast=contrast, lmd=0.5, lmd_sem=0.5)
    loss = model.calculate_loss(next(iter(train_data)))
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0
    grad = model.backbone.layers[0].attention.qkv.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("loss_position", ["all", "last"])
def test_contrast_adds_to_the_recommendation_loss(duo_config, loss_position):
    # without dropout every forward pass is the same, so the contrastive terms are exactly the difference
    config = {**duo_config, "hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "loss_position": loss_position}
    model, train_data, _ = build(config)
    model.eval()
    batch = next(iter(train_data))
    plain = model.calculate_loss(batch)

    hidden = model(batch["item_id_list"], batch["item_length"])
    if loss_position == "last":
        rec, targets = model.backbone.gather_last(hidden, batch["item_length"]), batch["item_id"]
    else:
        mask = batch["target_item_id_list"][:, : hidden.size(1)] > 0
        rec, targets = hidden[mask], batch["target_item_id_list"][:, : hidden.size(1)][mask]
    ce = position_loss(rec, targets, model.backbone.item_embedding.weight, "CE")
    for off in ({"contrast": "none"}, {"lmd": 0.0, "lmd_sem": 0.0}, {"contrast": "un", "lmd": 0.0}):
        settings = {"contrast": "us_x", "lmd": 0.1, "lmd_sem": 0.1, **off}
        for key, value in settings.items():
            setattr(model, key, value)
        assert torch.allclose(model.calculate_loss(batch), ce, atol=1e-6), off
    model.contrast, model.lmd, model.lmd_sem = "us_x", 0.1, 0.1
    assert plain.item() > ce.item() + 1e-3, "us_x adds a positive InfoNCE term"


def test_info_nce_matches_the_authors_formulation():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 4), torch.randn(5, 4)
    # authors: logits = [positive, the 2N - 2 other views], label 0
    z = torch.cat([z1, z2]) / 1.0
    sim = z @ z.t() / 0.5
    rows = []
    for i in range(10):
        j = (i + 5) % 10
        rows.append(torch.cat([sim[i, j : j + 1], sim[i, [k for k in range(10) if k not in (i, j)]]]))
    expected = torch.nn.functional.cross_entropy(torch.stack(rows), torch.zeros(10, dtype=torch.long))
    assert torch.allclose(simclr_info_nce(z1, z2, 0.5), expected, atol=1e-6)

    # same-target views leave the negatives; without any, the masked loss is the same
    targets = torch.tensor([1, 2, 3, 4, 1])
    masked = simclr_info_nce(z1, z2, 0.5, targets=targets)
    assert masked < simclr_info_nce(z1, z2, 0.5)
    assert torch.allclose(simclr_info_nce(z1, z2, 0.5, targets=torch.arange(5)), expected, atol=1e-6)


def test_in_batch_partner_has_the_same_target_and_is_another_position():
    torch.manual_seed(0)
    targets = torch.randint(1, 30, (500,))
    partner = sample_in_batch_partners(targets)
    assert torch.equal(targets[partner], targets)
    counts = torch.bincount(targets)
    shared = counts[targets] > 1
    assert (partner[shared] != torch.arange(500)[shared]).all()
    assert (partner[~shared] == torch.arange(500)[~shared]).all(), "a unique target falls back to itself"


def test_same_target_row_is_another_training_row_with_that_target(duo_config):
    model, train_data, _ = build(duo_config, loss_position="last")
    dataset = train_data._dataset
    users, targets = dataset.inter_feat["user_id"], dataset.inter_feat["item_id"]
    rows = {
        (int(u), int(t)): (seq, int(n))
        for u, t, seq, n in zip(users, targets, prefix_item_lists(dataset, dataset.inter_feat), dataset.inter_feat["item_length"])
    }
    drawn = set()
    for _ in range(5):
        index = model.sample_same_target_rows(users, targets)
        found = index >= 0
        assert found.float().mean() > 0.9
        sem_target = model.sem_key[index[found]] // model.n_users
        sem_user = model.sem_key[index[found]] % model.n_users
        assert torch.equal(sem_target, targets[found])
        assert (sem_user != users[found]).all(), "the row itself (same user, same target) is never drawn"
        drawn |= set(index[found].tolist())
        # the drawn row's sequence is the training prefix that precedes that target
        i = int(index[found][0])
        seq, length = rows[(int(sem_user[0]), int(sem_target[0]))]
        sem_seq = model.same_target_item_seq(torch.tensor([i]), seq.numel())[0]
        assert torch.equal(sem_seq, seq) and int(model.sem_item_seq_len[i]) == length
    assert len(drawn) > len(users) // 2, "positives are drawn at random among the candidates"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("contrast", "both", r"config key 'contrast' must be one of us_x, us, un, su, none, got 'both'"),
        ("tau", -0.5, r"config key 'tau' must be a number > 0, got -0.5"),
        ("tau", 0, r"config key 'tau' must be a number > 0, got 0"),
        ("lmd", -1, r"config key 'lmd' must be a number >= 0, got -1"),
        ("lmd_sem", "x", r"config key 'lmd_sem' must be a number >= 0, got 'x'"),
        ("sim", "l2", r"config key 'sim' must be one of dot, cos, got 'l2'"),
        ("contrast_max_anchors", 1, r"config key 'contrast_max_anchors' must be an int >= 2, got 1"),
    ],
)
def test_bad_config_values_are_named(duo_config, key, value, message):
    with pytest.raises(ValueError, match=message):
        build(duo_config, **{key: value})


def test_full_sort_predict_shape(duo_config):
    model, _, valid_data = build(duo_config)
    interaction = next(iter(valid_data))[0]
    scores = model.full_sort_predict(interaction)
    assert scores.shape == (len(interaction), model.n_items)
    assert torch.isfinite(scores).all()


def test_backbone_names_match_fastsasrec_for_warm_start(duo_config):
    duo, _, _ = build(duo_config)
    fast, _, _ = build(duo_config, model="FastSASRec")
    duo_keys = {k: v.shape for k, v in duo.state_dict().items() if k.startswith("backbone.")}
    fast_keys = {k: v.shape for k, v in fast.state_dict().items() if k.startswith("backbone.")}
    assert duo_keys == fast_keys and duo_keys
    assert set(duo.state_dict()) == set(fast.state_dict()), "the same-target index stays out of checkpoints"
    fast.load_state_dict(duo.state_dict())
    assert isinstance(duo, FastSASRec)


@pytest.mark.parametrize("loss_position", ["all", "last"])
def test_learns_the_sequential_pattern(duo_config, loss_position):
    # every user walks the items in order, so the next item is always the current one + 1
    epochs = 25 if loss_position == "all" else 6
    settings = {
        **duo_config,
        "loss_position": loss_position,
        "epochs": epochs,
        "train_batch_size": 16 if loss_position == "all" else 64,
        "learning_rate": 0.01,
        "stopping_step": epochs,
        "hidden_dropout_prob": 0.1,
        "attn_dropout_prob": 0.1,
    }
    result = run_recbole_ur4rec("DuoRec", "tiny", config_dict=settings, saved=False)
    untrained = untrained_test_ndcg10("DuoRec", "tiny", settings)
    assert result["test_result"]["ndcg@10"] > 0.5 and result["test_result"]["ndcg@10"] > 4 * untrained
