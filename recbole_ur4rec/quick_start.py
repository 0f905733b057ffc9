"""Quick start for recbole_ur4rec: RecBole's run/tune/load entry points, with plugin models and safe checkpoints."""
from logging import getLogger

from recbole.utils import set_color

from recbole_ur4rec.build import build, history_masked
from recbole_ur4rec.common import distributed
from recbole_ur4rec.common.checkpoint_io import CheckpointError, load_checkpoint
from recbole_ur4rec.evaluation.slices import user_values
from recbole_ur4rec.registry import get_trainer


def _resume_settings(resume_file, model, dataset, config_dict, state=None):
    """Model, dataset and settings of the run that wrote ``resume_file``, updated by ``config_dict``; and the
    checkpoint itself (``state`` when the caller read it, else read here once: the trainer resumes from it)."""
    state = load_checkpoint(resume_file) if state is None else state
    for given, stored, what in ((model, state["model"], "model"), (dataset, state["dataset"], "dataset")):
        if given is not None and given != stored:
            raise CheckpointError(f"--resume {resume_file} was written for {what} {stored!r}, but {what} {given!r} was asked for")
    return state["model"], state["dataset"], {**state["config"], **(config_dict or {})}, state


def run_recbole_ur4rec(
    model=None,
    dataset=None,
    config_file_list=None,
    config_dict=None,
    saved=True,
    resume_file=None,
    callback_fn=None,
    evaluate_test=True,
    resume_state=None,
    keep_user_values=False,
    nproc=1,
    world_size=-1,
    ip="localhost",
    port="5678",
    group_offset=0,
):
    r"""Train and evaluate any plugin or RecBole model, like RecBole's ``run_recbole`` (and, distributed, its ``run``).

    Args:
        model (str): model name (plugin models first, then RecBole's).
        dataset (str): dataset name.
        config_file_list (list of str): yaml config files.
        config_dict (dict): parameters, above config files and below the command line.
        saved (bool): save the best model (and the resume state); either way the test split is evaluated with the
            best-validation weights (kept in memory when nothing is saved).
        resume_file (str): a checkpoint written by an earlier run of this function; training continues from it
            with the settings it stored (``config_dict`` may update them), writing on in the same files when it lies
            in the run's checkpoint folder (to branch a run, give another ``checkpoint_dir``).
        callback_fn (callable): called as ``callback_fn(epoch_idx, valid_score)`` after each validation; a callback
            that names ``valid_result`` (the validation's metrics) or ``validation`` (its record: epoch, training loss
            of that epoch, score, result, seconds of the run) gets them as keywords.
        evaluate_test (bool): evaluate the test split; tuning trials set it to False.
        resume_state (dict): ``resume_file``'s checkpoint when the caller has read it already (a resumed search
            trial), so that it is not read again.
        keep_user_values (bool): also return each evaluated user's value of ``valid_metric`` with the best-validation
            weights, on test and on validation (evaluated once more), for paired comparisons over users.
        nproc (int): processes (ranks) to start on this machine; with ``world_size``, ``ip``, ``port`` and
            ``group_offset`` (this machine's first global rank) as RecBole's ``run`` takes them. A process started by
            torchrun is one rank of its job already (docs/distributed.md).

    Returns:
        dict: ``best_valid_score``, ``valid_score_bigger``, ``best_valid_result``, ``test_result`` (None when
        not evaluated), ``model_file`` (the best-model checkpoint, None when not saved), ``privacy`` (a trainer's DP
        accounting, FedDMMR's under ``dp_noise_multiplier`` > 0) and, with
        ``keep_user_values``, ``user_values``: ``{"valid": ..., "test": ...}``, each :func:`slices.user_values` (None
        where the evaluation kept no rows). A distributed run returns rank 0's (None on a machine without rank 0).
    """
    settings = distributed.launch_settings(nproc, world_size, ip, port, group_offset)
    if settings is not None:
        if callback_fn is not None:
            raise ValueError("callback_fn is for tuning trials, which run in one process each: run them without nproc/world_size")
        job = (model, dataset, config_file_list, config_dict, saved, resume_file, evaluate_test, keep_user_values)
        if "local_rank" not in settings:  # start this machine's ranks
            return distributed.spawn(_run_rank, settings, *job)
        try:  # torchrun started this process as one rank
            return _run_rank(settings, *job)
        finally:
            distributed.leave()
    if resume_file is not None:
        model, dataset, config_dict, resume_state = _resume_settings(resume_file, model, dataset, config_dict, resume_state)
    config, model, dataset, train_data, valid_data, test_data = build(model, dataset, config_file_list, config_dict)
    logger = getLogger()

    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    if resume_file is not None:
        trainer.resume_checkpoint(resume_file, resume_state)
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"], callback_fn=callback_fn
    )
    test_result = None
    if evaluate_test:
        test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=config["show_progress"])  # the best
        # validation weights, from the best-model file or, when nothing is saved, from memory

    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    result = {
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "model_file": trainer.saved_model_file if saved else None,
    }
    if getattr(trainer, "privacy", None) is not None:  # FedDMMR under DP: epsilon at delta after every round
        result["privacy"] = trainer.privacy
    if keep_user_values:
        metric = config["valid_metric"].lower()
        per_user = {"test": user_values(trainer, dataset, metric) if evaluate_test else None}
        trainer.evaluate(valid_data, load_best_model=True, show_progress=False)  # the best validation's rows again
        per_user["valid"] = user_values(trainer, dataset, metric)
        result["user_values"] = per_user
    return result


