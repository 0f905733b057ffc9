"""Ray Tune search over recbole_ur4rec and RecBole models: the trainable, the search and the result table.

RecBole's own ``objective_function`` reports the *test* metrics once, at the end of a trial. Here every
trial reports its *validation* score after every epoch (so ASHA can stop poor trials early), the test split
is evaluated for the best trial only, after the search, and every trial writes its checkpoints to its own
absolute folder, so trials work from the working directories Ray gives them.

Search spaces: :mod:`recbole_ur4rec.experiments.search_space`; records and tables: :mod:`recbole_ur4rec.experiments.tuning_results`.
"""
import json
import math
import os
import time
import traceback

from recbole_ur4rec.common.argv import isolated_argv
from recbole_ur4rec.common.checkpoint_io import load_checkpoint, newest_resume_file
from recbole_ur4rec.common.tables import describe, plain, write_json
from recbole_ur4rec.config import Config
from recbole_ur4rec.experiments.compare_report import shown_path
from recbole_ur4rec.experiments.search_space import parse_params_file, to_tune_space
from recbole_ur4rec.experiments.tuning_results import (
    TRIAL_METRIC,
    SearchRecorder,
    best_config_yaml,
    ray_callback,
    trial_checkpoint_dir,
)
from recbole_ur4rec.quick_start import evaluate_checkpoint, run_recbole_ur4rec
from recbole_ur4rec.registry import get_trainer
from recbole_ur4rec.trainer.staged_trainer import StagedTrainer

TRIAL_ID_PREFIX = "trial"  # trial ids trial_00000, trial_00001, ...: the same sample gets the same id in every run
FINISHED_FILE = "finished.json"  # written in a trial's folder once it has trained to its end


class TrialInterrupted(RuntimeError):
    """Raised by a trial told to stop after some validations (``setup["stop_after"]``: tests of resuming)."""


def same_value(stored, sampled):
    """Whether a resume file's stored value is the value sampled now. Floats agree to 1e-9 (relative): the same
    seeded sample can differ in its last bits between machines (NumPy's exp/log follow the CPU's SIMD paths)."""
    stored, sampled = plain(stored), plain(sampled)
    if isinstance(stored, float) and isinstance(sampled, float):
        return math.isclose(stored, sampled, rel_tol=1e-9)
    return stored == sampled


def earlier_trial_state(trial_dir, params):
    """The latest ``-last.pth`` in ``trial_dir`` and its state (``None, None`` when the trial never validated).
    Raises ValueError when that state was written for other values of the searched ``params``."""

    last = newest_resume_file(trial_dir)
    if last is None:
        return None, None
    state = load_checkpoint(last)
    differs = {name: (state["config"].get(name), value) for name, value in params.items() if not same_value(state["config"].get(name), value)}
    if differs:
        raise ValueError(
            f"{last} was written by an earlier search with other values for this trial ("
            + ", ".join(f"{name}: {old!r} there, {new!r} now" for name, (old, new) in differs.items())
            + "): its search space or seed changed; give this search another output_dir or delete that folder"
        )
    return last, state


def run_trial(config, setup):
    """Ray Tune function trainable: train one configuration, reporting the validation score every epoch.

    ``setup`` holds what every trial shares: ``config_file_list`` and ``config_dict`` (absolute paths),
    ``checkpoint_root`` (this trial writes to ``<checkpoint_root>/<trial_id>``), ``bigger`` (whether a larger
    validation score is better), ``threads`` and ``working_dir`` (the search's, where relative paths resolve).

    Resuming: a trial whose folder holds a ``-last.pth`` from an earlier, interrupted run of the same search (trial
    ids are stable: the seeded sampler gives sample k the same values and the id ``trial_0000k``) first reports
    that run's validations again, so ASHA decides on them as before, then continues training exactly where the
    checkpoint stopped (or returns, when it had finished).
    """
    import ray
    from ray.air import session


    if os.path.isdir(setup.get("working_dir") or ""):  # relative paths in the settings (duorec_checkpoint, feature files) mean
        os.chdir(setup["working_dir"])  # what they mean where the search runs; outputs go to absolute folders
    trial_dir = trial_checkpoint_dir(setup["checkpoint_root"], session.get_trial_id())
    config_dict = dict(setup["config_dict"])
    config_dict.update(config)
    config_dict["checkpoint_dir"] = trial_dir
    # RecBole sets CUDA_VISIBLE_DEVICES from gpu_id: give it the GPUs Ray reserved for this trial (none: CPU)
    config_dict["gpu_id"] = ",".join(str(i) for i in ray.get_gpu_ids())
    config_dict.setdefault("threads", setup["threads"])
    last_file, state = earlier_trial_state(trial_dir, config)
    if state is not None:  # continue with the values the trial trained with (a float may differ in its last bits)
        config_dict.update({name: state["config"].get(name) for name in config})
    best = None

    def report(entry):
        nonlocal best
        score = entry["score"]
        if best is None or (score > best if setup["bigger"] else score < best):
            best = score
        # every validation metric and evaluation slice as an extra column, e.g. "valid ndcg@10 tail"
        extra = {f"valid {key.replace('/', ' ')}": float(value) for key, value in entry["result"].items()}
        session.report(
            {**extra, TRIAL_METRIC: score, "best_valid_score": best, "epoch": entry["epoch"], "trial_seconds": entry["seconds"]}
        )

    replayed = (state or {}).get("run_validations", [])
    for entry in replayed:
        report(entry)
    if os.path.isfile(os.path.join(trial_dir, FINISHED_FILE)):
        return

    validations = 0  # of this run

    def after_validation(epoch_idx, valid_score, validation):
        nonlocal validations
        report(validation)
        validations += 1
        if setup.get("stop_after") is not None and validations >= setup["stop_after"]:
            raise TrialInterrupted(f"stopped after {validations} validation(s), as asked")

    with isolated_argv():  # a resumed trial writes on in its files; the test split is left to the best trial
        run_recbole_ur4rec(
            config_dict["model"], config_dict["dataset"], setup["config_file_list"], config_dict, saved=True,
            resume_file=last_file, callback_fn=after_validation, evaluate_test=False, resume_state=state,
        )
    write_json(os.path.join(trial_dir, FINISHED_FILE), {"validations": len(replayed) + validations})


