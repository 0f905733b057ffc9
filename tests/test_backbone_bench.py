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
