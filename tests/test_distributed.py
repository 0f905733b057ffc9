"""Distributed runs: 2 gloo ranks on 127.0.0.1 against one process (evaluation to the last digit, training steps to
float tolerance), every stage of a staged model, FTRagRec's memory on every rank, resume, a dead rank, and a Ray Tune
search against a cluster address."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from conftest import TINY_MODEL, write_sequential_dataset
from ur4rec_fixtures import ur4rec_config, write_genre_dataset

from recbole_ur4rec.build import build
from recbole_ur4rec.common import distributed
from recbole_ur4rec.common.checkpoint_io import load_checkpoint
from recbole_ur4rec.data.dataloader import RankBatchSampler, RankShareSampler
from recbole_ur4rec.quick_start import run_recbole_ur4rec
from recbole_ur4rec.registry import get_trainer

SMALL = {
    "train_batch_size": 16,
    "eval_batch_size": 16,  # several evaluation batches, spread over the ranks
    **TINY_MODEL,
    "threads": 1,
    "hidden_dropout_prob": 0.0,  # no per-rank randomness: a step of 2 ranks is one process's step
    "attn_dropout_prob": 0.0,
    "loss_type": "CE",
    "dist_timeout": 60,
}
NO_AUXILIARY = {  # UR4Rec's router terms (per-rank statistics) off; consistency and the in-batch InfoNCE stay
    "consistency_weight": 0.5, "contrastive_weight": 0.5, "diversity_weight": 0.0, "load_balance_weight": 0.0,
    "cold_mapping_weight": 0.0, "curriculum": False, "retriever_dropout": 0.0,
}
# DuoRec's dropout-view InfoNCE over the whole batch (every rank's views), same-target views masked out
IN_BATCH_CONTRAST = {"contrast": "un", "lmd": 0.5, "lmd_sem": 0.0, "mask_same_target": True}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def two_ranks(**extra):
    return distributed.launch_settings(nproc=2, ip="127.0.0.1", port=free_port(), **extra)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return write_sequential_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def even_root(tmp_path_factory):
    """Users of 12 interactions: 9 prefix rows each, an even number of RecBole's training rows."""
    return write_sequential_dataset(tmp_path_factory.mktemp("even"), name="even", min_len=12, max_len=12)


@pytest.fixture(scope="module")
def genre_root(tmp_path_factory):
    return write_genre_dataset(tmp_path_factory.mktemp("genre"), n_users=64, n_items=80)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# ---- no processes ------------------------------------------------------------------------------------------------
def test_launch_settings_from_flags_and_torchrun():
    assert distributed.launch_settings() is None
    assert distributed.launch_settings(nproc=2, world_size=4, ip="10.0.0.1", port="29500", group_offset=2) == {
        "world_size": 4, "ip": "10.0.0.1", "port": "29500", "nproc": 2, "offset": 2,
    }
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "29400", "LOCAL_WORLD_SIZE": "2"}
    assert distributed.launch_settings(environ=env) == {
        "local_rank": 1, "world_size": 4, "ip": "h0", "port": "29400", "nproc": 2, "offset": 2,
    }
    with pytest.raises(ValueError, match="started by torchrun .* give no --nproc"):
        distributed.launch_settings(nproc=2, environ=env)
    with pytest.raises(ValueError, match=r"--group_offset 3 \+ --nproc 2 exceeds --world_size 4"):
        distributed.launch_settings(nproc=2, world_size=4, group_offset=3)
    with pytest.raises(ValueError, match="--nproc must be an int >= 1, got 0"):
        distributed.launch_settings(nproc=0)


