"""Ray Tune search: search-space files, per-epoch validation reports to ASHA, best trial chosen on validation."""
import glob
import math
import os

import pytest
import yaml
from tune_fixtures import quick_settings, read_csv

from recbole_ur4rec.config import Config
from recbole_ur4rec.experiments.search_space import SearchSpaceError, parse_params_file, to_tune_space
from recbole_ur4rec.experiments.tuning import run_search


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPACE_MODELS = {  # the shipped search spaces (hyper/<stem>.*) and the model each one tunes
    "fastsasrec": "FastSASRec", "duorec": "DuoRec", "ur4rec": "UR4Rec", "ftragrec": "FTRagRec", "feddmmr_central": "FedDMMR",
    "feddmmr_federated": "FedDMMR", "feddmmr_gating": "FedDMMR", "sasrec": "SASRec", "sasrecf": "SASRecF",
    "gru4rec": "GRU4Rec", "bert4rec": "BERT4Rec", "fearec": "FEARec",
}


SPACES = sorted(glob.glob(os.path.join(REPO, "hyper", "*.*")) + glob.glob(os.path.join(REPO, "hyper", "*", "*.*")))


@pytest.mark.parametrize("path", SPACES, ids=lambda path: os.path.relpath(path, os.path.join(REPO, "hyper")))
def test_every_shipped_search_space_names_keys_its_model_has(path):
    """A misspelt key would be accepted by RecBole's Config and searched for nothing. hyper/<dataset>/ holds a
    dataset's own spaces."""
    stem = os.path.splitext(os.path.basename(path))[0]
    assert stem in SPACE_MODELS, f"{path}: which model does it tune? add it to SPACE_MODELS"
    folder = os.path.basename(os.path.dirname(path))
    dataset = "ml-100k" if folder == "hyper" else folder
    config = Config(model=SPACE_MODELS[stem], dataset=dataset, config_dict={"data_path": os.path.join(REPO, "dataset")})
    unknown = [key for key in parse_params_file(path) if key not in config.final_config_dict]
    assert not unknown, f"{path}: {unknown} are not config keys of {SPACE_MODELS[stem]}"


def test_params_file_recbole_format(tmp_path):
    path = write(
        tmp_path / "space.hyper",
        "# comment line\n"
        "learning_rate loguniform -9.21, -4.61   # 1e-4 .. 1e-2\n"
        "\n"
        "hidden_size choice [32, 64]\n"
        "dropout_prob uniform 0.1,0.5\n"
        "n_layers quniform 1,3,1\n"
        "weight_decay quniform 0.0,0.1,0.05\n"
        "loss_type choice ['CE', 'BPR']\n",
    )
    space = parse_params_file(path)
    assert space == {
        "learning_rate": ("loguniform", [-9.21, -4.61]),
        "hidden_size": ("choice", [32, 64]),
        "dropout_prob": ("uniform", [0.1, 0.5]),
        "n_layers": ("quniform", [1, 3, 1]),
        "weight_decay": ("quniform", [0.0, 0.1, 0.05]),
        "loss_type": ("choice", ["CE", "BPR"]),
    }
    domains = to_tune_space(space)
    # RecBole/hyperopt semantics: loguniform bounds are natural-log exponents
    assert domains["learning_rate"].lower == pytest.approx(math.exp(-9.21))
    assert domains["learning_rate"].upper == pytest.approx(math.exp(-4.61))
    assert domains["hidden_size"].categories == [32, 64]
    samples = [domains["n_layers"].sample() for _ in range(30)]
    assert set(samples) <= {1, 2, 3} and all(isinstance(s, int) for s in samples)
    assert all(0.1 <= domains["dropout_prob"].sample() <= 0.5 for _ in range(30))
    assert to_tune_space(space, grid=True)["hidden_size"] == {"grid_search": [32, 64]}


