"""Evaluate a comparison's finished cells again under other evaluation settings, from their kept best models.

A cell of :mod:`recbole_ur4rec.experiments.compare` keeps its best-validation model file. This writes, for each
finished cell of ``--cells``, a cell of the same name in ``<output_dir>/cells/`` whose validation and test results and
per-user values are that model's under the settings given (e.g. ``mask_sequence_history=True``: the S3Rec / ICSRec
codebases' ranking without each user's earlier items; only such ranking settings, ``EVALUATION_SETTINGS``); everything else (training settings, epochs, seconds, memory)
is the trained cell's. The cell's ``settings.overrides`` hold the new settings, so ``run_compare.py --report_only``
with the same models, seeds and ``--extra`` settings writes the tables and the paired intervals read them.
The model is not retrained: it was chosen on validation under the trained cell's settings; the cell's time, memory,
log and code version stay the training's, and ``evaluated_from`` records the evaluation (its settings, code version
and seconds). Resumable: a cell already evaluated from the same model file with the same settings is kept (also when
the code changed since: remove the output cell to evaluate it again). Run it in the folder the comparison ran in.

    python -m recbole_ur4rec.experiments.reevaluate results/amazon-beauty/cells results/amazon-beauty-masked \\
        --extra mask_sequence_history=True
"""
import argparse
import gc
import glob
import os
import time
from logging import getLogger

from recbole_ur4rec.common.argv import isolated_argv, parse_overrides
from recbole_ur4rec.common.tables import read_json, write_json
from recbole_ur4rec.experiments.compare import code_version
from recbole_ur4rec.experiments.compare_report import shown_path
from recbole_ur4rec.quick_start import EVALUATION_SETTINGS, evaluate_checkpoint


def finished_cells(cells_dir, models=None):
    """{cell name: cell} of the finished cells in ``cells_dir`` (of ``models`` labels only, when given)."""
    cells = {}
    for path in sorted(glob.glob(os.path.join(cells_dir, "*.json"))):
        name = os.path.basename(path)[: -len(".json")]
        if name.endswith((".users", ".partial")):
            continue
        cell = read_json(path)
        if not cell or cell.get("status") != "ok" or (models and cell["settings"]["model"] not in models):
            continue
        cells[name] = cell
    return cells


def reevaluate_cell(cell, name, output_cells, overrides):
    """The cell ``name`` evaluated again with ``overrides`` (written to ``output_cells``); returns the new cell."""
    model_file = cell.get("model_file")
    if not model_file or not os.path.isfile(model_file):
        raise FileNotFoundError(
            f"cell {name}: its best model {model_file!r} is not here (model files are not committed; the path is "
            f"relative to the folder the comparison ran in): run this in that folder, on the machine that trained it"
        )
    begin = time.time()
    with isolated_argv():
        result = evaluate_checkpoint(model_file, overrides={"show_progress": False, **overrides}, keep_user_values=True)
    users_path = os.path.join(output_cells, name + ".users.json")
    write_json(users_path, result["user_values"], indent=None)
    settings = dict(cell["settings"], overrides={**cell["settings"]["overrides"], **overrides})
    new = dict(
        cell, settings=settings, valid_result=dict(result["valid_result"]), test_result=dict(result["test_result"]),
        user_values=shown_path(users_path),
        protocol=dict(cell.get("protocol") or {}, history_masked=result["history_masked"]),
        evaluated_from={"cell": name, "model_file": model_file, "overrides": overrides, "code": code_version(),
                        "seconds": round(time.time() - begin, 1)},
    )
    write_json(os.path.join(output_cells, name + ".json"), new)
    return new


def reevaluate(cells_dir, output_dir, overrides, models=None):
    """Evaluate every finished cell of ``cells_dir`` again with ``overrides``; returns {name: "evaluated" | "kept" |
    error text}."""
    bad = sorted(set(overrides) - set(EVALUATION_SETTINGS))
    if bad:
        raise ValueError(f"--extra {', '.join(bad)}: a trained cell is evaluated again with {', '.join(EVALUATION_SETTINGS)} only")
    output_cells = os.path.join(output_dir, "cells")
    os.makedirs(output_cells, exist_ok=True)
    outcome = {}
    for name, cell in finished_cells(cells_dir, models).items():
        done = read_json(os.path.join(output_cells, name + ".json")) or {}
        source = done.get("evaluated_from") or {}
        if source.get("model_file") == cell.get("model_file") and source.get("overrides") == overrides:
            outcome[name] = "kept"
            continue
        try:
            reevaluate_cell(cell, name, output_cells, overrides)
            outcome[name] = "evaluated"
        except Exception as err:  # the others go on; the failure is reported
            outcome[name] = f"{type(err).__name__}: {err}"
            getLogger().error(f"[reevaluate] {name}: {outcome[name]}")
        gc.collect()
    return outcome


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cells", help="a comparison's cells folder (<output_dir>/cells)")
    parser.add_argument("output_dir", help="where the re-evaluated cells go (<output_dir>/cells)")
    parser.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE", help="an evaluation setting (repeatable)")
    parser.add_argument("--models", default=None, help="comma-separated model labels (default: every finished cell)")
    args = parser.parse_args(argv)
    overrides = parse_overrides(parser, [], extra=args.extra)
    if not overrides:
        parser.error("give the settings to evaluate with, e.g. --extra mask_sequence_history=True")
    outcome = reevaluate(args.cells, args.output_dir, overrides, args.models.split(",") if args.models else None)
    for name, what in outcome.items():
        print(f"[reevaluate] {name}: {what}")
    if any(what not in ("evaluated", "kept") for what in outcome.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
