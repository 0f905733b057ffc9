"""run_recbole_ur4rec.py as a user runs it: a subprocess, from another folder."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run_recbole_ur4rec.py")


def cli_args(config):
    keys = ("data_path", "train_batch_size", "hidden_size", "inner_size", "n_layers", "n_heads",
            "MAX_ITEM_LIST_LENGTH", "seed", "show_progress")
    args = [f"--{key}={config[key]}" for key in keys]
    return args + ["--load_col={'inter': ['user_id', 'item_id', 'timestamp']}"]


def run_cli(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_cli_trains_evaluates_and_reloads(quick_config, tmp_path):
    done = run_cli("-m", "SASRec", "-d", "tiny", "--epochs=2", *cli_args(quick_config), f"--checkpoint_dir={tmp_path}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"^test: \{'hit@5': ", done.stdout, re.M)
    model_file = re.search(r"^best model: (.+)$", done.stdout, re.M).group(1)
    test_line = re.search(r"^test: .*$", done.stdout, re.M).group(0)

    reloaded = run_cli("--checkpoint", model_file, cwd=tmp_path)
    assert reloaded.returncode == 0, reloaded.stderr[-2000:]
    assert re.search(r"^test: .*$", reloaded.stdout, re.M).group(0) == test_line

    masked = run_cli("--checkpoint", model_file, "--mask_sequence_history=True", cwd=tmp_path)  # another ranking only
    assert masked.returncode == 0, masked.stderr[-2000:]
    ndcg = [float(re.search(r"^test: .*'ndcg@10': ([0-9.]+)", out, re.M).group(1)) for out in (done.stdout, masked.stdout)]
    assert ndcg[1] > ndcg[0], "the tiny walk's earlier items leave the ranking"
    refused = run_cli("--checkpoint", model_file, "--hidden_size=8", cwd=tmp_path)
    assert refused.returncode != 0 and "drop ['hidden_size']" in refused.stderr


def test_cli_unknown_model_lists_plugin_models(tmp_path):
    done = run_cli("-m", "NoSuchRec", "-d", "ml-100k", cwd=tmp_path)
    assert done.returncode != 0
    assert "unknown model 'NoSuchRec'" in done.stderr and "available:" in done.stderr


def test_cli_unknown_dataset(tmp_path):
    done = run_cli("-m", "SASRec", "-d", "no-such-data", f"--data_path={tmp_path}", cwd=tmp_path)
    assert done.returncode != 0
    assert "dataset 'no-such-data' not found" in done.stderr


def test_cli_rejects_malformed_overrides(tmp_path):
    done = run_cli("-m", "SASRec", "--epochs", "3", cwd=tmp_path)
    assert done.returncode == 2 and "settings are written --key=value" in done.stderr


KILL_CASES = {
    # model: (extra arguments, the resume state after which the run is killed)
    "SASRec": (["--epochs=8"], 1),
    # staged: killed in its second stage (after the third epoch's resume state)
    "FTRagRec": (["--stages=['pretrain_backbone', 'retriever']", "--stage_epochs={'pretrain_backbone': 2, 'retriever': 3}",
                  "--train_batch_size=16", "--threads=1"], 3),
    # federated rounds with per-user local parameters after a warm-up
    "FedDMMR": (["--epochs=6", "--use_text=False", "--client_fraction=0.5", "--local_groups=['backbone']",
                 "--partial_aggregation_warmup_rounds=2", "--train_batch_size=4", "--threads=1"], 3),
}


def kill_and_resume(args, kill_after, tmp_path, uninterrupted_args=(), killed_args=()):
    """Run ``args`` to the end; run it again and ``kill -9`` it once ``kill_after`` resume states are on disk;
    resume. Returns the test lines of the uninterrupted and the resumed run."""
    uninterrupted = run_cli(*args, *uninterrupted_args, f"--checkpoint_dir={tmp_path / 'a'}", cwd=tmp_path, timeout=600)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]

    # kill -9 as soon as the kill_after-th resume state is on disk (each is written atomically)
    saved = tmp_path / "b"
    process = subprocess.Popen(
        [sys.executable, SCRIPT, *args, *killed_args, f"--checkpoint_dir={saved}"], cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline, states, last = time.time() + 480, set(), None
    while len(states) < kill_after and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
        files = [name for name in os.listdir(saved) if name.endswith("-last.pth")] if saved.exists() else []
        if files:
            last = files[0]
            try:
                states.add(os.stat(saved / last).st_mtime_ns)
            except FileNotFoundError:  # replaced between listdir and stat
                pass
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(states) >= kill_after and process.returncode == -signal.SIGKILL, "the run must be killed mid-way for this test to mean anything"

    resumed = run_cli("--resume", str(saved / last), cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resume training from epoch" in resumed.stderr + resumed.stdout
    test_line = lambda out: re.search(r"^test: .*$", out, re.M).group(0)
    return test_line(uninterrupted.stdout), test_line(resumed.stdout)


@pytest.mark.parametrize("model", list(KILL_CASES))
def test_killed_run_resumes_to_the_same_result(quick_config, tmp_path, model):
    extra, kill_after = KILL_CASES[model]
    uninterrupted, resumed = kill_and_resume(
        ["-m", model, "-d", "tiny", "--stopping_step=100", *cli_args(quick_config), *extra], kill_after, tmp_path
    )
    assert resumed == uninterrupted


def test_a_killed_federated_server_resumes_with_its_nodes_state(quick_config, tmp_path):
    """The partition command, then a server on the partition (nodes in process, their state on disk) killed -9
    mid-way and resumed: the same test result as an uninterrupted run."""
    extra, kill_after = KILL_CASES["FedDMMR"]
    common = ["-m", "FedDMMR", "-d", "tiny", *cli_args(quick_config), *extra]
    done = subprocess.run(
        [sys.executable, "-m", "recbole_ur4rec.apps.partition_dataset", "--nodes", "2", "--out", str(tmp_path / "fed"), *common[:4],
         *[a for a in common[4:] if not a.startswith("--epochs")]],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"clients on 2 nodes \(\d+, \d+\)", done.stdout)
    server = [*common, "--stopping_step=100", f"--federation_dir={tmp_path / 'fed'}", "--data_path=/nonexistent"]
    uninterrupted, resumed = kill_and_resume(
        server, kill_after, tmp_path, [f"--node_state_dir={tmp_path / 'na'}"], [f"--node_state_dir={tmp_path / 'nb'}"]
    )
    assert resumed == uninterrupted


def test_overrides_are_parsed_one_way_for_every_cli():
    import argparse

    from recbole_ur4rec.common.argv import parse_overrides

    parser = argparse.ArgumentParser(prog="x")
    overrides = parse_overrides(
        parser,
        ["--epochs=3", "--use_text=false", "--nlist=None", "--load_col={'inter': ['user_id']}", "--note=a=b", "--lr=1e-3"],
        extra=["seed=7"],
    )
    assert overrides == {
        "epochs": 3, "use_text": False, "nlist": None, "load_col": {"inter": ["user_id"]}, "note": "a=b", "lr": 0.001, "seed": 7,
    }
    for bad in (["-q"], ["--epochs"], ["epochs=3"]):
        with pytest.raises(SystemExit):
            parse_overrides(parser, bad)
    with pytest.raises(SystemExit):
        parse_overrides(parser, [], extra=["seed"])


def test_without_saving_the_test_split_still_uses_the_best_validation_weights(quick_config, tmp_path):
    from recbole_ur4rec.build import build
    from recbole_ur4rec.quick_start import run_recbole_ur4rec
    from recbole_ur4rec.registry import get_trainer

    settings = {**quick_config, "epochs": 8, "learning_rate": 0.5, "stopping_step": 100}  # peaks before its last epoch
    saved = run_recbole_ur4rec("FastSASRec", "tiny", config_dict={**settings, "checkpoint_dir": str(tmp_path / "a")})
    unsaved = run_recbole_ur4rec("FastSASRec", "tiny", config_dict={**settings, "checkpoint_dir": str(tmp_path / "b")}, saved=False)
    assert unsaved["test_result"] == saved["test_result"] and unsaved["model_file"] is None
    assert not (tmp_path / "b").exists() or not os.listdir(tmp_path / "b"), "nothing is written"
    # the trainer keeps the best validation state and evaluates it, not the last epoch's weights
    config, model, _, train_data, valid_data, test_data = build("FastSASRec", "tiny", config_dict={**settings, "checkpoint_dir": str(tmp_path / "c")}, log=False)
    trainer = get_trainer(config["MODEL_TYPE"], "FastSASRec")(config, model)
    trainer.fit(train_data, valid_data, saved=False)
    best = trainer._best_in_memory
    assert best is not None and best["best_valid_score"] == trainer.best_valid_score
    assert not all(torch.equal(v, best["state_dict"][n]) for n, v in model.state_dict().items()), "the best epoch is not the last here"
    trainer.evaluate(test_data, load_best_model=True)
    assert all(torch.equal(value, best["state_dict"][name]) for name, value in model.state_dict().items())
    # a caller that names a file still gets it written (bench/scale.py saves DuoRec's backbone this way)
    trainer._save_checkpoint(0, verbose=False, saved_model_file=str(tmp_path / "named.pth"))
    assert (tmp_path / "named.pth").is_file()
