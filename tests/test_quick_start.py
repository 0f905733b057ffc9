"""Quick start on a RecBole model, checkpoint round trip, refusal of unsafe checkpoints, resume."""
import importlib.util
import math
import os

import pytest
import torch
from model_fixtures import assert_best_file_holds, count_checkpoint_reads

from recbole_ur4rec.common.checkpoint_io import CheckpointError, load_checkpoint
from recbole_ur4rec.quick_start import evaluate_checkpoint, load_data_and_model, run_recbole_ur4rec

METRICS = [f"{m}@{k}" for m in ("hit", "ndcg", "mrr") for k in (5, 10, 20)]


@pytest.fixture
def sasrec_run(quick_config):
    return run_recbole_ur4rec("SASRec", "tiny", config_dict=quick_config)


def test_quick_start_returns_recbole_result(sasrec_run):
    assert set(sasrec_run) >= {"best_valid_score", "best_valid_result", "test_result", "valid_score_bigger", "model_file"}
    assert sasrec_run["valid_score_bigger"] is True
    for split in ("best_valid_result", "test_result"):
        overall = {k: v for k, v in sasrec_run[split].items() if "/" not in k}  # besides the evaluation slices
        assert set(overall) == set(METRICS)
        assert all(math.isfinite(v) and 0 <= v <= 1 for v in overall.values())
    assert sasrec_run["best_valid_score"] == sasrec_run["best_valid_result"]["ndcg@10"]


def test_checkpoint_holds_only_plain_data_and_round_trips(sasrec_run, tmp_path):
    model_file = sasrec_run["model_file"]
    state = torch.load(model_file, weights_only=True)  # would raise on any pickled object
    assert state["model"] == "SASRec" and state["dataset"] == "tiny"
    # the data root and checkpoint folder are stored relative to the file's folder: no path of this machine
    assert (state["config"]["data_path"], state["config"]["checkpoint_dir"]) == (os.path.join("..", "data"), ".")
    assert str(tmp_path).encode() not in open(model_file, "rb").read()
    loaded = load_checkpoint(model_file)["config"]
    assert (loaded["data_path"], loaded["checkpoint_dir"]) == (str(tmp_path / "data"), str(tmp_path / "saved"))

    config, model, _, _, _, _ = load_data_and_model(model_file)
    assert config["model"] == "SASRec"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state["state_dict"][name]), name
    # the best model was reloaded for the test evaluation: re-evaluating the checkpoint gives the same numbers
    assert evaluate_checkpoint(model_file)["test_result"] == sasrec_run["test_result"]