def _run_rank(settings, model, dataset, config_file_list, config_dict, saved, resume_file, evaluate_test, keep_user_values):
    """One rank of a distributed run: the run with the rank's place in the job (RecBole's config keys) in its settings."""
    return run_recbole_ur4rec(
        model, dataset, config_file_list, {**(config_dict or {}), **settings}, saved, resume_file,
        evaluate_test=evaluate_test, keep_user_values=keep_user_values,
    )


def objective_function(config_dict=None, config_file_list=None, saved=True, callback_fn=None):
    r"""Objective for hyper-parameter tuning: trains on the train split and reports validation only.

    ``callback_fn(epoch_idx, valid_score)`` receives every validation (Ray Tune reports it so ASHA can stop
    the trial); the test split is left alone, for the caller to evaluate on the best trial's ``model_file``.
    """
    result = run_recbole_ur4rec(
        config_file_list=config_file_list,
        config_dict=config_dict,
        saved=saved,
        callback_fn=callback_fn,
        evaluate_test=False,
    )
    result.pop("test_result")
    return result


def load_data_and_model(model_file, data_path=None, overrides=None):
    r"""Rebuild config, model (with the checkpoint's weights) and data from a plugin checkpoint.

    Args:
        model_file (str): the checkpoint.
        data_path (str): where the data lies now, when the checkpoint was moved without it (the checkpoint stores
            its data root relative to its own folder); default: the stored one.
        overrides (dict): settings that replace the checkpoint's (e.g. an evaluation protocol's
            ``mask_sequence_history``).

    Returns:
        tuple: (config, model, dataset, train_data, valid_data, test_data), as RecBole's function does.
    """
    state = load_checkpoint(model_file)
    settings = dict(state["config"], **({"data_path": data_path} if data_path is not None else {}), **(overrides or {}))
    config, model, dataset, train_data, valid_data, test_data = build(state["model"], state["dataset"], None, settings)
    model.load_state_dict(state["state_dict"])
    model.load_other_parameter(state.get("other_parameter"))
    return config, model, dataset, train_data, valid_data, test_data


# the settings a trained model may be evaluated again with: how the items are ranked, not what was trained
EVALUATION_SETTINGS = ("mask_sequence_history", "mask_history_items")


def evaluate_checkpoint(model_file, data_path=None, overrides=None, keep_user_values=False):
    r"""Evaluate a plugin checkpoint on its validation and test splits (``data_path``: as in
    :func:`load_data_and_model`; ``overrides``: some of :data:`EVALUATION_SETTINGS`).

    Returns:
        dict: ``valid_result`` and ``test_result``; with ``keep_user_values``, ``user_values`` as
        :func:`run_recbole_ur4rec` returns them, and ``history_masked`` (the protocol's masking).
    """
    other = sorted(set(overrides or {}) - set(EVALUATION_SETTINGS) - {"show_progress"})
    if other:
        raise ValueError(f"a checkpoint is evaluated again with {', '.join(EVALUATION_SETTINGS)} only, not {other}: the others change the model")
    config, model, dataset, _, valid_data, test_data = load_data_and_model(model_file, data_path, overrides)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    result, per_user = {"history_masked": history_masked(config)}, {}
    for split, data in (("valid", valid_data), ("test", test_data)):
        result[f"{split}_result"] = trainer.evaluate(data, load_best_model=False, show_progress=config["show_progress"])
        if keep_user_values:
            per_user[split] = user_values(trainer, dataset, config["valid_metric"].lower())
    if keep_user_values:
        result["user_values"] = per_user
    return result
