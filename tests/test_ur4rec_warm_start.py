"""UR4Rec's backbone_checkpoint: the backbone loaded from a UR4Rec or FastSASRec run, the pretrain_backbone stage
replaced by one validation of the loaded backbone that competes for the run's best, and clear errors."""
import pytest
import torch
from model_fixtures import build_model
from ur4rec_fixtures import ur4rec_config, write_genre_dataset

from recbole_ur4rec.common.checkpoint_io import CheckpointError, load_checkpoint
from recbole_ur4rec.quick_start import run_recbole_ur4rec
from recbole_ur4rec.trainer import UR4RecTrainer


@pytest.fixture(scope="module")
def genre_root(tmp_path_factory):
    return write_genre_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def backbone_run(genre_root, cache_dir, tmp_path_factory):
    """A UR4Rec run of the backbone stage alone: its best file holds the backbone and its validation score."""
    settings = ur4rec_config(genre_root, cache_dir, tmp_path_factory.mktemp("source"), stages=["pretrain_backbone"])
    return run_recbole_ur4rec("UR4Rec", "genre", config_dict=settings)


@pytest.fixture
def settings(genre_root, cache_dir, tmp_path):
    return ur4rec_config(genre_root, cache_dir, tmp_path / "saved", stages=["pretrain_backbone", "pretrain_retriever"])


def backbone_tensors(state_dict):
    return {name: tensor for name, tensor in state_dict.items() if name.startswith("backbone.")}


def test_loads_the_backbone_and_replaces_its_stage_by_one_validation(settings, backbone_run):
    source = backbone_tensors(load_checkpoint(backbone_run["model_file"])["state_dict"])
    config, model, *_ = build_model("UR4Rec", "genre", {**settings, "backbone_checkpoint": backbone_run["model_file"]})
    own = model.state_dict()
    assert source and all(torch.equal(own[name], tensor) for name, tensor in source.items())
    stages = UR4RecTrainer(config, model).stages
    assert [(s.name, s.epochs, s.validate_loaded) for s in stages] == [
        ("pretrain_backbone", 0, True), ("pretrain_retriever", settings["stage_epochs"]["pretrain_retriever"], False)
    ]
    _, cold, *_ = build_model("UR4Rec", "genre", settings)
    assert cold.warm_started is None
    assert [(s.name, s.validate_loaded) for s in UR4RecTrainer(config, cold).stages][0] == ("pretrain_backbone", False)


def test_the_loaded_backbone_is_validated_and_can_be_the_run_best(settings, backbone_run, tmp_path):
    """With no retriever epoch the run's best is the loaded backbone: the same validation as the source run's, the
    same weights in the best file, and its test result."""
    run = run_recbole_ur4rec(
        "UR4Rec", "genre", config_dict={**settings, "backbone_checkpoint": backbone_run["model_file"],
                                        "stage_epochs": {**settings["stage_epochs"], "pretrain_retriever": 0}},
    )
    assert run["best_valid_result"] == backbone_run["best_valid_result"]
    assert run["test_result"] == backbone_run["test_result"]
    best = load_checkpoint(run["model_file"])
    assert best["best_valid_score"] == backbone_run["best_valid_score"]
    source = backbone_tensors(load_checkpoint(backbone_run["model_file"])["state_dict"])
    assert all(torch.equal(best["state_dict"][name], tensor) for name, tensor in source.items())


def test_a_warm_started_run_trains_the_retriever_after_the_loaded_validation(settings, backbone_run):
    scores = []
    run = run_recbole_ur4rec(
        "UR4Rec", "genre", config_dict={**settings, "backbone_checkpoint": backbone_run["model_file"]},
        callback_fn=lambda epoch, score: scores.append((epoch, score)),
    )
    assert [epoch for epoch, _ in scores] == list(range(len(scores))) and scores, "the callback sees training epochs only"
    best_retriever = max(score for _, score in scores)
    assert run["best_valid_score"] == max(best_retriever, backbone_run["best_valid_score"])
    best = backbone_tensors(load_checkpoint(run["model_file"])["state_dict"])
    source = backbone_tensors(load_checkpoint(backbone_run["model_file"])["state_dict"])
    assert all(torch.equal(best[name], tensor) for name, tensor in source.items()), "the frozen backbone is the loaded one"


def test_warm_start_from_fastsasrec(settings, genre_root, tmp_path):
    fast = run_recbole_ur4rec(
        "FastSASRec", "genre",
        config_dict={key: settings[key] for key in ("hidden_size", "inner_size", "n_layers", "n_heads", "MAX_ITEM_LIST_LENGTH",
                                                   "seed", "train_batch_size", "show_progress", "state", "load_col")}
        | {"data_path": genre_root, "checkpoint_dir": str(tmp_path / "fast"), "epochs": 1},
    )
    _, model, *_ = build_model("UR4Rec", "genre", {**settings, "backbone_checkpoint": fast["model_file"]})
    source = backbone_tensors(load_checkpoint(fast["model_file"])["state_dict"])
    assert model.warm_started == fast["model_file"]
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in source.items())


def test_bad_backbone_checkpoints_are_refused_with_the_key_named(settings, backbone_run, tmp_path):
    with pytest.raises(ValueError, match=r"config key 'backbone_checkpoint' must be a path .* got 3"):
        build_model("UR4Rec", "genre", {**settings, "backbone_checkpoint": 3})
    with pytest.raises(CheckpointError, match=r"backbone_checkpoint .*none\.pth does not exist|checkpoint .*none\.pth does not exist"):
        build_model("UR4Rec", "genre", {**settings, "backbone_checkpoint": str(tmp_path / "none.pth")})
    with pytest.raises(CheckpointError, match=r"backbone_checkpoint .* does not fit this model's backbone: .*shape mismatch"):
        build_model("UR4Rec", "genre", {**settings, "backbone_checkpoint": backbone_run["model_file"], "hidden_size": 8, "inner_size": 16})