def validation_budget(config):
    """The most validations a trial reports (ASHA's ``max_t``; its time axis counts reports): ``epochs // eval_step``
    (federated models: one round per epoch); staged trainers, which ignore ``epochs``, validate every ``eval_step``
    epochs within each stage of ``stages``, ``stage_epochs`` long."""

    eval_step = max(1, config["eval_step"])
    if issubclass(get_trainer(config["MODEL_TYPE"], config["model"]), StagedTrainer):
        stage_epochs = config["stage_epochs"] or {}
        return max(1, sum(int(stage_epochs.get(name, 0)) // eval_step for name in config["stages"] or []))
    return max(1, config["epochs"] // eval_step)


def _asha(recorder, max_t, grace_period, reduction_factor):
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class _RecordingASHA(ASHAScheduler):
        """ASHA that tells the recorder which trials it stopped before ``max_t``."""

        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP and result.get(self._time_attr, 0) < self._max_t:
                recorder.on_stopped_early(trial)
            return action

    return _RecordingASHA(time_attr="training_iteration", max_t=max_t, grace_period=grace_period, reduction_factor=reduction_factor)


def _stable_ids(generator):
    """Trial ids ``trial_00000``, ``trial_00001``, ... (sample order) instead of a random prefix per run, so that
    a rerun of the search finds each trial's folder."""
    generator._uuid_prefix = TRIAL_ID_PREFIX + "_"
    return generator


SEARCH_FILE = "search.json"  # a search's settings, so that a rerun in the same folder continues the same search


def _shown_paths(value):
    """``value`` with every absolute path inside the working directory made relative (results hold no machine paths)."""
    if isinstance(value, dict):
        return {key: _shown_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shown_paths(item) for item in value]
    return shown_path(value) if isinstance(value, str) and os.path.isabs(value) else value


def check_same_search(output_dir, settings):
    """Write ``<output_dir>/search.json`` on the first run; on a later run (which continues the search: its trials
    resume from their checkpoints), raise ValueError when ``settings`` differ from that file's."""
    path = os.path.join(output_dir, SEARCH_FILE)
    settings = _shown_paths(plain(settings))
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            earlier = json.load(f)
        differs = sorted(key for key in set(settings) | set(earlier) if settings.get(key) != earlier.get(key))
        if differs:
            raise ValueError(
                f"{path}: {output_dir} holds a search with other settings ("
                + "; ".join(f"{key}: {earlier.get(key)!r} there, {settings.get(key)!r} now" for key in differs)
                + "); a rerun continues the same search only: give another output_dir or delete that folder"
            )
    else:
        write_json(path, settings)


def default_values(config, space, params_file):
    """The settings' own values of the searched keys (the defaults trial); ValueError naming a key without one."""
    missing = [name for name in space if config[name] is None]
    if missing:
        raise ValueError(
            f"include_defaults: the settings of {config['model']} have no value for {', '.join(map(repr, missing))} "
            f"(searched in {params_file}); give one in a config file or as an override"
        )
    return {name: plain(config[name]) for name in space}


def _user_settings(config, config_dict):
    """The settings the user gave (config files, then overrides), as the best yaml should repeat them."""
    settings = dict(config.file_config_dict)
    settings.update(config_dict)
    return settings


def run_search(
    model,
    dataset,
    params_file,
    config_file_list=None,
    config_dict=None,
    output_dir=None,
    num_samples=1,
    cpus_per_trial=1,
    gpus_per_trial=0,
    max_concurrent=None,
    address=None,
    seed=None,
    grid=False,
    grace_period=None,
    reduction_factor=2,
    num_cpus=None,
    evaluate_best=True,
    stop_after=None,
    include_defaults=False,
):
    r"""Tune ``model`` on ``dataset`` with Ray Tune and ASHA on the validation metric.

    Args:
        model (str), dataset (str): as for ``run_recbole_ur4rec``.
        params_file (str): search space (see the module docstring).
        config_file_list (list of str), config_dict (dict): settings every trial shares.
        output_dir (str): where the tables, ``best.yaml``, Ray's trial folders (``ray/``) and the trials'
            checkpoints (``checkpoints/<trial_id>/``) go; default ``results/hyper/<dataset>/<model>``.
        num_samples (int): samples of the space (with ``grid``: repetitions of the grid).
        cpus_per_trial, gpus_per_trial: resources Ray reserves for each trial (torch uses cpus_per_trial threads
            unless ``threads`` is set).
        max_concurrent (int): trials running at once (None: as many as the resources allow).
        address (str): join this Ray cluster; otherwise a local Ray with ``num_cpus`` (default: every core).
        seed (int): seed of the sampler and of every trial (RecBole's ``seed``).
        grid (bool): try every ``choice`` value instead of sampling them.
        grace_period (int): validations every trial gets before ASHA may stop it (default: a tenth of the
            validations of :func:`validation_budget`, at least 1); ``reduction_factor``: ASHA keeps 1/reduction_factor
            of the trials per rung.
        evaluate_best (bool): evaluate the best trial's checkpoint on the test split.
        stop_after (int): every trial stops (fails) after this many validations of this run, as if the search
            had been killed (tests of resuming).
        include_defaults (bool): the first trial (``trial_00000``) runs the settings' own values of the searched
            keys (model yaml, config files, overrides) and takes one of the ``num_samples``, so the best trial is
            never worse on validation than the defaults. Not with ``grid``.

    A second run with the same ``output_dir`` and settings continues the search (for searches longer than a
    session): every trial reports the validations its checkpoint holds again, so ASHA decides on them as before,
    and continues training where it stopped; other settings are refused (``search.json``).

    Returns:
        dict: ``best`` (the best trial's record: params, valid_result, test_result, model_file), ``trials``
        (all records), ``best_yaml``, ``results_md``, ``results_csv``, ``interrupted``.
    """
    import ray
    from ray import air, tune
    from ray.tune.search.basic_variant import BasicVariantGenerator


    space = parse_params_file(params_file)
    output_dir = os.path.abspath(output_dir or os.path.join("results", "hyper", dataset, model))
    os.makedirs(output_dir, exist_ok=True)
    config_file_list = [os.path.abspath(f) for f in (config_file_list or [])]
    user_dict = dict(config_dict or {})
    if seed is not None:
        user_dict["seed"] = seed

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    with isolated_argv():
        config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=dict(user_dict))
    if visible is None:  # RecBole's Config sets it from gpu_id; Ray must see the machine's GPUs
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    bigger = bool(config["valid_metric_bigger"])
    valid_metric = config["valid_metric"]
    max_t = validation_budget(config)
    defaults_point = default_values(config, space, params_file) if include_defaults else None
    if include_defaults and grid:
        raise ValueError(
            "include_defaults with grid: Ray Tune's preset point would replace a whole repetition of the grid; "
            f"add the default values to the choices in {params_file} instead"
        )
    grace_period = min(max_t, grace_period or max(1, max_t // 10))

    trial_dict = dict(user_dict, model=model, dataset=dataset)
    # absolute data root: trials run in Ray's working directories
    trial_dict["data_path"] = os.path.dirname(config["data_path"])
    trial_dict.setdefault("show_progress", False)
    checkpoint_root = os.path.join(output_dir, "checkpoints")
    setup = {
        "config_file_list": config_file_list,
        "config_dict": trial_dict,
        "checkpoint_root": checkpoint_root,
        "bigger": bigger,
        "threads": max(1, int(cpus_per_trial)),
        "stop_after": stop_after,
        "working_dir": os.getcwd(),
    }
    check_same_search(
        output_dir,
        {
            "model": model, "dataset": dataset, "space": space, "grid": grid, "num_samples": num_samples, "seed": seed,
            "max_t": max_t, "grace_period": grace_period, "reduction_factor": reduction_factor,
            "config_files": config_file_list, "config_dict": trial_dict,
            # what the files say, so that an edited file is a changed search (resumed trials keep their stored settings)
            **({"config_file_settings": config.file_config_dict} if config_file_list else {}),
            **({"defaults_trial": defaults_point} if include_defaults else {}),
        },
    )

    eval_args = config["eval_args"]
    header = (
        f"# Ray Tune search: {model} on {dataset}\n\n"
        f"- search space ({params_file}): "
        + "; ".join(f"`{n} {k} {v}`" for n, (k, v) in space.items())
        + ("  (choices as a grid)" if grid else "")
        + "\n"
        f"- protocol: split {describe(eval_args['split'])}, order {eval_args['order']}, ranking {describe(eval_args['mode'])}, "
        f"metrics {', '.join(config['metrics'])} @ {config['topk']}; trials selected on their model file's validation "
        f"{valid_metric} (the `valid` columns; `best valid` is the best reported, which for a staged trial stopped "
        f"before its last stage may come from an earlier stage's model); test evaluated only for the best trial\n"
        f"- ASHA on validation {valid_metric} every {config['eval_step']} epoch(s): max_t {max_t}, grace period "
        f"{grace_period}, reduction factor {reduction_factor}; {num_samples} sample(s), {cpus_per_trial} CPU and "
        f"{gpus_per_trial} GPU per trial; seed {config['seed']}\n"
        + (f"- {TRIAL_ID_PREFIX}_00000 runs the defaults of the searched keys (one of the {num_samples} samples)\n" if include_defaults else "")
    )
    recorder = SearchRecorder(output_dir, space, header, valid_metric, bigger, checkpoint_root)
    recorder.write()

    started_ray = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False)
        started_ray = True

    interrupted = True
    best = None
    try:
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, setup=setup), {"cpu": cpus_per_trial, "gpu": gpus_per_trial}
        )
        tuner = tune.Tuner(
            trainable,
            param_space=to_tune_space(space, grid=grid),
            tune_config=tune.TuneConfig(
                metric=TRIAL_METRIC,
                mode="max" if bigger else "min",
                scheduler=_asha(recorder, max_t, grace_period, reduction_factor),
                # a search_alg instance makes Tune ignore max_concurrent_trials: the generator limits itself
                search_alg=_stable_ids(
                    BasicVariantGenerator(
                        random_state=seed, max_concurrent=max_concurrent or 0,
                        points_to_evaluate=[defaults_point] if include_defaults else None,
                    )
                ),
                num_samples=num_samples,
                chdir_to_trial_dir=False,  # run_trial moves to the search's working directory instead
            ),
            run_config=air.RunConfig(
                name="ray",
                storage_path=output_dir,
                callbacks=[ray_callback(recorder)],
                failure_config=air.FailureConfig(max_failures=0),
                verbose=1,
            ),
        )
        start = time.time()
        tuner.fit()
        interrupted = any(rec["status"] == "running" for rec in recorder.trials.values())
        trial_seconds = sum(rec["time_s"] or 0.0 for rec in recorder.trials.values())  # every run of a resumed search
        recorder.notes.append(f"Search time: {time.time() - start:.0f} s; trials: {trial_seconds:.0f} s in all runs.")
    finally:
        best = recorder.finish(interrupted)
        best_yaml = os.path.join(output_dir, "best.yaml")
        if best is not None:
            best_config_yaml(
                best_yaml,
                model,
                dataset,
                _user_settings(config, user_dict),
                best["params"],
                [
                    f"Best of {len(recorder.trials)} Ray Tune trial(s) for {model} on {dataset}, chosen on validation "
                    f"{valid_metric} = {recorder.model_score(best):.4f} (trial {best['trial']}); table: results.md",
                ],
            )
        if interrupted:
            recorder.notes.append("The search was interrupted: the table holds the trials that had reported.")
        recorder.write()
        if started_ray:
            ray.shutdown()

    if best is not None and evaluate_best and not interrupted:
        try:
            evaluated = evaluate_checkpoint(best["model_file"])
            best["test_result"] = plain(dict(evaluated["test_result"]))
            best["reevaluated_valid_result"] = plain(dict(evaluated["valid_result"]))
        except Exception:  # the search's results stay written; say why the test is missing
            recorder.notes.append("Test evaluation of the best trial failed:\n\n```\n" + traceback.format_exc() + "```")
            raise
        finally:
            recorder.write()
    elif best is not None:
        recorder.notes.append(f"Test not evaluated; run: python run_recbole_ur4rec.py --checkpoint {best['model_file']}")
        recorder.write()
    return {
        "best": best,
        "trials": recorder.trials,
        "best_yaml": os.path.join(output_dir, "best.yaml") if best is not None else None,
        "results_md": os.path.join(output_dir, "results.md"),
        "results_csv": os.path.join(output_dir, "results.csv"),
        "interrupted": interrupted,
        "valid_metric": valid_metric,
    }
