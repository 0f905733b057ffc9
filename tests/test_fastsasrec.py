"""FastSASRec and its backbone: losses at every position, padding, shapes, learning a sequential pattern."""
import math

import pytest
import torch
from model_fixtures import build_model, untrained_test_ndcg10
from recbole.data.interaction import Interaction

from recbole_ur4rec.model import FastSASRec
from recbole_ur4rec.model.layers import LOSS_TYPES, SequenceBackbone, position_loss
from recbole_ur4rec.quick_start import run_recbole_ur4rec
from recbole_ur4rec.registry import get_model


@pytest.fixture
def fast_config(quick_config):
    return {**quick_config, "hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0}


def build(config_dict, **overrides):
    return build_model("FastSASRec", "tiny", {**config_dict, **overrides})


def first_batch(loader):
    return next(iter(loader))


def test_registered_as_plugin_model():
    assert get_model("FastSASRec") is FastSASRec


def test_padding_positions_carry_no_loss(fast_config):
    _, model, train_data, _, _ = build(fast_config, loss_position="all")
    model.eval()  # no dropout: the same input gives the same loss
    batch = first_batch(train_data)
    lengths = batch["item_length"]
    padded = torch.arange(batch["item_id_list"].size(1)).unsqueeze(0) >= lengths.unsqueeze(1)  # [B L]
    assert padded.any() and (~padded).any()
    loss = model.calculate_loss(batch)

    noise = torch.randint(1, model.n_items, batch["item_id_list"].shape)
    changed = Interaction(dict(batch.interaction, item_id_list=torch.where(padded, noise, batch["item_id_list"])))
    assert torch.equal(changed["item_id_list"][~padded], batch["item_id_list"][~padded])
    assert torch.allclose(model.calculate_loss(changed), loss, atol=1e-6)

    # the hidden states of valid positions do not see what follows them, padding included
    hidden = model(batch["item_id_list"], lengths)
    hidden_changed = model(changed["item_id_list"], lengths)
    valid = ~padded[:, : hidden.size(1)]
    assert torch.allclose(hidden[valid], hidden_changed[valid], atol=1e-5)


def test_padded_row_scores_like_the_unpadded_sequence(fast_config):
    _, model, _, _, _ = build(fast_config, loss_position="all")
    model.eval()
    seq = torch.tensor([[3, 4, 5, 0, 0, 0], [7, 8, 9, 10, 11, 12]])
    lengths = torch.tensor([3, 6])
    both = model.backbone.gather_last(model(seq, lengths), lengths)
    alone = model.backbone.gather_last(model(seq[:1, :3], lengths[:1]), lengths[:1])
    assert torch.allclose(both[0], alone[0], atol=1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_position_loss_types_are_finite_and_differentiable(loss_type):
    torch.manual_seed(0)
    hidden = torch.randn(12, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(1, 30, (12,))
    loss = position_loss(hidden, targets, weight, loss_type, neg_sample_num=5)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0
    assert torch.all(weight.grad[0] == 0), "the padding item is never scored"


def test_full_softmax_loss_matches_cross_entropy_over_real_items():
    torch.manual_seed(0)
    hidden, weight = torch.randn(5, 4), torch.randn(9, 4)
    targets = torch.tensor([1, 2, 8, 4, 4])
    expected = torch.nn.functional.cross_entropy(hidden @ weight[1:].t(), targets - 1)
    assert torch.allclose(position_loss(hidden, targets, weight, "CE"), expected)


def test_full_sort_predict_and_predict_shapes(fast_config):
    _, model, _, valid_data, _ = build(fast_config, loss_position="all")
    interaction = first_batch(valid_data)[0]
    scores = model.full_sort_predict(interaction)
    assert scores.shape == (len(interaction), model.n_items)
    assert torch.isfinite(scores).all()
    assert model.predict(interaction).shape == (len(interaction),)


def test_backbone_returns_every_position():
    backbone = SequenceBackbone(20, 10, 16, 2, 2, 32, 0.0, 0.0, "gelu", 1e-12, 0.02)
    seq = torch.randint(1, 20, (4, 10))
    lengths = torch.tensor([10, 3, 5, 1])
    hidden = backbone(seq, lengths)
    assert hidden.shape == (4, 10, 16)
    assert backbone.gather_last(hidden, lengths).shape == (4, 16)
    assert backbone(seq, torch.tensor([2, 3, 1, 1])).shape == (4, 3, 16), "a batch is cut to its longest row"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("loss_type", "MSE", r"config key 'loss_type' must be one of CE, SSM, BPR, BCE, got 'MSE'"),
        ("neg_sample_num", 0, r"config key 'neg_sample_num' must be an int >= 1, got 0"),
        ("MAX_ITEM_LIST_LENGTH", 0, r"config key 'MAX_ITEM_LIST_LENGTH' must be an int >= 1, got 0"),
        ("loss_position", "first", r"config key 'loss_position' must be one of all, last, got 'first'"),
        ("n_heads", 3, r"hidden_size \(16\) must be a multiple of n_heads \(3\)"),
        ("hidden_dropout_prob", 1.5, r"config key 'hidden_dropout_prob' must be a number >= 0 and < 1, got 1.5"),
        ("hidden_act", "elu", r"hidden_act must be one of gelu, relu, swish, tanh, sigmoid, got 'elu'"),
    ],
)
def test_bad_config_values_are_named(fast_config, key, value, message):
    with pytest.raises(ValueError, match=message):
        build(fast_config, **{key: value})


def test_learns_the_sequential_pattern(fast_config):
    # every user walks the items in order, so the next item is always the current one + 1
    settings = {**fast_config, "epochs": 30, "train_batch_size": 16, "learning_rate": 0.01, "stopping_step": 30}
    result = run_recbole_ur4rec("FastSASRec", "tiny", config_dict=settings)
    untrained = untrained_test_ndcg10("FastSASRec", "tiny", settings)
    assert result["test_result"]["ndcg@10"] > 0.6 and result["test_result"]["ndcg@10"] > 4 * untrained


@pytest.mark.parametrize("overrides", [{"loss_position": "last"}, {"loss_type": "SSM", "neg_sample_num": 10}, {"loss_type": "BPR"}])
def test_other_objectives_train(fast_config, overrides):
    result = run_recbole_ur4rec(
        "FastSASRec",
        "tiny",
        config_dict={**fast_config, **overrides, "epochs": 2, "train_batch_size": 16, "learning_rate": 0.01},
        saved=False,
    )
    assert all(math.isfinite(v) for v in result["test_result"].values())

