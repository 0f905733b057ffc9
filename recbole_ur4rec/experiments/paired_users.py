"""Two models' cells compared user by user: how much of a gap between their means the test users can tell apart.

    python -m recbole_ur4rec.experiments.paired_users --cells results/ml-100k-tuned/cells --models FastSASRec,SASRec

A comparison's seed std measures training noise only: every seed is evaluated on the same users, whose sampling
noise it leaves out. This script takes each cell's per-user values of ``--metric`` on ``--split`` (the seeds both
models have) from the cell's ``<cell>.users.json``, which ``run_compare`` writes; a cell without one has its model
file re-evaluated, and the values are written into its users file. Either way the values' mean must equal the cell's
recorded metric (else they are not the cell's model's, and it stops). It averages each user's value over the seeds
and bootstraps the users (paired: one resample of users for both models) for the mean difference A - B: its 95%
interval and the share of resamples on the other side of zero. Writes ``paired_<A>_<B>_<split>.md`` (and ``.json``)
beside the cells folder.
"""
import argparse
import json
import os
import re
import statistics

import numpy as np
import torch

from recbole_ur4rec.common.tables import read_json, write_json
from recbole_ur4rec.evaluation.slices import user_values
from recbole_ur4rec.experiments.compare_report import cell_name
from recbole_ur4rec.quick_start import load_data_and_model
from recbole_ur4rec.registry import get_trainer

RESAMPLES = 10000
TOLERANCE = 0.5e-4 + 1e-9  # RecBole rounds a recorded metric to 4 decimals (metric_decimal_place)


def cell_file(cells, label, seed):
    return os.path.join(cells, cell_name(label, seed) + ".json")


def users_file(cell_path):
    """The per-user values beside the cell file ``<cell>.json``: ``<cell>.users.json``."""
    return cell_path[: -len(".json")] + ".users.json"


def finished_seeds(cells, label):
    """The seeds whose cell for ``label`` finished, from the cell files ``<label>-seed<N>.json``."""
    pattern = re.compile(re.escape(cell_name(label, "")) + r"(\d+)\.json")
    seeds = []
    for name in sorted(os.listdir(cells)):
        match = pattern.fullmatch(name)
        if match and (read_json(os.path.join(cells, name)) or {}).get("status") == "ok":
            seeds.append(int(match.group(1)))
    return seeds


def evaluated_values(cell, cell_path, split, metric):
    """The per-user values (``slices.user_values``) of ``metric`` on ``split``, from the cell's model file."""
    model_file = cell.get("model_file")
    if not model_file or not os.path.isfile(model_file):
        raise SystemExit(f"{cell_path}: no {split} {metric} in {users_file(cell_path)} and its model_file {model_file!r} "
                         "is not here (model files are not committed: rerun the cell, or run this where it ran)")
    overrides = (cell.get("evaluated_from") or {}).get("overrides")  # a cell evaluated again (reevaluate.py): its ranking
    config, model, dataset, _, valid_data, test_data = load_data_and_model(model_file, overrides=overrides)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.evaluate(valid_data if split == "valid" else test_data, load_best_model=False)
    try:
        values = user_values(trainer, dataset, metric)
    except ValueError as err:
        raise SystemExit(f"--metric: {model_file}: {err}") from None
    if values is None:
        raise SystemExit(f"{model_file}: its {split} evaluation kept no per-user rows (a central full-ranking evaluation "
                         "does; FedDMMR's node-side and sampled evaluations do not)")
    return values


def cell_values(cell_path, split, metric):
    """{user token: value} of ``metric`` on ``split`` for the cell ``cell_path``: from its users file, else from its
    model file (then added to its users file); their mean must be the cell's recorded value."""
    cell = read_json(cell_path)
    stored = read_json(users_file(cell_path)) or {}
    entry, source = stored.get(split) or {}, users_file(cell_path)
    evaluated = metric not in entry
    if evaluated:
        values, source = evaluated_values(cell, cell_path, split, metric), cell["model_file"]
        if entry and entry["users"] != values["users"]:  # one list of users per split, for all its metrics
            raise SystemExit(f"{users_file(cell_path)}: its {split} users are not those {source} evaluates")
        entry = {**entry, **values}
    users, values = entry["users"], entry[metric]
    if len(set(users)) != len(users):
        raise SystemExit(f"{source}: a user was evaluated twice on {split}; a paired comparison needs one row each")
    recorded = cell[f"{split}_result"][metric]
    mean = statistics.fmean(values)
    if abs(mean - recorded) > TOLERANCE:
        raise SystemExit(f"{source}: its users' mean {split} {metric} is {mean:.6f}, its cell {cell_path} recorded "
                         f"{recorded}: not the cell's model (or other data)")
    if evaluated:
        write_json(users_file(cell_path), {**stored, split: entry}, indent=None)
    return dict(zip(users, values))