def test_params_file_yaml_format(tmp_path):
    path = write(tmp_path / "space.yaml", "choice:\n  n_heads: [1, 2]\nloguniform:\n  learning_rate: [-8, -4]\n")
    assert parse_params_file(path) == {"n_heads": ("choice", [1, 2]), "learning_rate": ("loguniform", [-8, -4])}


@pytest.mark.parametrize(
    "text, message",
    [
        ("learning_rate choice\n", r"space.hyper:1: expected 'name type values'"),
        ("a choice [1]\nlearning_rate gaussian 0,1\n", r"space.hyper:2: unknown search type 'gaussian'"),
        ("learning_rate uniform 0.1\n", r"needs low,high"),
        ("learning_rate uniform 0.5,0.1\n", r"needs low < high"),
        ("loss_type choice [CE, BPR]\n", r"must be a Python list literal"),
        ("hidden_size choice 64\n", r"needs a non-empty list"),
        ("a choice [1]\na choice [2]\n", r"space.hyper:2: parameter 'a' appears twice"),
        ("# nothing\n", r"defines no parameter"),
    ],
)
def test_params_file_errors_name_the_line(tmp_path, text, message):
    with pytest.raises(SearchSpaceError, match=message):
        parse_params_file(write(tmp_path / "space.hyper", text))


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def progress(output_dir, trial_id):
    (path,) = glob.glob(os.path.join(output_dir, "ray", f"*{trial_id}*", "progress.csv"))
    return read_csv(path)


def test_search_reports_every_epoch_and_picks_best_on_validation(local_ray, walk_root, tmp_path):
    params = write(tmp_path / "lr.hyper", "learning_rate choice [1e-5, 5e-3]\n")
    settings = quick_settings(walk_root, epochs=4)
    output_dir = str(tmp_path / "search")
    result = run_search("SASRec", "walk", params, config_dict=settings, output_dir=output_dir, grid=True, seed=3)

    trials = result["trials"]
    assert len(trials) == 2 and not result["interrupted"]
    best_by_progress, best_score = None, -1.0
    for trial_id, rec in trials.items():
        assert rec["status"] in ("completed", "stopped by ASHA")
        rows = progress(output_dir, trial_id)
        # ASHA saw one report per epoch: training_iteration counts the epochs' validations
        assert [int(r["training_iteration"]) for r in rows] == list(range(1, len(rows) + 1))
        assert [int(r["epoch"]) for r in rows] == list(range(len(rows)))
        if rec["status"] == "completed":
            assert len(rows) == 4
        else:  # ASHA stops a trial at a rung, before its last epoch
            assert 1 <= len(rows) < 4
        scores = [float(r["valid_score"]) for r in rows]
        # every validation metric and evaluation slice is a column of the trial's progress
        assert all(float(r["valid ndcg@10"]) == float(r["valid_score"]) for r in rows)
        assert all(0 < int(float(r["valid users tail"])) < 60 and 0.0 <= float(r["valid ndcg@10 tail"]) <= 1.0 for r in rows)
        assert all(0.0 <= s <= 1.0 for s in scores)
        if max(scores) > best_score:
            best_by_progress, best_score = trial_id, max(scores)

    best = result["best"]
    assert best["trial"] == best_by_progress
    assert best["params"]["learning_rate"] == 0.005  # 1e-5 cannot learn the walk in 4 epochs
    # the test split was evaluated for the best trial only, from its best checkpoint
    assert [r["trial"] for r in trials.values() if r.get("test_result")] == [best["trial"]]
    assert best["reevaluated_valid_result"]["ndcg@10"] == pytest.approx(best_score, abs=1e-4)
    assert best["test_result"]["ndcg@10"] > 0.1  # far above a random ranker over 30 items

    rows = {r["trial"]: r for r in read_csv(result["results_csv"])}
    assert rows[best["trial"]]["best"] == "yes" and float(rows[best["trial"]]["test ndcg@10"]) > 0
    other = next(t for t in rows if t != best["trial"])
    assert rows[other]["test ndcg@10"] == "" and rows[other]["best"] == ""
    assert float(rows[best["trial"]]["best valid NDCG@10"]) == pytest.approx(best_score)
    assert "valid ndcg@10/tail" in rows[other]  # the slices' columns are in results.csv
    columns = list(rows[other])
    assert columns.index("test ndcg@10") < columns.index("best") < columns.index("time_s")
    md_header = next(line for line in open(result["results_md"]) if line.startswith("| trial |"))
    assert "best valid NDCG@10" in md_header and "test ndcg@10 |" in md_header and "/" not in md_header  # not in results.md

    # best.yaml is a config file the CLI accepts, with the winning value and the shared settings
    with open(result["best_yaml"]) as f:
        saved = yaml.safe_load(f)
    assert saved["learning_rate"] == 0.005 and saved["hidden_size"] == 16
    # the search's epoch budget is named, not repeated: a run from best.yaml trains to early stopping
    assert "epochs" not in saved and "# search budget, not repeated here: epochs: 4" in open(result["best_yaml"]).read()
    config = Config(model="SASRec", dataset="walk", config_file_list=[result["best_yaml"]])
    assert config["learning_rate"] == 0.005 and config["epochs"] == 300  # RecBole's default


