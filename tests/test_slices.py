"""Evaluation slices: groups known by construction, and per-group metrics equal to metrics of those rows alone."""

import numpy as np
import pytest
import torch
from model_fixtures import build_model, ranks_by_hand

from recbole_ur4rec.evaluation.slices import TrainingCounts, head_items, row_metrics, slice_masks
from recbole_ur4rec.quick_start import run_recbole_ur4rec
from recbole_ur4rec.registry import get_trainer


def test_head_is_the_most_interacted_share_with_ties_by_id():
    counts = torch.tensor([0, 5, 9, 9, 1, 0, 2, 7, 3, 4, 8])  # item 0 is padding; 10 items
    head = head_items(counts, 0.2)
    assert head.tolist() == [False, False, True, True] + [False] * 7  # 9, 9: items 2 and 3
    assert head_items(counts, 0.3).nonzero().flatten().tolist() == [2, 3, 10]
    assert head_items(counts, 0.25).sum() == 3  # ceil(2.5)


def test_groups_by_target_popularity_and_history_length():
    counts = TrainingCounts(items=torch.tensor([0, 10, 1, 1, 1, 1]), users=torch.tensor([0, 2, 3, 8, 9]))
    users, targets = torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 1, 5])
    masks = slice_masks(counts, users, targets, head_share=0.2)  # head: item 1 only
    assert masks["head"].tolist() == [True, False, True, False] and masks["tail"].tolist() == [False, True, False, True]
    # median of (2, 3, 8, 9) is 3 (torch's lower median): short = at most 3
    assert masks["short"].tolist() == [True, True, False, False] and masks["long"].tolist() == [False, False, True, True]
    assert set(slice_masks(counts, users, None, 0.2)) == {"short", "long"}, "no popularity groups without one target per row"


@pytest.fixture
def settings(quick_config):
    return {**quick_config, "epochs": 2, "hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0}


def test_slice_metrics_equal_the_metrics_of_the_groups_rows(settings):
    config, model, train_data, _, test_data = build_model("FastSASRec", "tiny", settings)
    trainer = get_trainer(config["MODEL_TYPE"], "FastSASRec")(config, model)
    trainer.fit(train_data, None, saved=False)
    result = trainer.evaluate(test_data, load_best_model=False)

    users, ranks = ranks_by_hand(model, test_data)  # by hand: the rank of every row's target
    targets = test_data._dataset.inter_feat["item_id"]
    masks = slice_masks(test_data.training_counts, users, targets, config["slice_head_share"])
    assert set(masks) == {"head", "tail", "short", "long"}
    ndcg10 = torch.where(ranks <= 10, 1 / torch.log2(ranks.double() + 1), torch.zeros_like(ranks, dtype=torch.double))
    for group, mask in masks.items():
        assert result[f"users/{group}"] == int(mask.sum()) > 0
        assert result[f"ndcg@10/{group}"] == pytest.approx(ndcg10[mask].mean().item(), abs=1e-4)
        assert result[f"hit@10/{group}"] == pytest.approx((ranks[mask] <= 10).double().mean().item(), abs=1e-4)
    assert result["ndcg@10"] == pytest.approx(ndcg10.mean().item(), abs=1e-4)
    assert result["users/head"] + result["users/tail"] == len(users) == result["users/short"] + result["users/long"]

    # every evaluated user's own values, by RecBole's metric classes, with slices on or off
    for slices in (True, False):
        trainer.config["eval_slices"], trainer.last_evaluated_rows = slices, None
        trainer.evaluate(test_data, load_best_model=False)
        rows = trainer.last_evaluated_rows
        assert torch.equal(rows.users, users)
        per_user = row_metrics(trainer.evaluator, rows.struct)
        assert np.allclose(per_user["ndcg@10"], ndcg10.numpy()) and np.array_equal(per_user["hit@10"], (ranks <= 10).numpy())
    trainer.evaluate(None)
    assert trainer.last_evaluated_rows is None, "an evaluation without rows leaves none of an earlier one"


def test_per_user_values_refuse_a_metric_computed_over_all_users(settings):
    config, model, _, _, test_data = build_model("FastSASRec", "tiny", {**settings, "metrics": ["Hit", "ShannonEntropy"]})
    trainer = get_trainer(config["MODEL_TYPE"], "FastSASRec")(config, model)
    result = trainer.evaluate(test_data, load_best_model=False)
    assert "shannonentropy@10" in result
    with pytest.raises(ValueError, match="'metrics' names 'shannonentropy', which RecBole computes over all users"):
        row_metrics(trainer.evaluator, trainer.last_evaluated_rows.struct)


def test_slices_are_reported_for_recboles_models_and_can_be_switched_off(settings):
    result = run_recbole_ur4rec("SASRec", "tiny", config_dict=settings)
    assert {"ndcg@10/tail", "users/tail", "ndcg@10/long"} <= set(result["test_result"])
    off = run_recbole_ur4rec("SASRec", "tiny", config_dict={**settings, "eval_slices": False})
    assert not any("/" in key for key in off["test_result"])
    assert off["test_result"]["ndcg@10"] == result["test_result"]["ndcg@10"]
    with pytest.raises(ValueError, match="slice_head_share"):
        run_recbole_ur4rec("SASRec", "tiny", config_dict={**settings, "slice_head_share": 1.5})