def test_a_moved_tree_of_data_and_checkpoints_reads_where_it_lies(sasrec_run, tmp_path):
    """A results tree copied elsewhere (a committed search read by another checkout) finds its data there."""
    import shutil

    moved = tmp_path / "elsewhere"
    for folder in ("data", "saved"):
        shutil.copytree(tmp_path / folder, moved / folder)
    shutil.rmtree(tmp_path / "data")  # the original data is gone: only the moved copy can be read
    moved_file = str(moved / "saved" / os.path.basename(sasrec_run["model_file"]))
    config, _, _, _, _, _ = load_data_and_model(moved_file)
    assert config["data_path"] == str(moved / "data" / "tiny")
    assert evaluate_checkpoint(moved_file)["test_result"] == sasrec_run["test_result"]

    # a checkpoint moved alone does not find its data: a clear error, and data_path (--data_path) says where it is
    alone = tmp_path / "archive" / "deep"
    os.makedirs(alone)
    alone_file = str(alone / os.path.basename(moved_file))
    shutil.copy(moved_file, alone_file)
    with pytest.raises(FileNotFoundError, match=r"archive/data/tiny holds no atomic interaction file"):
        load_data_and_model(alone_file)
    assert evaluate_checkpoint(alone_file, data_path=str(moved / "data"))["test_result"] == sasrec_run["test_result"]
    spec = importlib.util.spec_from_file_location("cli", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run_recbole_ur4rec.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--checkpoint", alone_file, f"--data_path={moved / 'data'}"])["test_result"] == sasrec_run["test_result"]
    with pytest.raises(SystemExit, match=r"drop \['epochs'\] \(only --data_path"):
        cli.main(["--checkpoint", alone_file, "--epochs=3"])


class RunsCodeWhenUnpickled:
    marker = None

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused_not_executed(tmp_path):
    RunsCodeWhenUnpickled.marker = str(tmp_path / "executed")
    path = tmp_path / "evil.pth"
    torch.save({"format": "recbole_ur4rec.checkpoint/1", "payload": RunsCodeWhenUnpickled()}, path)
    with pytest.raises(CheckpointError, match=r"evil.pth holds pickled Python objects \(io.open\), which recbole_ur4rec refuses"):
        load_checkpoint(path)
    assert not os.path.exists(RunsCodeWhenUnpickled.marker)


def test_recbole_checkpoint_with_pickled_config_is_refused(tmp_path, quick_config):
    from recbole.config import Config

    config = Config("SASRec", "tiny", config_dict={**quick_config, "train_neg_sample_args": None})
    path = tmp_path / "recbole.pth"
    torch.save({"config": config, "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(path)


def test_corrupt_and_foreign_checkpoints_are_clear_errors(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt.pth is corrupt or not a torch file"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pth is not a recbole_ur4rec checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")


class Interrupted(Exception):
    pass


def test_resume_after_interruption_matches_uninterrupted_run(quick_config, tmp_path):
    settings = {**quick_config, "epochs": 6, "stopping_step": 100}
    uninterrupted = run_recbole_ur4rec("SASRec", "tiny", config_dict={**settings, "checkpoint_dir": str(tmp_path / "a")})

    def stop_after_epoch_2(epoch_idx, valid_score):
        if epoch_idx == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_recbole_ur4rec(
            "SASRec", "tiny", config_dict={**settings, "checkpoint_dir": str(tmp_path / "b")}, callback_fn=stop_after_epoch_2
        )
    (last_file,) = [f for f in os.listdir(tmp_path / "b") if f.endswith("-last.pth")]
    assert load_checkpoint(tmp_path / "b" / last_file)["epoch"] == 2

    epochs_run = []
    resumed = run_recbole_ur4rec(
        resume_file=str(tmp_path / "b" / last_file), callback_fn=lambda epoch, score: epochs_run.append(epoch)
    )
    assert epochs_run == [3, 4, 5], "training continues after the last saved epoch"
    assert resumed["test_result"] == uninterrupted["test_result"]
    assert resumed["best_valid_result"] == uninterrupted["best_valid_result"]
    for run in (uninterrupted, resumed):
        assert_best_file_holds(run, uninterrupted)
    # the run went on in its own two files: no stale pair per resumed segment
    assert sorted(os.listdir(tmp_path / "b")) == sorted([last_file, last_file.replace("-last.pth", ".pth")])
    assert load_checkpoint(tmp_path / "b" / last_file)["epoch"] == 5
    # resumed into another checkpoint folder, the run writes its own files there and leaves the resumed ones alone
    before = {name: os.path.getmtime(tmp_path / "b" / name) for name in os.listdir(tmp_path / "b")}
    elsewhere = run_recbole_ur4rec(resume_file=str(tmp_path / "b" / last_file), config_dict={"checkpoint_dir": str(tmp_path / "c")})
    assert {name: os.path.getmtime(tmp_path / "b" / name) for name in os.listdir(tmp_path / "b")} == before
    assert os.path.dirname(elsewhere["model_file"]) == str(tmp_path / "c")
    assert elsewhere["test_result"] == uninterrupted["test_result"]
    # the best-model files name the best epoch, also where a finished run's best was re-saved on resuming
    best_epoch = load_checkpoint(uninterrupted["model_file"])["epoch"]
    assert 0 <= best_epoch and load_checkpoint(elsewhere["model_file"])["epoch"] == load_checkpoint(resumed["model_file"])["epoch"] == best_epoch


def test_callbacks_get_the_keywords_they_name(quick_config):
    named, catch_all = [], []
    run_recbole_ur4rec("SASRec", "tiny", config_dict={**quick_config, "epochs": 2}, saved=False,
                       callback_fn=lambda epoch_idx, valid_score, validation: named.append(validation))
    run_recbole_ur4rec("SASRec", "tiny", config_dict={**quick_config, "epochs": 2}, saved=False,
                       callback_fn=lambda epoch_idx, valid_score, **extra: catch_all.append(extra))
    assert [record["epoch"] for record in named] == [0, 1] and set(named[0]) == {"epoch", "score", "train_loss", "result", "seconds"}
    assert [sorted(extra) for extra in catch_all] == [["valid_result", "validation"]] * 2
    assert catch_all[1]["validation"]["score"] == catch_all[1]["valid_result"]["ndcg@10"]


def test_resume_refuses_a_checkpoint_of_another_model(sasrec_run):
    with pytest.raises(CheckpointError, match="was written for model 'SASRec', but model 'GRU4Rec'"):
        run_recbole_ur4rec(model="GRU4Rec", resume_file=sasrec_run["model_file"])


def test_recboles_feature_aware_sasrecf_saves_a_safe_checkpoint_and_reloads(tmp_path):
    """SASRecF names a submodule in other_parameter: its weights travel in the state_dict, not as a pickled module."""
    from ur4rec_fixtures import write_genre_dataset

    root = write_genre_dataset(tmp_path / "data", n_users=60, n_items=120)
    settings = {
        "data_path": root, "epochs": 2, "state": "WARNING", "show_progress": False, "checkpoint_dir": str(tmp_path / "saved"),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "class"]}, "selected_features": ["class"],
        "hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1, "train_batch_size": 64,
    }
    result = run_recbole_ur4rec("SASRecF", "genre", config_dict=settings)
    state = load_checkpoint(result["model_file"])
    assert any(name.startswith("feature_embed_layer.") for name in state["state_dict"])
    assert evaluate_checkpoint(result["model_file"])["test_result"] == result["test_result"]


def test_a_resume_state_the_caller_read_is_not_read_again(sasrec_run, monkeypatch):
    """A resumed search trial reads its -last.pth to check its values and hands the state on: one read in all."""
    last_file = sasrec_run["model_file"].replace(".pth", "-last.pth")
    state = load_checkpoint(last_file)
    reads = count_checkpoint_reads(monkeypatch)
    resumed = run_recbole_ur4rec(resume_file=last_file, resume_state=state)
    assert str(last_file) not in reads
    assert resumed["test_result"] == sasrec_run["test_result"]