@pytest.mark.parametrize("shuffle", [False, True])
def test_rank_shares_are_one_process_batches(shuffle):
    n, batch, world = 37, 8, 2  # the last batch (5 rows) repeats one row to split evenly

    def loader(sampler=None, generator=None):  # RecBole's loaders: one generator, for the order and the workers' seed
        generator = generator or torch.Generator().manual_seed(1)
        if sampler is None:
            return torch.utils.data.DataLoader(range(n), batch_size=batch, shuffle=shuffle, generator=generator)
        return torch.utils.data.DataLoader(range(n), batch_size=batch // world, sampler=sampler(generator), generator=generator)

    one = loader()
    ranks = [loader(lambda g, rank=rank: RankShareSampler(n, batch, rank, world, shuffle, g)) for rank in range(world)]
    for _ in range(2):  # two epochs: the generators move on alike
        expected, shares = [b.tolist() for b in one], [list(rank) for rank in ranks]
        assert len(shares[0]) == len(shares[1]) == len(expected)
        for k, rows in enumerate(expected):
            both = shares[0][k].tolist() + shares[1][k].tolist()
            assert both[: len(rows)] == rows and set(both) == set(rows)
    batches = [list(RankBatchSampler(n, batch, rank, 3)) for rank in range(3)]
    assert sorted(sum(batches, [])) == list(range(n)) and batches[1][:8] == list(range(8, 16))


# ---- a dead rank -------------------------------------------------------------------------------------------------
def _dies(settings, how):
    distributed.init_process_group(settings["local_rank"], 2, "127.0.0.1", settings["port"], "cpu", timeout_s=30)
    if settings["local_rank"] == 1:
        if how == "exit":
            os._exit(3)
        raise ValueError("bad input on rank 1")
    distributed.barrier()  # rank 0 waits for rank 1, which never comes


@pytest.mark.parametrize("how, message", [("exit", r"rank 1 of 2 .*died \(exit code 3\)"), ("raise", r"rank 1 of 2 .*raised.*bad input on rank 1")])
def test_a_dead_rank_ends_the_job_naming_it(how, message):
    start = time.monotonic()
    with pytest.raises(distributed.RankFailed, match=f"(?s){message}"):
        distributed.spawn(_dies, two_ranks(), how)
    assert time.monotonic() - start < 60  # never waits for dist_timeout on one machine


def _waits(settings, folder):
    with open(os.path.join(folder, f"rank{settings['local_rank']}.pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


LAUNCHER = """
import signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a job started in the background (nohup ... &)
sys.path[:0] = {paths!r}
from test_distributed import _waits, two_ranks
from recbole_ur4rec.common import distributed
distributed.spawn(_waits, two_ranks(), sys.argv[1])
"""


def test_the_ranks_end_with_their_launcher(tmp_path):
    """A launcher killed outright (it cannot stop its ranks) takes its ranks with it, also when started in the
    background: no orphan trains on."""
    here = os.path.dirname(os.path.abspath(__file__))
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER.format(paths=[here, os.path.dirname(here)]), str(tmp_path)])
    pids = []
    deadline = time.monotonic() + 120
    while len(pids) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        pids = [int((tmp_path / f).read_text()) for f in os.listdir(tmp_path) if f.endswith(".pid") and (tmp_path / f).read_text()]
    assert len(pids) == 2, "the ranks did not start"
    launcher.kill()  # SIGKILL: the launcher cannot stop its ranks itself
    launcher.wait()
    deadline = time.monotonic() + 60
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in pids if _running(pid)]
    assert not alive, f"ranks {alive} outlived their launcher"


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


# ---- training and evaluation against one process -----------------------------------------------------------------
def _train_and_evaluate(settings, model_name, dataset, config_dict):
    """One epoch (UR4Rec: of its retriever stage), then validation and test with the weights reached."""
    run = build(model_name, dataset, config_dict={**config_dict, **settings}, log=False)
    trainer = get_trainer(run.config["MODEL_TYPE"], model_name)(run.config, run.model)
    if hasattr(trainer, "stages"):
        trainer._enter_stage(0)
        trainer.steps_per_epoch = len(run.train_data)
    trainer._train_epoch(run.train_data, 0)
    valid = trainer.evaluate(run.valid_data, load_best_model=False)
    users = trainer.last_evaluated_rows.users
    test = trainer.evaluate(run.test_data, load_best_model=False)
    return {"state": run.model.state_dict(), "valid": dict(valid), "test": dict(test), "users": users}


def _one_process(model_name, dataset, config_dict, state=None):
    run = build(model_name, dataset, config_dict=config_dict, log=False)
    trainer = get_trainer(run.config["MODEL_TYPE"], model_name)(run.config, run.model)
    if state is not None:  # evaluate these weights
        run.model.load_state_dict(state)
        valid = trainer.evaluate(run.valid_data, load_best_model=False)
        users = trainer.last_evaluated_rows.users
        return {"valid": dict(valid), "test": dict(trainer.evaluate(run.test_data, load_best_model=False)), "users": users}
    return _train_and_evaluate({}, model_name, dataset, config_dict)