def test_failing_trial_is_reported_and_others_finish(local_ray, walk_root, tmp_path):
    # SASRec refuses hidden_size 16 with 3 heads at model construction
    params = write(tmp_path / "heads.yaml", "choice:\n  n_heads: [1, 3]\n")
    output_dir = str(tmp_path / "search")
    result = run_search(
        "SASRec", "walk", params, config_dict=quick_settings(walk_root, epochs=2), output_dir=output_dir, grid=True
    )
    by_heads = {rec["params"]["n_heads"]: rec for rec in result["trials"].values()}
    assert by_heads[3]["status"] == "failed" and "attention heads" in by_heads[3]["error"]
    assert by_heads[1]["status"] == "completed" and result["best"]["trial"] == by_heads[1]["trial"]
    rows = {r["n_heads"]: r for r in read_csv(result["results_csv"])}
    assert rows["3"]["status"] == "failed" and "attention heads" in rows["3"]["error"]
    assert rows["1"]["test ndcg@10"] != ""
    assert "failed" in open(result["results_md"]).read()


def test_asha_budget_follows_the_real_schedule(walk_root):
    from recbole_ur4rec.experiments.tuning import validation_budget

    settings = quick_settings(walk_root, epochs=300)
    config = Config(model="SASRec", dataset="walk", config_dict=settings)
    assert validation_budget(config) == 300
    config = Config(model="SASRec", dataset="walk", config_dict={**settings, "eval_step": 2})
    assert validation_budget(config) == 150
    # staged trainers ignore epochs: their stages' epochs, validated every eval_step epochs within each stage
    staged = {**settings, "stages": ["pretrain_backbone", "retriever"], "stage_epochs": {"pretrain_backbone": 5, "retriever": 3, "finetune": 9}}
    assert validation_budget(Config(model="FTRagRec", dataset="walk", config_dict=staged)) == 8
    assert validation_budget(Config(model="FTRagRec", dataset="walk", config_dict={**staged, "eval_step": 2})) == 3
    defaults = Config(model="UR4Rec", dataset="walk", config_dict=settings)
    assert validation_budget(defaults) == sum(defaults["stage_epochs"][name] for name in defaults["stages"]) < 300
    # federated rounds are epochs
    assert validation_budget(Config(model="FedDMMR", dataset="walk", config_dict={**settings, "epochs": 40})) == 40


