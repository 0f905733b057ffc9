"""Building a model the way the quick start does, and comparing its parameters, for the model tests."""
import math

import torch

from recbole_ur4rec.build import build


def build_model(model, dataset, config_dict):
    """(config, model, train_data, valid_data, test_data), built as every entry point builds a run."""
    run = build(model, dataset, config_dict=config_dict, log=False)
    return run.config, run.model, run.train_data, run.valid_data, run.test_data


def snapshot(model):
    """A detached copy of every parameter, by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed_groups(model, before):
    """Groups with at least one parameter that differs from ``before``; untouched ones are bit-identical."""
    group_of = {id(p): group for group, params in model.parameter_groups().items() for p in params}
    return {group_of[id(p)] for name, p in model.named_parameters() if not torch.equal(before[name], p)}


def count_checkpoint_reads(monkeypatch):
    """The list of paths ``load_checkpoint`` reads from now on (it grows as checkpoints are read)."""
    import builtins

    import recbole_ur4rec.common.checkpoint_io as checkpoints

    paths = []

    def counting_open(path, *args, **kwargs):
        paths.append(str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "open", counting_open, raising=False)
    return paths


def assert_best_file_holds(run, expected):
    """``run``'s best-model file names the best validation's score and metrics (``expected``'s), not the improvement
    before it (RecBole sets ``best_valid_result`` after saving)."""
    from recbole_ur4rec.common.checkpoint_io import load_checkpoint

    best = load_checkpoint(run["model_file"])
    assert best["best_valid_result"] == expected["best_valid_result"]
    assert best["best_valid_score"] == expected["best_valid_score"]


def assert_user_values_are_the_results(run, metric="ndcg@10"):
    """``run`` (``run_recbole_ur4rec(..., keep_user_values=True)``) holds one value per evaluated user on validation
    and test, whose mean is the recorded best validation's and test's ``metric`` (RecBole rounds to 4 decimals)."""
    for split, recorded in (("valid", run["best_valid_result"]), ("test", run["test_result"])):
        values = run["user_values"][split]
        assert len(values["users"]) == len(set(values["users"])) == len(values[metric]) > 0
        assert abs(sum(values[metric]) / len(values[metric]) - recorded[metric]) <= 0.5e-4 + 1e-9, split


def ranks_by_hand(model, eval_data):
    """(users [N], ranks [N]): each evaluated row's user id and the rank of its target under ``model``'s full-sort
    scores (padding item and masked history excluded), computed without RecBole's evaluator."""
    model.eval()
    users, ranks = [], []
    with torch.no_grad():
        for interaction, history_index, positive_u, positive_i in eval_data:
            scores = model.full_sort_predict(interaction).view(len(interaction), -1)
            scores[:, 0] = -math.inf
            if history_index is not None:
                scores[history_index] = -math.inf
            target = scores[positive_u, positive_i]
            ranks.append((scores > target.unsqueeze(1)).sum(1) + 1)
            users.append(interaction["user_id"])
    return torch.cat(users), torch.cat(ranks)


def untrained_test_ndcg10(model, dataset, config_dict):
    """Test NDCG@10 of ``model`` as built, before any training: the baseline a trained model must beat."""
    from recbole_ur4rec.registry import get_trainer

    run = build(model, dataset, config_dict=config_dict, log=False)
    trainer = get_trainer(run.config["MODEL_TYPE"], model)(run.config, run.model)
    return trainer.evaluate(run.test_data, load_best_model=False)["ndcg@10"]
