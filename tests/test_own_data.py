"""A user's own dataset on defaults: a timestamped .inter with string, non-contiguous ids runs in every command
without extra flags; a file without a time field says what to do; RecBole's global anomaly mode is off after a
RecBole model trains; RecBole's pickled data caches are never loaded."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from recbole_ur4rec.apps.precompute_features import main as features_main
from recbole_ur4rec.config import Config
from recbole_ur4rec.data import create_dataset, data_preparation
from recbole_ur4rec.data.atomic import AtomicFileError
from recbole_ur4rec.quick_start import run_recbole_ur4rec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {  # the size of the run only: no data settings (load_col, eval_args, fields) are given
    "show_progress": False,
    "state": "WARNING",
    "seed": 11,
    "threads": 1,
    "hidden_size": 16,
    "inner_size": 32,
    "n_layers": 1,
    "n_heads": 1,
    "MAX_ITEM_LIST_LENGTH": 10,
    "epochs": 1,
    "eval_batch_size": 512,
}
SHORT_STAGES = {
    "UR4Rec": {"stage_epochs": {"pretrain_backbone": 1, "pretrain_retriever": 1}},
    "FTRagRec": {"stage_epochs": {"pretrain_backbone": 1, "retriever": 1, "finetune": 1}},
}


def write_own_dataset(root, name="own", n_users=40, n_items=60, time_field=True):
    """An ordinary atomic dataset: user_id, item_id (string, non-contiguous tokens), rating, timestamp (Unix
    seconds, rows not in time order), and an .item file with a title and genres."""
    rng = np.random.default_rng(5)
    folder = os.path.join(str(root), name)
    os.makedirs(folder, exist_ok=True)
    items = [f"B00{7919 * k % 100000:05d}X" for k in range(n_items)]
    header = "user_id:token\titem_id:token\trating:float" + ("\ttimestamp:float" if time_field else "")
    lines = []
    for user in range(n_users):
        start, length = int(rng.integers(n_items)), int(rng.integers(6, 15))
        times = 1_600_000_000 + np.sort(rng.choice(10_000_000, size=length, replace=False))
        for step in range(length):
            row = f"A{user * 37 + 1000}Z\t{items[(start + step) % n_items]}\t{int(rng.integers(1, 6))}"
            lines.append(row + (f"\t{times[step]}" if time_field else ""))
    lines = [lines[i] for i in rng.permutation(len(lines))]
    with open(os.path.join(folder, f"{name}.inter"), "w") as f:
        f.write("\n".join([header] + lines) + "\n")
    genres = ["Drama", "Comedy", "Action", "Horror"]
    with open(os.path.join(folder, f"{name}.item"), "w") as f:
        f.write("item_id:token\ttitle:token_seq\tgenre:token_seq\n")
        for k, token in enumerate(items):
            f.write(f"{token}\tproduct {k} deluxe\t{genres[k % 4]} {genres[(k + 1) % 4]}\n")
    return str(root)


@pytest.fixture(scope="module")
def own_root(tmp_path_factory):
    return write_own_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("model", ["SASRec", "FastSASRec", "DuoRec", "UR4Rec", "FTRagRec", "FedDMMR"])
def test_every_model_runs_on_defaults(own_root, cache_dir, tmp_path, model):
    config_dict = {
        **SMALL,
        **SHORT_STAGES.get(model, {}),
        "data_path": own_root,
        "checkpoint_dir": str(tmp_path / "saved"),
        "feature_cache_dir": str(cache_dir),
    }
    result = run_recbole_ur4rec(model, "own", config_dict=config_dict)
    assert set(result["test_result"]) >= {"hit@10", "ndcg@10"}
    assert all(np.isfinite(v) for v in result["test_result"].values())


def test_defaults_load_the_time_field_and_keep_odd_ids(own_root, tmp_path):
    config = Config(model="FastSASRec", dataset="own", config_dict={**SMALL, "data_path": own_root})
    assert config["load_col"]["inter"] == ["user_id", "item_id", "timestamp", "rating"]
    dataset = create_dataset(config)
    _, valid_data, _ = data_preparation(config, dataset)
    users = dataset.id2token("user_id", valid_data._dataset.inter_feat["user_id"].numpy())
    assert all(u.startswith("A") and u.endswith("Z") for u in users) and len(users) == 40
    # a load_col the user sets is kept as it is
    config = Config(model="FastSASRec", dataset="own", config_dict={"data_path": own_root, "load_col": None})
    assert config["load_col"] is None


def test_cli_and_features_command_run_on_defaults(own_root, cache_dir, tmp_path, monkeypatch, capsys):
    args = [f"--data_path={own_root}", f"--checkpoint_dir={tmp_path / 'saved'}", "--epochs=1", "--show_progress=False"]
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "run_recbole_ur4rec.py"), "-m", "FastSASRec", "-d", "own", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test: {'hit@5': " in done.stdout

    argv = ["-d", "own", f"--data_path={own_root}", f"--feature_cache_dir={cache_dir}", "--show_progress=False"]
    monkeypatch.setattr(sys, "argv", ["pytest", "--data_path=/nonexistent"])  # main(argv) never reads sys.argv
    stores = features_main(argv)
    assert "item_text: 60/60 item_ids with a feature" in capsys.readouterr().out
    assert int(stores["user_text"].mask.sum()) == 40


def test_a_file_without_a_time_field_says_what_to_do(tmp_path):
    root = write_own_dataset(tmp_path / "data", name="notime", time_field=False)
    with pytest.raises(AtomicFileError, match=r"notime.inter: missing field\(s\) \['timestamp'\].*add a column timestamp:float"):
        run_recbole_ur4rec("FastSASRec", "notime", config_dict={**SMALL, "data_path": root, "checkpoint_dir": str(tmp_path)})


def test_anomaly_mode_is_off_after_a_recbole_model_trains(own_root, tmp_path, caplog):
    from recbole.model.sequential_recommender import sine  # noqa: F401  turns anomaly detection on, process-wide

    torch.autograd.set_detect_anomaly(True)
    result = run_recbole_ur4rec("GRU4Rec", "own", config_dict={**SMALL, "data_path": own_root, "checkpoint_dir": str(tmp_path)})
    assert result["test_result"] is not None
    assert not torch.is_anomaly_enabled()
    # asked for, it stays on
    run_recbole_ur4rec("GRU4Rec", "own", config_dict={**SMALL, "data_path": own_root, "checkpoint_dir": str(tmp_path), "detect_anomaly": True})
    assert torch.is_anomaly_enabled()
    torch.autograd.set_detect_anomaly(False)


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("model, dataset_class", [("SASRec", "SequentialDataset"), ("FastSASRec", "SequenceHistoryDataset")])
def test_planted_pickle_caches_run_no_code(own_root, tmp_path, caplog, model, dataset_class):
    import pickle

    saved = tmp_path / "saved"
    saved.mkdir()
    for name in (f"own-{dataset_class}.pth", f"own-for-{model}-dataloader.pth"):
        with open(saved / name, "wb") as f:
            pickle.dump(Exploit(), f)
    config_dict = {**SMALL, "data_path": own_root, "checkpoint_dir": str(saved), "state": "INFO"}
    result = run_recbole_ur4rec(model, "own", config_dict=config_dict)
    assert result["test_result"] is not None
    assert not (tmp_path / "PWNED").exists() and not os.path.exists("PWNED")
    assert caplog.text.count("RecBole's pickled data cache is never loaded") == 2


@pytest.mark.parametrize("key, value", [("save_dataset", True), ("dataloaders_save_path", "x.pth")])
def test_asking_for_pickled_caches_is_refused(own_root, tmp_path, key, value):
    with pytest.raises(ValueError, match=rf"config key '{key}' = .*does not save or load RecBole's pickled"):
        run_recbole_ur4rec("SASRec", "own", config_dict={**SMALL, "data_path": own_root, "checkpoint_dir": str(tmp_path), key: value})