def test_asha_stops_a_bad_staged_trial_early(local_ray, walk_root, tmp_path):
    """FTRagRec trains in stages and ignores epochs: ASHA's budget is its stages' validations (6 here, not
    RecBole's 300 epochs, whose grace period of 30 validations would never stop it), so a trial that cannot learn
    is stopped at a rung while the good one trains to the end."""
    good = {"pretrain_backbone": 0.01, "retriever": 0.01, "finetune": 0.001}
    bad = {"pretrain_backbone": 1e-7, "retriever": 1e-7, "finetune": 1e-7}
    params = write(tmp_path / "stages.hyper", f"stage_learning_rate choice [{good!r}, {bad!r}]\n")
    settings = {
        **quick_settings(walk_root, epochs=300), "stopping_step": 100,
        "stages": ["pretrain_backbone", "retriever"], "stage_epochs": {"pretrain_backbone": 4, "retriever": 2, "finetune": 1},
    }
    settings.pop("learning_rate")  # staged models refuse it
    output_dir = str(tmp_path / "search")
    result = run_search(
        "FTRagRec", "walk", params, config_dict=settings, output_dir=output_dir, grid=True, seed=3,
        max_concurrent=1, reduction_factor=2,  # the default grace period: a tenth of the budget, at least 1
    )
    by_rate = {rec["params"]["stage_learning_rate"]["pretrain_backbone"]: (trial_id, rec) for trial_id, rec in result["trials"].items()}
    good_id, good_rec = by_rate[0.01]
    bad_id, bad_rec = by_rate[1e-7]
    assert good_rec["status"] == "completed" and len(progress(output_dir, good_id)) == 6  # every stage's validations
    assert bad_rec["status"] == "stopped by ASHA" and len(progress(output_dir, bad_id)) < 6


def test_the_best_yaml_names_itself_relative_to_the_working_directory(tmp_path, monkeypatch):
    """Results hold no machine paths: a best.yaml under the working directory names itself relatively."""
    from recbole_ur4rec.experiments.tuning_results import best_config_yaml

    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / "results" / "hyper" / "best.yaml")
    os.makedirs(os.path.dirname(path))
    best_config_yaml(path, "FastSASRec", "ml-100k", {"epochs": 5, "n_layers": 1}, {"learning_rate": 0.01}, ["Best of 1 trial"])
    text = open(path).read()
    assert "--config_files results/hyper/best.yaml" in text and str(tmp_path) not in text
    assert yaml.safe_load(text) == {"n_layers": 1, "learning_rate": 0.01}
    best_config_yaml(path, "FastSASRec", "ml-100k", {"epochs": 5}, {"epochs": 8}, ["Best of 1 trial"])  # searched: kept
    assert yaml.safe_load(open(path).read()) == {"epochs": 8}


def test_the_best_trial_is_chosen_on_the_runs_best_validation_not_the_stages(tmp_path):
    """A staged trial's resume file holds early stopping's best of its last stage (0.05) beside the run's best (0.09,
    the weights in its model file): the search ranks and shows the run's best, also from files written before the run's
    best was kept outside the stage state."""
    from types import SimpleNamespace

    from recbole_ur4rec.common.checkpoint_io import save_checkpoint
    from recbole_ur4rec.experiments.tuning_results import SearchRecorder, trial_checkpoint_dir

    recorder = SearchRecorder(str(tmp_path), {"lr": None}, "# search\n", "NDCG@10", True, str(tmp_path / "checkpoints"))
    resume_states = {
        "staged": {"best_valid_result": {"ndcg@10": 0.05}, "run_best_score": 0.09, "run_best_result": {"ndcg@10": 0.09}},
        "older_staged": {"best_valid_result": {"ndcg@10": 0.04}, "staged": {"run_best_score": 0.08, "run_best_result": {"ndcg@10": 0.08}}},
        "plain": {"best_valid_score": 0.07, "best_valid_result": {"ndcg@10": 0.07}},
    }
    for trial_id, state in resume_states.items():
        trial = SimpleNamespace(trial_id=trial_id, config={"lr": 0.1})
        recorder.on_start(trial)
        recorder.on_result(trial, {"valid_score": 0.01})
        recorder.on_complete(trial)
        folder = trial_checkpoint_dir(recorder.checkpoint_root, trial_id)
        os.makedirs(folder)
        save_checkpoint(state, os.path.join(folder, "M-last.pth"))
        save_checkpoint({}, os.path.join(folder, "M.pth"))
    assert recorder.finish(interrupted=False)["trial"] == "staged"
    rows = {row["trial"]: row for row in recorder.rows()}
    assert {trial: row["valid ndcg@10"] for trial, row in rows.items()} == {"staged": 0.09, "older_staged": 0.08, "plain": 0.07}