def paired_bootstrap(diff, resamples=RESAMPLES, seed=0):
    """(mean, standard error, 2.5% and 97.5% points, share of resamples on the other side of zero) of the mean of
    ``diff`` [N] over bootstrap resamples of its rows."""
    diff = np.asarray(diff, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # 1000 resamples of N rows at a time
        stop = min(start + 1000, resamples)
        means[start:stop] = diff[rng.integers(0, len(diff), size=(stop - start, len(diff)))].mean(axis=1)
    mean = float(diff.mean())
    other_side = float(np.mean(means <= 0) if mean > 0 else np.mean(means >= 0))
    low, high = np.percentile(means, [2.5, 97.5])
    return mean, float(means.std(ddof=1)), float(low), float(high), other_side


def compare(cells, model_a, model_b, split="test", metric="ndcg@10", seeds=None):
    """The paired comparison over the seeds both models finished (``seeds``: only these, each finished by both)."""
    finished = sorted(set(finished_seeds(cells, model_a)) & set(finished_seeds(cells, model_b)))
    missing = sorted(set(seeds or ()) - set(finished))
    if missing:
        raise SystemExit(f"--seeds {', '.join(map(str, missing))}: no finished cell for both {model_a} and {model_b} "
                         f"in {cells} (both finished: {', '.join(map(str, finished)) or 'none'})")
    seeds = sorted(seeds) if seeds else finished
    if not seeds:
        raise SystemExit(f"{cells}: no seed has a finished cell for both {model_a} and {model_b}")
    per_model, seed_means = {}, {}
    for label in (model_a, model_b):
        runs = [cell_values(cell_file(cells, label, seed), split, metric) for seed in seeds]
        users = set(runs[0])
        if any(set(run) != users for run in runs):
            raise SystemExit(f"{label}: its seeds evaluated different users on {split}")
        per_model[label] = {user: statistics.fmean(run[user] for run in runs) for user in users}
        seed_means[label] = [statistics.fmean(run.values()) for run in runs]
    if set(per_model[model_a]) != set(per_model[model_b]):
        raise SystemExit(f"{model_a} and {model_b} evaluated different users on {split}")
    users = sorted(per_model[model_a])
    a = np.array([per_model[model_a][u] for u in users])
    b = np.array([per_model[model_b][u] for u in users])
    mean, se, low, high, other_side = paired_bootstrap(a - b)
    return {
        "cells": cells, "split": split, "metric": metric, "seeds": seeds, "users": len(users),
        "models": [model_a, model_b], "seed_means": seed_means,
        "mean": {model_a: float(a.mean()), model_b: float(b.mean())},
        "user_se": {model_a: float(a.std(ddof=1) / np.sqrt(len(a))), model_b: float(b.std(ddof=1) / np.sqrt(len(b)))},
        "difference": mean, "difference_se": se, "interval_95": [low, high], "other_side_share": other_side,
        "users_a_better": int((a > b).sum()), "users_b_better": int((a < b).sum()), "resamples": RESAMPLES,
    }


def markdown(r):
    a, b = r["models"]
    seeds = ", ".join(map(str, r["seeds"]))
    rel = r["difference"] / r["mean"][b]
    lines = [
        f"# {a} against {b}, user by user: {r['split']} {r['metric']}",
        "",
        f"Cells: `{r['cells']}`, seeds {seeds}; each cell's per-user values (their mean equals its cell's), each "
        f"user's value averaged over the seeds; paired bootstrap over the {r['users']} users, {r['resamples']} resamples "
        "(`recbole_ur4rec/experiments/paired_users.py`).",
        "",
        f"| model | {r['metric']} per seed | mean over seeds | standard error over users |",
        "|---|---|---|---|",
    ]
    for label in (a, b):
        per_seed = " / ".join(f"{v:.4f}" for v in r["seed_means"][label])
        lines.append(f"| {label} | {per_seed} | {r['mean'][label]:.4f} | {r['user_se'][label]:.4f} |")
    low, high = r["interval_95"]
    lines += [
        "",
        f"{a} - {b}: {r['difference']:+.4f} ({rel:+.1%}), standard error {r['difference_se']:.4f}, 95% interval "
        f"[{low:+.4f}, {high:+.4f}]; {r['other_side_share']:.1%} of the resamples on the other side of zero. Users "
        f"where {a} scores higher: {r['users_a_better']}, lower: {r['users_b_better']}, "
        f"equal: {r['users'] - r['users_a_better'] - r['users_b_better']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", required=True, help="a comparison's cells folder (run_compare's <output>/cells)")
    parser.add_argument("--models", required=True, help="A,B: two labels of that comparison")
    parser.add_argument("--split", choices=("valid", "test"), default="test")
    parser.add_argument("--metric", default="ndcg@10")
    parser.add_argument("--seeds", help="comma-separated seeds to compare (default: every seed both models finished)")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    if len(models) != 2:
        raise SystemExit(f"--models: two labels, A,B; got {args.models!r}")
    torch.set_num_threads(1)
    seeds = [int(seed) for seed in args.seeds.split(",")] if args.seeds else None
    result = compare(args.cells, *models, split=args.split, metric=args.metric, seeds=seeds)
    stem = os.path.join(os.path.dirname(os.path.normpath(args.cells)),
                        f"paired_{models[0]}_{models[1]}_{args.split}".replace(":", "_"))
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(result))
    print(markdown(result))
    print(f"wrote {stem}.md and {stem}.json")


if __name__ == "__main__":
    main()
