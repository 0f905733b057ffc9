"""The cold-item protocol: cold items are only evaluation targets; none of their interactions reaches training rows,
user texts, FTRagRec's memory or a federated client; the slice ``cold`` reports the users with a cold target."""
import re

import pytest
import torch
from model_fixtures import build_model
from ur4rec_fixtures import ur4rec_config, write_genre_dataset

from recbole_ur4rec.data.sequence_dataset import target_list_field
from recbole_ur4rec.federated import ClientData
from recbole_ur4rec.quick_start import run_recbole_ur4rec

COLD = {"cold_items": True, "cold_item_share": 0.3, "cold_item_seed": 1}


def eval_targets(*loaders):
    return torch.cat([loader._dataset.inter_feat["item_id"] for loader in loaders])


def items_in(rows, *fields):
    return torch.cat([rows.inter_feat[f].flatten() for f in fields if f in rows.inter_feat])


@pytest.mark.parametrize("model", ["FastSASRec", "SASRec"])
def test_cold_items_are_only_evaluation_targets(quick_config, model):
    config, _, train_data, valid_data, test_data = build_model(model, "tiny", {**quick_config, **COLD})
    cold = valid_data.training_counts.cold
    targets = eval_targets(valid_data, test_data)
    assert len(cold) >= 1 and torch.isin(cold, targets).all(), "cold items are drawn from the evaluation targets"
    train_items = items_in(train_data._dataset, "item_id", "item_id_list", target_list_field(config))
    assert not torch.isin(train_items, cold).any(), "no training row holds a cold item"
    assert (valid_data.training_counts.items[cold] == 0).all()
    # evaluation inputs: no cold item in a history before its user's held-out interactions
    history = valid_data._dataset.inter_feat["item_id_list"]
    assert not torch.isin(history, cold).any()
    # seeded: the same cold items again; another seed draws others
    again = build_model(model, "tiny", {**quick_config, **COLD})[3].training_counts.cold
    other = build_model(model, "tiny", {**quick_config, **COLD, "cold_item_seed": 2})[3].training_counts.cold
    assert torch.equal(again, cold) and not torch.equal(other, cold)


def test_the_cold_slice_counts_the_users_with_a_cold_target(quick_config):
    result = run_recbole_ur4rec("FastSASRec", "tiny", config_dict={**quick_config, **COLD})
    config, _, _, _, test_data = build_model("FastSASRec", "tiny", {**quick_config, **COLD})
    expected = int(torch.isin(test_data._dataset.inter_feat["item_id"], test_data.training_counts.cold).sum())
    assert result["test_result"]["users/cold"] == expected > 0
    assert "ndcg@10/cold" in result["test_result"]
    plain = run_recbole_ur4rec("FastSASRec", "tiny", config_dict=quick_config)
    assert "users/cold" not in plain["test_result"]


def test_no_cold_interaction_reaches_ftragrecs_memory(quick_config):
    settings = {**quick_config, **COLD, "stages": ["retriever"], "index_type": "flat", "threads": 1}
    _, model, _, valid_data, _ = build_model("FTRagRec", "tiny", settings)
    model.refresh_memory(force=True)
    cold = valid_data.training_counts.cold
    assert len(model.memory) > 0 and not torch.isin(model.memory.targets.long(), cold).any()
    user, item_seq, targets, length, starts = model._memory_rows
    assert not torch.isin(item_seq, cold).any() and not torch.isin(targets, cold).any()


def test_no_cold_interaction_reaches_a_federated_client(quick_config):
    config, _, train_data, valid_data, _ = build_model("FedDMMR", "tiny", {**quick_config, **COLD, "use_text": False})
    clients = ClientData(train_data._dataset, target_list_field(config))
    cold = valid_data.training_counts.cold
    assert not torch.isin(clients.item_seq, cold).any() and not torch.isin(clients.targets, cold).any()


def test_no_cold_interaction_reaches_a_user_text(tmp_path):
    from recbole_ur4rec.features.item_text import item_titles_and_genres
    from recbole_ur4rec.features.pipeline import user_texts_of

    root = write_genre_dataset(tmp_path / "data", n_users=60, n_items=120)
    settings = ur4rec_config(root, tmp_path / "cache", tmp_path / "saved", **COLD, user_text_recent_items=8)
    config, _, train_data, valid_data, _ = build_model("UR4Rec", "genre", settings)
    cold = valid_data.training_counts.cold.tolist()
    tokens = train_data._dataset.field2id_token["item_id"]
    titles, _ = item_titles_and_genres(config)
    _, _, texts, _ = user_texts_of(config, train_data._dataset.training_split)
    cold_titles = [titles[tokens[i]] for i in cold if tokens[i] in titles]
    assert cold_titles
    assert not any(re.search(re.escape(t) + r"\b", text) for t in cold_titles for text in texts)


def test_the_protocol_needs_leave_one_out(quick_config):
    with pytest.raises(ValueError, match="cold_items' needs the leave-one-out split"):
        build_model("FastSASRec", "tiny", {**quick_config, **COLD, "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": "user", "mode": "full"}})


def test_the_split_is_decided_after_the_cold_items_are_removed(quick_config, tmp_path):
    """A user whose history shrinks below four interactions when cold items are removed holds out fewer interactions
    (RecBole keeps one training row): its validation item, a cold one, would become a training target if the split
    were the one decided before the removal. ``u_short`` has 5 interactions, two of them other users' cold targets;
    after their removal it is left with 3 (n, its cold validation item, its cold test item)."""
    folder = tmp_path / "shrink" / "shrink"
    folder.mkdir(parents=True)
    sequences = {"u_short": ["a", "b", "n0", "v", "t"]}  # a, b: other users' held-out items; v, t: its own
    for user, (valid, test) in enumerate([("a", "x0"), ("b", "x1"), ("y0", "y1"), ("y2", "y3")]):
        sequences[f"u{user}"] = [f"n{k}" for k in range(1, 7)] + [valid, test]
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    lines += [f"{user}\t{item}\t{step}" for user, items in sequences.items() for step, item in enumerate(items)]
    (folder / "shrink.inter").write_text("\n".join(lines) + "\n")
    settings = {**quick_config, "data_path": str(tmp_path / "shrink"), "cold_items": True, "cold_item_share": 1.0}
    _, _, train_data, valid_data, test_data = build_model("FastSASRec", "shrink", settings)
    dataset = train_data._dataset
    cold_tokens = set(dataset.id2token(dataset.iid_field, valid_data.training_counts.cold.numpy()))
    assert {"a", "b", "v", "t", "x0", "y3"} <= cold_tokens  # share 1.0: every held-out item of the first split
    train_items = items_in(dataset, "item_id", "item_id_list", target_list_field(train_data.config))
    assert not torch.isin(train_items, valid_data.training_counts.cold).any(), "a cold item reached a training row"
    # u_short keeps no cold interaction outside its held-out ones: v, then t, went as its history shrank
    user = dataset.token2id(dataset.uid_field, "u_short")
    evaluated = torch.cat([loader._dataset.inter_feat[dataset.uid_field] for loader in (valid_data, test_data)])
    assert user not in evaluated.tolist()
    # the other users are untouched: their held-out items are still evaluated
    assert len(valid_data._dataset.inter_feat) == len(test_data._dataset.inter_feat) == 4