@pytest.mark.parametrize("model_name", ["FastSASRec", "UR4Rec", "DuoRec", "SASRec"])  # SASRec: RecBole's model
def test_two_ranks_train_and_evaluate_as_one_process(model_name, tiny_root, even_root, genre_root, cache_dir, tmp_path):
    if model_name == "FastSASRec":
        dataset, config = "tiny", {**SMALL, "data_path": tiny_root, "checkpoint_dir": str(tmp_path)}
    elif model_name == "DuoRec":
        dataset, config = "tiny", {**SMALL, **IN_BATCH_CONTRAST, "data_path": tiny_root, "checkpoint_dir": str(tmp_path)}
    elif model_name == "SASRec":
        dataset, config = "even", {**SMALL, "data_path": even_root, "checkpoint_dir": str(tmp_path)}
    else:
        dataset = "genre"
        config = {**ur4rec_config(genre_root, cache_dir, tmp_path), **SMALL, **NO_AUXILIARY, "load_col": None,
                  "stages": ["pretrain_retriever"], "stage_epochs": {"pretrain_retriever": 1}}
        del config["load_col"]
    rows = len(build(model_name, dataset, config_dict=config, log=False).train_data._dataset)
    # a batch size whose last batch splits evenly: every step of the 2 ranks is one process's step
    config["train_batch_size"] = next(b for b in range(16, 64, 2) if rows % b % 2 == 0)
    ranks = distributed.spawn(_train_and_evaluate, two_ranks(), model_name, dataset, config)
    one = _one_process(model_name, dataset, config)
    # one epoch of steps: 2 ranks x b/2 rows = one process x b rows, to float tolerance (the ranks sum the gradients
    # in another order; Adam divides by their RMS, which magnifies that where a gradient is near zero: ~1e-6 here)
    for name, tensor in one["state"].items():
        torch.testing.assert_close(ranks["state"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    same_weights = _one_process(model_name, dataset, config, state=ranks["state"])
    assert ranks["valid"] == same_weights["valid"] and ranks["test"] == same_weights["test"]  # to the last digit
    assert ranks["users"].tolist() == same_weights["users"].tolist()  # every user once, in one process's order
    assert ranks["valid"]["users/short"] + ranks["valid"]["users/long"] == len(set(ranks["users"].tolist()))


# ---- staged models, FTRagRec's memory, resume ----------------------------------------------------------------------
def _ftragrec_memory(settings, config_dict):
    run = build("FTRagRec", "tiny", config_dict={**config_dict, **settings}, log=False)
    trainer = get_trainer(run.config["MODEL_TYPE"], "FTRagRec")(run.config, run.model)
    trainer.fit(run.train_data, run.valid_data, saved=False)
    memory = run.model.memory
    return distributed.all_gather_plain(
        {"fingerprint": memory.fingerprint, "keys": memory.keys, "targets": memory.targets, "users": memory.users,
         "refreshes": trainer.refresh_log, "stages": [s.name for s in trainer.stages]}
    )


def test_ftragrec_memory_is_the_same_on_every_rank_through_every_stage(tiny_root, tmp_path):
    config = {**SMALL, "data_path": tiny_root, "checkpoint_dir": str(tmp_path), "stages": ["pretrain_backbone", "retriever", "finetune"],
              "stage_epochs": {"pretrain_backbone": 1, "retriever": 2, "finetune": 1}, "refresh_every": 1}
    ranks = distributed.spawn(_ftragrec_memory, two_ranks(), config)
    assert len(ranks) == 2 and ranks[0]["stages"] == ["pretrain_backbone", "retriever", "finetune"]
    assert ranks[0]["refreshes"] == ranks[1]["refreshes"] == [0, 1, 2]  # refreshed in step, every retrieval epoch
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    for name in ("keys", "targets", "users"):
        assert torch.equal(ranks[0][name], ranks[1][name]), name


def test_ur4rec_every_stage_distributed_with_features_encoded_once(genre_root, cache_dir, tmp_path):
    config = {**ur4rec_config(genre_root, cache_dir, tmp_path / "saved"), "threads": 1, "dist_timeout": 60,
              "stage_epochs": {"pretrain_backbone": 1, "pretrain_retriever": 1, "joint": 1, "end_to_end": 1},
              "alternation": "adaptive", "alternation_steps": 2, "progressive_unfreezing": True}
    # 64 evaluated users in one batch of eval_batch_size 256: rank 1 has no evaluation batch and still takes part
    result = run_recbole_ur4rec("UR4Rec", "genre", config_dict=config, nproc=2, ip="127.0.0.1", port=free_port())
    assert result["test_result"]["users/short"] + result["test_result"]["users/long"] == 64
    best = load_checkpoint(result["model_file"])
    assert best["stage"]["name"] in config["stages"] and not set(best["config"]) & set(distributed.DISTRIBUTED_KEYS)
    assert len(os.listdir(cache_dir)) > 0


def test_resume_of_a_distributed_run_and_of_a_one_process_checkpoint(tiny_root, tmp_path):
    config = {**SMALL, "data_path": tiny_root, "hidden_dropout_prob": 0.2}  # each rank draws its own dropout
    straight = run_recbole_ur4rec("FastSASRec", "tiny", config_dict={**config, "epochs": 2, "checkpoint_dir": str(tmp_path / "a")},
                                  nproc=2, ip="127.0.0.1", port=free_port())
    first = run_recbole_ur4rec("FastSASRec", "tiny", config_dict={**config, "epochs": 1, "checkpoint_dir": str(tmp_path / "b")},
                               nproc=2, ip="127.0.0.1", port=free_port())
    last = first["model_file"][: -len(".pth")] + "-last.pth"
    assert len(load_checkpoint(last)["rank_rng"]) == 1  # rank 1's generators beside rank 0's
    resumed = run_recbole_ur4rec(resume_file=last, config_dict={"epochs": 2}, nproc=2, ip="127.0.0.1", port=free_port())
    assert resumed["test_result"] == straight["test_result"]  # every rank resumed its own random state

    one = run_recbole_ur4rec("FastSASRec", "tiny", config_dict={**config, "epochs": 1, "checkpoint_dir": str(tmp_path / "c")})
    last = one["model_file"][: -len(".pth")] + "-last.pth"
    again = run_recbole_ur4rec(resume_file=last, config_dict={"epochs": 2}, nproc=2, ip="127.0.0.1", port=free_port())
    assert again["model_file"] == one["model_file"] and load_checkpoint(again["model_file"])["trained_epochs"] in (1, 2)


# ---- a search on a Ray cluster ----------------------------------------------------------------------------------------
@pytest.fixture
def ray_head(tmp_path):
    """A Ray cluster's head on 127.0.0.1, started as `ray start --head` starts one (its own process group, stopped
    afterwards; ``ray stop`` would stop every Ray of the machine): its address."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay under 108 characters
    command = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block", f"--port={port}",
               "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp}",
               "--disable-usage-stats"]
    with open(tmp_path / "ray_head.log", "w") as log:
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # env: PYTHONPATH
    try:
        deadline = time.monotonic() + 120
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", int(port))) == 0:
                    break
            assert head.poll() is None and time.monotonic() < deadline, open(tmp_path / "ray_head.log").read()
            time.sleep(1)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_search_runs_its_trials_on_a_ray_cluster_address(ray_head, tmp_path):
    import ray
    from tune_fixtures import quick_settings, read_csv, write_walk_dataset

    from recbole_ur4rec.experiments.tuning import run_search

    assert not ray.is_initialized()
    params = tmp_path / "lr.hyper"
    params.write_text("learning_rate choice [1e-5, 5e-3]\n")
    settings = quick_settings(write_walk_dataset(tmp_path / "data"), epochs=2)
    result = run_search("SASRec", "walk", str(params), config_dict=settings, output_dir=str(tmp_path / "search"), grid=True,
                        seed=3, address=ray_head)
    assert not ray.is_initialized()  # the driver left the cluster, which goes on
    assert len(result["trials"]) == 2 and not result["interrupted"] and result["best"]["params"]["learning_rate"] == 0.005
    rows = read_csv(result["results_csv"])  # the format of a local search's table
    assert len(rows) == 2 and {"trial", "status", "valid ndcg@10", "best valid NDCG@10", "test ndcg@10", "best"} <= set(rows[0])
    assert os.path.isfile(result["best_yaml"]) and os.path.isfile(result["results_md"])
