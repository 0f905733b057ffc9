"""mask_sequence_history: full ranking without each user's earlier items (the S3Rec / ICLRec codebases' protocol),
on RecBole's data path (SASRec) and the plugin's (FastSASRec), checked against the users' sequences in the file."""
import csv
import os

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, write_sequential_dataset

from recbole_ur4rec.build import build, history_masked
from recbole_ur4rec.registry import get_trainer


def settings(data_root, tmp_path, **extra):
    return {**TINY_MODEL, "data_path": data_root, "checkpoint_dir": str(tmp_path / "saved"), "eval_batch_size": 16, **extra}


def sequences(data_root, name="tiny"):
    """{user token: item tokens in time order}, read from the atomic file."""
    rows = {}
    with open(os.path.join(data_root, name, f"{name}.inter")) as f:
        for row in csv.DictReader(f, delimiter="\t"):
            rows.setdefault(row["user_id:token"], []).append((float(row["timestamp:float"]), row["item_id:token"]))
    return {user: [item for _, item in sorted(pairs)] for user, pairs in rows.items()}


@pytest.mark.parametrize("model", ["SASRec", "FastSASRec"])
def test_every_earlier_item_and_nothing_else_leaves_the_ranking(model, tiny_data_root, tmp_path):
    run = build(model, "tiny", config_dict=settings(tiny_data_root, tmp_path, mask_sequence_history=True), log=False)
    assert history_masked(run.config)
    dataset, expected = run.dataset, sequences(tiny_data_root)
    for loader, held_out in ((run.valid_data, 2), (run.test_data, 1)):
        seen = 0
        for interaction, (rows, items), _, _ in loader:
            users = dataset.id2token(dataset.uid_field, interaction[dataset.uid_field].numpy())
            for r, user in enumerate(users):
                masked = set(dataset.id2token(dataset.iid_field, items[rows == r].numpy()))
                assert masked == set(expected[user][:-held_out]), f"user {user}: the items before its target"
                seen += 1
        assert seen == len(expected)


def test_masked_evaluation_never_ranks_an_earlier_item_and_only_gains(tiny_data_root, tmp_path):
    plain = build("FastSASRec", "tiny", config_dict=settings(tiny_data_root, tmp_path / "a"), log=False)
    masked = build("FastSASRec", "tiny", config_dict=settings(tiny_data_root, tmp_path / "b", mask_sequence_history=True), log=False)
    masked.model.load_state_dict(plain.model.state_dict())  # the same weights, two protocols
    results = {}
    for name, run in (("plain", plain), ("masked", masked)):
        trainer = get_trainer(run.config["MODEL_TYPE"], run.config["model"])(run.config, run.model)
        results[name] = trainer.evaluate(run.test_data, load_best_model=False, show_progress=False)
        run.model.eval()
        for batch in run.test_data:
            _, scores, _, _ = trainer._full_sort_batch_eval(batch)
            top = scores.topk(10, dim=1).indices
            rows, items = batch[1] if name == "masked" else masked.test_data.earlier_items(batch[0])
            earlier = torch.zeros_like(scores, dtype=torch.bool)
            earlier[rows, items] = True
            in_top = earlier.gather(1, top).sum().item()
            assert (in_top == 0) if name == "masked" else in_top > 0, name
    assert results["plain"]["hit@10"] <= results["masked"]["hit@10"] and results["plain"]["ndcg@10"] <= results["masked"]["ndcg@10"]