def test_a_search_table_says_it_is_live_until_the_search_finishes(tmp_path):
    """A search killed outright cannot rewrite its table: while the search runs, results.md says it is a live table
    (with the time it was written), so a killed search's `running` trials are not read as running; finish() drops it."""
    from types import SimpleNamespace

    from recbole_ur4rec.experiments.tuning_results import SearchRecorder

    recorder = SearchRecorder(str(tmp_path), {"lr": None}, "# search\n", "NDCG@10", True, str(tmp_path / "checkpoints"))
    trial = SimpleNamespace(trial_id="trial_00000", config={"lr": 0.1})
    recorder.on_start(trial)
    recorder.on_result(trial, {"valid_score": 0.07})
    table = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "| running |" in table and "Live table, last written" in table
    recorder.finish(interrupted=True)
    recorder.write()
    table = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "| interrupted |" in table and "Live table" not in table


def test_the_table_shows_the_values_a_resumed_trial_trained_with(tmp_path):
    """A resumed trial trains with its checkpoint's values; the sampler's new draw of the same sample may differ in its
    last bits (another machine), and the table and best.yaml give the checkpoint's values, not the draw."""
    from types import SimpleNamespace

    from recbole_ur4rec.common.checkpoint_io import save_checkpoint
    from recbole_ur4rec.experiments.tuning_results import SearchRecorder, trial_checkpoint_dir

    stored, drawn = 0.0025, 0.0025 * (1 + 4e-16)
    assert stored != drawn
    recorder = SearchRecorder(str(tmp_path), {"lr": None}, "# search\n", "NDCG@10", True, str(tmp_path / "checkpoints"))
    trial = SimpleNamespace(trial_id="trial_00000", config={"lr": drawn})
    recorder.on_start(trial)
    recorder.on_result(trial, {"valid_score": 0.07})
    recorder.on_complete(trial)
    folder = trial_checkpoint_dir(recorder.checkpoint_root, trial.trial_id)
    os.makedirs(folder)
    save_checkpoint({"best_valid_score": 0.07, "best_valid_result": {"ndcg@10": 0.07}, "config": {"lr": stored}}, os.path.join(folder, "M-last.pth"))
    save_checkpoint({}, os.path.join(folder, "M.pth"))
    assert recorder.finish(interrupted=False)["params"] == {"lr": stored}
    assert recorder.rows()[0]["lr"] == stored


