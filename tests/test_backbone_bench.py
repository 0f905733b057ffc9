"""bench/backbone.py: a resumable cell continues exactly where it was interrupted."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import backbone  # noqa: E402


def test_an_interrupted_cell_continues_to_the_same_curve_and_test(quick_config, tmp_path):
    """Stopped after 2 validations and run again, a cell gives the uninterrupted run's validations and test."""
    settings = {**quick_config, "epochs": 4, "eval_step": 1, "stopping_step": 10}
    run = lambda state_dir, stop_after=None: backbone.run_cell(  # noqa: E731
        "SASRec", "tiny", 2020, 0, 1, settings, state_dir=str(state_dir), stop_after=stop_after
    )
    whole = run(tmp_path / "whole")
    assert run(tmp_path / "resumed", stop_after=2) is None
    resumed = run(tmp_path / "resumed")
    assert whole["segments"] == 1 and resumed["segments"] == 2
    assert len([name for name in os.listdir(tmp_path / "resumed") if name.endswith(".pth")]) == 2  # one pair, continued
    assert [(epoch, score) for _, epoch, score in resumed["curve"]] == [(epoch, score) for _, epoch, score in whole["curve"]]
    assert [epoch for _, epoch, _ in whole["curve"]] == [0, 1, 2, 3]
    assert resumed["full_epochs"] == whole["full_epochs"] == 4
    assert (resumed["test_ndcg10"], resumed["test_hit10"]) == (whole["test_ndcg10"], whole["test_hit10"])
    assert resumed["best_valid_ndcg10"] == max(score for _, _, score in whole["curve"])
    times = [seconds for seconds, _, _ in resumed["curve"]]
    assert times == sorted(times)  # seconds of training count on across the two calls


def test_a_relative_state_dir_means_the_callers_folder(quick_config, tmp_path):
    """The cell's process runs in the work folder: the state must still land where the caller named it."""
    import argparse

    settings = {**quick_config, "epochs": 1}
    os.makedirs(tmp_path / "work")
    args = argparse.Namespace(
        state_dir="state", workdir=str(tmp_path / "work"), first_seed=2020, seeds=1, dataset="tiny", budget_minutes=0,
        threads=1, config=settings, model_config={"SASRec:one_layer": {"n_layers": 1}},
    )
    os.chdir(tmp_path)
    (result,) = backbone.run_cell_subprocess("SASRec:one_layer", args)  # a variant: its own cell, its own settings
    assert result["config"] == {**settings, "n_layers": 1}
    cell_dir = tmp_path / "state" / "SASRec_one_layer-seed2020"
    assert sorted(os.listdir(cell_dir)) == ["progress.json", "result.json"]  # its checkpoints went with the finish
    assert not os.path.exists(tmp_path / "work" / "state")
    # a rerun reads the finished cell back instead of training it again, and refuses it for other settings
    assert backbone.run_cell_subprocess("SASRec:one_layer", args) == [result]
    args.model_config = {"SASRec:one_layer": {"n_layers": 2}}
    with pytest.raises(SystemExit, match=r"SASRec_one_layer-seed2020/result.json was made with .*'n_layers': 1"):
        backbone.run_cell_subprocess("SASRec:one_layer", args)


def test_the_table_from_a_comparisons_cells(quick_config, tmp_path):
    """run_compare cells keep their validation curve; the benchmark's table is built from them without training."""
    from recbole_ur4rec.experiments.compare import run_compare

    settings = {key: value for key, value in quick_config.items() if key != "checkpoint_dir"}
    output_dir = str(tmp_path / "compare")
    run_compare(models=["SASRec", "FastSASRec"], dataset="tiny", seeds=[2020], overrides={**settings, "threads": 1}, output_dir=output_dir)
    cells = os.path.join(output_dir, "cells")
    output = str(tmp_path / "bench.md")
    backbone.main(["--dataset", "tiny", "--from_cells", cells, "--models", "SASRec,FastSASRec", "--seeds", "1", "--output", output])
    results = backbone.read_json(os.path.splitext(output)[0] + ".json")["results"]
    for label in ("SASRec", "FastSASRec"):
        cell = backbone.read_json(os.path.join(cells, f"{label}-seed2020.json"))
        (row,) = results[label]
        assert [v["epoch"] for v in cell["validations"]] == [0, 1, 2]
        seconds = [v["seconds"] for v in cell["validations"]]
        assert seconds == sorted(seconds) and seconds[0] > 0
        assert row["best_valid_ndcg10"] == cell["valid_result"]["ndcg@10"] == max(v["score"] for v in cell["validations"])
        assert row["test_ndcg10"] == cell["test_result"]["ndcg@10"] and row["curve"] == [[v["seconds"], v["epoch"], v["score"]] for v in cell["validations"]]
    with open(output) as f:
        text = f.read()
    target = results["SASRec"][0]["best_valid_ndcg10"]
    assert f"= {target:.4f}." in text and "Time to target, FastSASRec / SASRec:" in text and "s / epoch includes validation" in text
    with pytest.raises(SystemExit, match=r"GRU4Rec-seed2020.json: no finished cell"):
        backbone.main(["--dataset", "tiny", "--from_cells", cells, "--models", "SASRec,GRU4Rec", "--seeds", "1", "--output", output])
