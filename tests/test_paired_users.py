"""recbole_ur4rec/experiments/paired_users.py: two comparisons' model files evaluated user by user, paired bootstrap over users."""
import json
import math
import os
import statistics

import numpy as np
import pytest
from model_fixtures import ranks_by_hand
from tune_fixtures import quick_settings

from recbole_ur4rec.experiments import paired_users
from recbole_ur4rec.experiments.compare import run_compare
from recbole_ur4rec.quick_start import load_data_and_model


def test_bootstrap_of_known_differences():
    mean, se, low, high, other_side = paired_users.paired_bootstrap(np.full(50, 0.01))
    assert (mean, se, other_side) == (pytest.approx(0.01), pytest.approx(0.0, abs=1e-12), 0.0)
    assert low == pytest.approx(0.01) and high == pytest.approx(0.01)

    noise = np.random.default_rng(1).normal(0.0, 1.0, 2000)
    mean, se, low, high, other_side = paired_users.paired_bootstrap(noise)
    assert se == pytest.approx(noise.std(ddof=1) / np.sqrt(len(noise)), rel=0.1)  # the standard error of a mean
    assert low < 0 < high and low < mean < high and 0.05 < other_side < 0.95
    mean, _, low, _, other_side = paired_users.paired_bootstrap(noise + 0.3)
    assert mean == pytest.approx(noise.mean() + 0.3) and low > 0 and other_side == 0.0


def test_two_models_cells_compared_user_by_user(walk_root, tmp_path):
    output_dir = str(tmp_path / "compare")
    run_compare(models=["SASRec", "GRU4Rec"], dataset="walk", seeds=[1, 2], overrides=quick_settings(walk_root, epochs=2), output_dir=output_dir)
    cells = os.path.join(output_dir, "cells")

    paired_users.main(["--cells", cells, "--models", "SASRec,GRU4Rec"])
    with open(os.path.join(output_dir, "paired_SASRec_GRU4Rec_test.json")) as f:
        result = json.load(f)
    assert result["seeds"] == [1, 2] and result["users"] == 40  # every user of walk, once
    for model in ("SASRec", "GRU4Rec"):
        recorded = [json.load(open(paired_users.cell_file(cells, model, seed)))["test_result"]["ndcg@10"] for seed in (1, 2)]
        assert [round(v, 4) for v in result["seed_means"][model]] == recorded  # each file re-evaluated to its cell's value
        assert result["mean"][model] == pytest.approx(statistics.fmean(result["seed_means"][model]))
    assert result["difference"] == pytest.approx(result["mean"]["SASRec"] - result["mean"]["GRU4Rec"])
    low, high = result["interval_95"]
    assert low <= result["difference"] <= high
    assert "paired bootstrap over the 40 users" in open(os.path.join(output_dir, "paired_SASRec_GRU4Rec_test.md")).read()

    # each cell recorded each user's own value (NDCG@10 of the rank of their target, by hand) with its best weights
    cell_path = paired_users.cell_file(cells, "GRU4Rec", 1)
    cell = json.load(open(cell_path))
    assert cell["user_values"] == os.path.relpath(paired_users.users_file(cell_path)) and cell["code"]["source"]
    _, model, dataset, _, valid_data, test_data = load_data_and_model(cell["model_file"])
    for split, eval_data in (("test", test_data), ("valid", valid_data)):
        values = paired_users.cell_values(cell_path, split, "ndcg@10")
        users, ranks = ranks_by_hand(model, eval_data)
        by_hand = {token: 1 / math.log2(r + 1) if r <= 10 else 0.0 for token, r in zip(dataset.id2token("user_id", users.numpy()), ranks.tolist())}
        assert values.keys() == by_hand.keys() and all(values[u] == pytest.approx(by_hand[u]) for u in values)
        assert len(set(values.values())) > 2, "users differ"

    # a cell without its users file (an older run) has its model file re-evaluated, and the file written: same values
    recorded = json.load(open(paired_users.users_file(cell_path)))
    os.remove(paired_users.users_file(cell_path))
    assert paired_users.cell_values(cell_path, "valid", "ndcg@10") == dict(zip(recorded["valid"]["users"], recorded["valid"]["ndcg@10"]))
    assert json.load(open(paired_users.users_file(cell_path))) == {"valid": recorded["valid"]}
    paired_users.cell_values(cell_path, "test", "hit@10")  # another metric joins the same users
    assert set(json.load(open(paired_users.users_file(cell_path)))["valid"]) == {"users", "ndcg@10"}
    assert set(json.load(open(paired_users.users_file(cell_path)))["test"]) == {"users", "hit@10"}

    # a cell whose recorded value its users' values do not give is refused, and so is one with neither file
    path = paired_users.cell_file(cells, "GRU4Rec", 2)
    cell = json.load(open(path))
    json.dump({**cell, "test_result": {**cell["test_result"], "ndcg@10": cell["test_result"]["ndcg@10"] + 0.01}}, open(path, "w"))
    with pytest.raises(SystemExit, match="GRU4Rec-seed2.json recorded .*not the cell's model"):
        paired_users.compare(cells, "SASRec", "GRU4Rec")
    os.remove(paired_users.users_file(path))  # the model file gives the same values: still refused, nothing written
    with pytest.raises(SystemExit, match="GRU4Rec-seed2.json recorded .*not the cell's model"):
        paired_users.compare(cells, "SASRec", "GRU4Rec")
    assert not os.path.exists(paired_users.users_file(path))
    os.remove(cell["model_file"])
    with pytest.raises(SystemExit, match="no test ndcg@10 in .*GRU4Rec-seed2.users.json and its model_file .* is not here"):
        paired_users.compare(cells, "SASRec", "GRU4Rec")
    assert paired_users.compare(cells, "SASRec", "GRU4Rec", seeds=[1])["seeds"] == [1]  # the named seeds only
    with pytest.raises(SystemExit, match="--seeds 3: no finished cell for both SASRec and GRU4Rec .*both finished: 1, 2"):
        paired_users.compare(cells, "SASRec", "GRU4Rec", seeds=[1, 3])
    with pytest.raises(SystemExit, match="no seed has a finished cell for both SASRec and BERT4Rec"):
        paired_users.compare(cells, "SASRec", "BERT4Rec")