def test_an_interrupted_search_continues_where_it_stopped(local_ray, walk_root, tmp_path):
    """A search longer than a session: its rerun in the same folder replays each trial's validations to ASHA and
    continues training from the trial's checkpoint, to exactly the uninterrupted search's results."""
    from recbole_ur4rec.experiments.tuning import earlier_trial_state

    params = write(tmp_path / "lr.hyper", "learning_rate choice [1e-5, 5e-3]\n")
    common = dict(config_dict=quick_settings(walk_root, epochs=4), grid=True, seed=3, max_concurrent=1, grace_period=1)
    whole = run_search("SASRec", "walk", params, output_dir=str(tmp_path / "whole"), **common)
    output_dir = str(tmp_path / "resumed")
    cut = run_search("SASRec", "walk", params, output_dir=output_dir, stop_after=2, evaluate_best=False, **common)
    assert sorted(rec["status"] for rec in cut["trials"].values()) == ["failed", "failed"]
    assert all(len(rec["scores"]) == 2 and "stopped after 2" in rec["error"] for rec in cut["trials"].values())

    resumed = run_search("SASRec", "walk", params, output_dir=output_dir, **common)
    assert not resumed["interrupted"] and sorted(resumed["trials"]) == sorted(whole["trials"]) == ["trial_00000", "trial_00001"]
    for trial_id, rec in whole["trials"].items():
        again = resumed["trials"][trial_id]
        assert again["params"] == rec["params"] and again["status"] == rec["status"]
        assert again["scores"] == rec["scores"]  # the 2 replayed validations and the ones trained after them
        assert again["iterations"] == rec["iterations"] == len(rec["scores"])  # ASHA's time axis counts the replayed ones
        # one checkpoint pair per trial: the interrupted run's files are removed once the continued run's are written
        assert len(glob.glob(os.path.join(output_dir, "checkpoints", trial_id, "*.pth"))) == 2
    assert resumed["best"]["trial"] == whole["best"]["trial"]
    assert resumed["best"]["test_result"] == whole["best"]["test_result"]
    assert resumed["best"]["time_s"] > 0  # training seconds of both runs, not the replay's
    # the search time names this run's wall time and every trial's seconds over both runs
    notes = open(os.path.join(output_dir, "results.md"), encoding="utf-8").read()
    all_runs = sum(rec["time_s"] for rec in resumed["trials"].values())
    assert f"; trials: {all_runs:.0f} s in all runs." in notes

    # a rerun with other settings is refused, naming the file and the setting
    with pytest.raises(ValueError, match=r"search\.json.*seed: 3 there, 4 now"):
        run_search("SASRec", "walk", params, output_dir=output_dir, **{**common, "seed": 4})
    # a trial folder written for other values is refused, naming the file and the value
    trial_dir = os.path.join(output_dir, "checkpoints", "trial_00000")
    with pytest.raises(ValueError, match=r"-last\.pth was written by an earlier search .*learning_rate: 1e-05 there, 0\.1 now"):
        earlier_trial_state(trial_dir, {"learning_rate": 0.1})
    # ... but the same sample in other last bits (another machine's exp/log) is the same trial
    stored = next(rec["params"]["learning_rate"] for trial_id, rec in resumed["trials"].items() if trial_id == "trial_00000")
    nudged = stored * (1 + 4e-16)
    assert nudged != stored
    last, state = earlier_trial_state(trial_dir, {"learning_rate": nudged})
    assert last.endswith("-last.pth") and state["config"]["learning_rate"] == stored


def test_include_defaults_runs_the_settings_values_as_the_first_trial(local_ray, walk_root, tmp_path):
    """--include_defaults: trial_00000 trains the searched keys' own values (here the override's), the other
    samples come from the space; grid searches and keys without a value are refused, naming them."""
    params = write(tmp_path / "space.hyper", "learning_rate loguniform -9,-8\nhidden_dropout_prob choice [0.1]\n")
    settings = {**quick_settings(walk_root, epochs=1), "learning_rate": 0.004}
    common = dict(config_dict=settings, seed=3, max_concurrent=1, evaluate_best=False)
    result = run_search("SASRec", "walk", params, output_dir=str(tmp_path / "s"), num_samples=2, include_defaults=True, **common)
    trials = result["trials"]
    assert sorted(trials) == ["trial_00000", "trial_00001"]
    assert trials["trial_00000"]["params"] == {"learning_rate": 0.004, "hidden_dropout_prob": 0.5}  # SASRec.yaml's dropout
    assert math.exp(-9) <= trials["trial_00001"]["params"]["learning_rate"] <= math.exp(-8)
    assert all(rec["status"] == "completed" for rec in trials.values())
    with open(os.path.join(tmp_path, "s", "results.md"), encoding="utf-8") as f:
        assert "trial_00000 runs the defaults" in f.read()
    with pytest.raises(ValueError, match=r"include_defaults with grid.*space\.hyper"):
        run_search("SASRec", "walk", params, output_dir=str(tmp_path / "g"), grid=True, include_defaults=True, **common)
    unknown = write(tmp_path / "unknown.hyper", "no_such_key choice [1, 2]\n")
    with pytest.raises(ValueError, match=r"no value for 'no_such_key' \(searched in .*unknown\.hyper\)"):
        run_search("SASRec", "walk", unknown, output_dir=str(tmp_path / "u"), include_defaults=True, **common)