def test_data_with_repeats_and_other_protocols_are_refused(tiny_data_root, tmp_path):
    repeats = write_sequential_dataset(tmp_path / "data", name="loops", n_items=8, min_len=12, max_len=20)
    with pytest.raises(ValueError, match=r"mask_sequence_history: True removes every earlier item.*rows of 'loops' have their target among their earlier items"):
        build("SASRec", "loops", config_dict=settings(repeats, tmp_path, mask_sequence_history=True), log=False)
    plain = build("SASRec", "loops", config_dict=settings(repeats, tmp_path / "plain"), log=False)
    assert not history_masked(plain.config), "RecBole's sequential protocol, the default, ranks earlier items"
    general = build("Pop", "tiny", config_dict=settings(tiny_data_root, tmp_path / "pop", mask_sequence_history=True), log=False)
    assert history_masked(general.config), "general models keep RecBole's masking (mask_history_items), whatever this key says"
    sampled = {"eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "uni100"}}
    ratio = {"eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "mode": "full"}}
    for name, protocol in (("uni", sampled), ("rs", ratio)):
        with pytest.raises(ValueError, match=r"mask_sequence_history: True needs full ranking and leave-one-out"):
            build("SASRec", "loops", config_dict=settings(repeats, tmp_path / name, mask_sequence_history=True, **protocol), log=False)
    with pytest.raises(ValueError, match=r"must be one of True, False"):
        build("SASRec", "loops", config_dict=settings(repeats, tmp_path / "bad", mask_sequence_history="yes"), log=False)


def test_finished_cells_are_evaluated_again_without_earlier_items_and_report_and_pair_like_any_cells(walk_root, tmp_path):
    from tune_fixtures import quick_settings

    from recbole_ur4rec.experiments.compare import run_compare
    from recbole_ur4rec.experiments.paired_users import compare
    from recbole_ur4rec.experiments.reevaluate import reevaluate

    trained_dir, masked_dir = str(tmp_path / "trained"), str(tmp_path / "masked")
    kwargs = dict(models=["SASRec", "FastSASRec"], dataset="walk", seeds=[1], overrides=quick_settings(walk_root, epochs=2))
    trained = run_compare(output_dir=trained_dir, **kwargs)["cells"]
    assert reevaluate(os.path.join(trained_dir, "cells"), masked_dir, {"mask_sequence_history": True}) == {
        "SASRec-seed1": "evaluated", "FastSASRec-seed1": "evaluated"}
    masked_overrides = {**kwargs["overrides"], "mask_sequence_history": True}
    report = run_compare(output_dir=masked_dir, report_only=True, **dict(kwargs, overrides=masked_overrides))
    assert sorted(report["reused"]) == ["FastSASRec-seed1", "SASRec-seed1"], "the re-evaluated cells match the masked settings"
    for name, cell in report["cells"].items():
        before = trained[name]
        assert cell["protocol"]["history_masked"] and not before["protocol"]["history_masked"]
        assert cell["epochs_trained"] == before["epochs_trained"] and cell["evaluated_from"]["model_file"] == before["model_file"]
        assert cell["test_result"]["ndcg@10"] >= before["test_result"]["ndcg@10"] and cell["test_result"] != before["test_result"]
    with open(report["md"]) as f:
        assert "each user's training items removed from the ranking" in f.read()
    pair = compare(os.path.join(masked_dir, "cells"), "FastSASRec", "SASRec")
    assert pair["users"] == 40 and pair["difference"] == pytest.approx(
        report["cells"]["FastSASRec-seed1"]["test_result"]["ndcg@10"] - report["cells"]["SASRec-seed1"]["test_result"]["ndcg@10"], abs=1e-4)
    # paired_users evaluates a metric the users file lacks from the model file, with the cell's evaluation settings
    hits = compare(os.path.join(masked_dir, "cells"), "FastSASRec", "SASRec", metric="hit@10")
    assert hits["difference"] == pytest.approx(
        report["cells"]["FastSASRec-seed1"]["test_result"]["hit@10"] - report["cells"]["SASRec-seed1"]["test_result"]["hit@10"], abs=1e-4)
    # resumable: evaluated cells are kept; a model file that is not on this machine is an error naming it
    assert set(reevaluate(os.path.join(trained_dir, "cells"), masked_dir, {"mask_sequence_history": True}).values()) == {"kept"}
    os.remove(trained["SASRec-seed1"]["model_file"])
    outcome = reevaluate(os.path.join(trained_dir, "cells"), str(tmp_path / "other"), {"mask_sequence_history": True})
    assert outcome["FastSASRec-seed1"] == "evaluated" and "its best model" in outcome["SASRec-seed1"]
    with pytest.raises(ValueError, match="--extra epochs, seed: a trained cell is evaluated again with mask_sequence_history, mask_history_items only"):
        reevaluate(os.path.join(trained_dir, "cells"), masked_dir, {"seed": 3, "epochs": 9})