def test_an_edited_config_file_is_another_search(local_ray, walk_root, tmp_path):
    """Resumed trials keep the settings their checkpoints stored: a rerun after a config file changed is refused."""
    params = write(tmp_path / "lr.hyper", "learning_rate choice [1e-3]\n")
    config_file = write(tmp_path / "model.yaml", "hidden_dropout_prob: 0.2\n")
    common = dict(config_file_list=[str(config_file)], config_dict=quick_settings(walk_root, epochs=1), grid=True, seed=3,
                  output_dir=str(tmp_path / "search"), evaluate_best=False)
    run_search("SASRec", "walk", params, **common)
    write(tmp_path / "model.yaml", "hidden_dropout_prob: 0.3\n")
    with pytest.raises(ValueError, match=r"search\.json.*config_file_settings: .*'hidden_dropout_prob': 0\.2.* there, .*0\.3.* now"):
        run_search("SASRec", "walk", params, **common)


def test_trials_read_relative_paths_from_the_search_directory(local_ray, walk_root, tmp_path, monkeypatch):
    """FTRagRec's search names its DuoRec warm start relative to where the search runs: trials must find it."""
    from recbole_ur4rec.quick_start import run_recbole_ur4rec

    settings = quick_settings(walk_root, epochs=1)
    run_recbole_ur4rec("DuoRec", "walk", config_dict={**settings, "checkpoint_dir": str(tmp_path / "duo")})
    monkeypatch.chdir(tmp_path)
    params = write(tmp_path / "topk.hyper", "retrieval_topk choice [2]\n")
    staged = {**settings, "stages": ["retriever"], "stage_epochs": {"pretrain_backbone": 1, "retriever": 1, "finetune": 1}, "duorec_checkpoint": "duo"}
    staged.pop("learning_rate")
    result = run_search("FTRagRec", "walk", params, config_dict=staged, output_dir="search", grid=True, evaluate_best=False)
    (rec,) = result["trials"].values()
    assert rec["status"] == "completed", rec["error"]


def test_search_settings_name_paths_inside_the_working_directory_relatively(tmp_path, monkeypatch):
    from recbole_ur4rec.experiments.tuning import check_same_search

    monkeypatch.chdir(tmp_path)
    settings = {"config_files": [str(tmp_path / "a.yaml")], "config_dict": {"data_path": str(tmp_path / "data"), "x": "/elsewhere"}}
    check_same_search(str(tmp_path), settings)
    with open(tmp_path / "search.json") as f:
        saved = f.read()
    assert str(tmp_path) not in saved and '"a.yaml"' in saved and '"data"' in saved and '"/elsewhere"' in saved
    check_same_search(str(tmp_path), settings)  # the same search again: accepted


def test_a_failed_trial_shows_its_exception_or_that_ray_kept_no_error_file(tmp_path):
    from types import SimpleNamespace

    from recbole_ur4rec.experiments.tuning_results import SearchRecorder

    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback (most recent call last):\n  ...\nValueError: config key 'x' expects a float\n\n")
    recorder = SearchRecorder(str(tmp_path), {"lr": None}, "# search\n", "NDCG@10", True, str(tmp_path / "checkpoints"))
    for trial_id, path in (("with_file", str(error_file)), ("without_file", None)):
        trial = SimpleNamespace(trial_id=trial_id, config={"lr": 0.1}, error_file=path)
        recorder.on_start(trial)
        recorder.on_error(trial)
    errors = {row["trial"]: row["error"] for row in recorder.rows()}
    assert errors == {"with_file": "ValueError: config key 'x' expects a float", "without_file": "failed (no error file)"}
