"""Side-by-side comparison of models x seeds on one dataset and one protocol.

Every (model, seed) cell trains and tests in its own subprocess (``python -m recbole_ur4rec.experiments.compare --cell``),
so its peak memory is that process's maximum resident set size and a crash stays inside the cell. Each cell
writes ``<output_dir>/cells/<model>-seed<seed>.json`` (beside it its log and ``<model>-seed<seed>.users.json``:
each evaluated user's value of the valid metric on validation and test, for paired tests over users); finished
cells whose settings (model, dataset, seed, config files and their contents, overrides) have not changed are not
rerun, failed cells are.
A cell that was interrupted continues from its last checkpoint. After every cell the tables are rewritten:
``compare.md`` (mean ± std over seeds, with the protocol in its header), ``compare.csv``, ``compare_cells.csv``
and ``compare.png`` (test metrics, error bars: std over seeds).
"""
import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import time
import traceback
from logging import getLogger

from recbole_ur4rec.build import history_masked
from recbole_ur4rec.common.argv import isolated_argv
from recbole_ur4rec.common.checkpoint_io import load_checkpoint, newest_resume_file
from recbole_ur4rec.common.machine import machine_fingerprint
from recbole_ur4rec.common.paths import PACKAGE_DIR
from recbole_ur4rec.common.tables import describe, plain, read_json, write_json
from recbole_ur4rec.config import Config
from recbole_ur4rec.experiments.compare_report import cell_name, shown_path, write_report
from recbole_ur4rec.quick_start import run_recbole_ur4rec

logger = getLogger(__name__)
DEFAULT_MODELS = ("SASRec", "GRU4Rec", "BERT4Rec", "FEARec")
DEFAULT_SEED = 2020  # RecBole's default seed; --seeds N runs 2020 .. 2020+N-1


MAX_SEED_COUNT = 100  # a larger "count" is almost surely a seed meant as one (--seeds 2020): refused, with the list form


def parse_seeds(text):
    """``"3"`` -> [2020, 2021, 2022]; ``"1,7,42"`` -> [1, 7, 42]; ``"42,"`` -> [42]."""
    text = str(text).strip()
    if "," not in text:
        count = int(text)
        if count < 1:
            raise ValueError(f"--seeds {text}: give a number of seeds >= 1 or a comma-separated list")
        if count > MAX_SEED_COUNT:
            raise ValueError(
                f"--seeds {text}: a number is a count of seeds ({DEFAULT_SEED} .. {DEFAULT_SEED + count - 1} here); for the "
                f"one seed {text} write --seeds {text}, (a list); counts above {MAX_SEED_COUNT} are refused"
            )
        return [DEFAULT_SEED + i for i in range(count)]
    return [int(s) for s in text.split(",") if s.strip()]


def model_of(label):
    """``"UR4Rec:flat"`` -> ``"UR4Rec"``: a label ``Model:variant`` runs ``Model`` with the variant's own config files."""
    return label.split(":", 1)[0]


def _file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def cell_settings(model, dataset, seed, config_files, overrides, ranks=1):
    """What decides a cell's result; a finished cell is reused only when these are unchanged (``ranks``: the world
    size of a distributed cell, whose ranks draw their own dropout and negatives)."""
    settings = {
        "model": model,
        "dataset": dataset,
        "seed": seed,
        "config_files": [[shown_path(path), _file_digest(path)] for path in config_files],
        "overrides": overrides,
    }
    if ranks > 1:
        settings["ranks"] = ranks
    return plain(settings)




def code_version():
    """The code a cell runs: ``source`` (a hash of the package's .py, .yaml and .toml files: what decides a
    result), and, when the package sits in a git work tree, its ``commit`` and whether the package is ``clean``
    (no uncommitted change under it)."""
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(PACKAGE_DIR)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".yaml", ".toml")):
                path = os.path.join(root, name)
                digest.update(os.path.relpath(path, PACKAGE_DIR).encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
    version = {"source": digest.hexdigest()[:16], "commit": None, "clean": None}
    try:
        git = lambda *args: subprocess.run(["git", *args], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=30)  # noqa: E731
        head = git("rev-parse", "HEAD")
        if head.returncode == 0:
            version["commit"] = head.stdout.strip()
            version["clean"] = git("status", "--porcelain", "--", PACKAGE_DIR).stdout.strip() == ""
    except (OSError, subprocess.SubprocessError):  # no git: the source hash still identifies the code
        pass
    return version


# ----------------------------------------------------------------------------------------- one cell (child)


def _tail(path, lines=15):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def trained_epochs(state):
    """Epochs a checkpoint's run had trained: its ``trained_epochs`` (staged trainers count over their stages), or
    ``epoch`` + 1 in files written before that was recorded."""
    value = state.get("trained_epochs")
    return value if value is not None else state["epoch"] + 1


def run_cell(spec):
    """Train and test one (model, seed) cell; runs in the child process and writes ``spec['child_json']``."""

    out = {"status": "failed", "error": None, "code": code_version()}  # the code this process runs
    try:
        # progress bars would only fill the cell's log; they do not change results
        config_dict = {"show_progress": False, **spec["overrides"], "seed": spec["seed"], "checkpoint_dir": spec["checkpoint_dir"]}
        with isolated_argv():
            config = Config(
                model=spec["model"], dataset=spec["dataset"], config_file_list=spec["config_files"], config_dict=dict(config_dict)
            )
            out["protocol"] = {
                "split": describe(config["eval_args"]["split"]),
                "order": config["eval_args"]["order"],
                "group_by": config["eval_args"]["group_by"],
                "ranking": describe(config["eval_args"]["mode"]),
                "metrics": ", ".join(config["metrics"]),
                "topk": ", ".join(str(k) for k in config["topk"]),
                "valid_metric": config["valid_metric"],
                "epochs": config["epochs"],
                "stopping_step": config["stopping_step"],
                "history_masked": history_masked(config),
            }
            if config["stages"] and isinstance(config["stage_epochs"], dict):  # staged trainers: epochs per stage
                out["protocol"]["stage_epochs"] = {stage: config["stage_epochs"].get(stage) for stage in config["stages"]}
            resume_file = newest_resume_file(spec["checkpoint_dir"]) if spec.get("resume") else None
            out["resumed_from"] = shown_path(resume_file) if resume_file else None
            result = run_recbole_ur4rec(
                model=None if resume_file else spec["model"],
                dataset=None if resume_file else spec["dataset"],
                config_file_list=spec["config_files"],
                config_dict=config_dict,
                saved=True,
                resume_file=resume_file,
                keep_user_values=True,
                **spec.get("distributed", {}),
            )
        if result is None:  # a machine of a distributed cell without rank 0: the cell is recorded on rank 0's
            out.update(status="other_machine", error="rank 0 of this distributed cell ran on another machine, which records it")
            write_json(spec["child_json"], out)
            return out
        best = load_checkpoint(result["model_file"])
        last_file = os.path.splitext(result["model_file"])[0] + "-last.pth"
        last = load_checkpoint(last_file) if os.path.isfile(last_file) else best
        out.update(
            status="ok",
            valid_result=dict(result["best_valid_result"]),
            test_result=dict(result["test_result"]),
            model_file=shown_path(result["model_file"]),
            num_parameters=sum(t.numel() for t in best["state_dict"].values() if t.is_floating_point()),
            best_epoch=trained_epochs(best),
            epochs_trained=trained_epochs(last),
            epochs_over_stages=last.get("trained_epochs") is not None,  # False: a staged run's counts are its last stage's
            machine=machine_fingerprint(),  # read after the run set its threads
            train_losses=[validation.get("train_loss") for validation in last.get("run_validations") or []],
            # every validation of the run: run epoch, validation score, seconds of training and validation so far
            validations=[
                {"epoch": v["epoch"], "score": v["score"], "seconds": v.get("seconds")} for v in last.get("run_validations") or []
            ],
            privacy=result.get("privacy"),  # FedDMMR under DP: epsilon at delta after every round
        )
        # each user's value of the valid metric, for paired comparisons over users; one line: 2 lists per split
        write_json(spec["user_values_json"], result["user_values"], indent=None)
        out["user_values"] = shown_path(spec["user_values_json"])
        for path in glob.glob(os.path.join(spec["checkpoint_dir"], "*.pth")):
            if path != result["model_file"]:
                os.remove(path)  # resume states and earlier segments' files; the best model stays for reloading
    except Exception as err:  # the cell is reported as failed with its error; the comparison goes on
        out["error"] = f"{type(err).__name__}: {err}"
        out["traceback"] = traceback.format_exc()
        traceback.print_exc()
    write_json(spec["child_json"], out)
    return out


# ----------------------------------------------------------------------------------------- the comparison


class CellInterrupted(KeyboardInterrupt):
    """Ctrl-C while a cell ran; carries the time and peak memory of the cell's process so far."""

    def __init__(self, elapsed, peak_rss_mb):
        super().__init__(elapsed, peak_rss_mb)
        self.elapsed, self.peak_rss_mb = elapsed, peak_rss_mb


def _run_cell_process(spec, log_path):
    """Run one cell in a subprocess; returns (returncode, wall seconds, peak RSS in MB)."""
    start = time.time()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {spec['model']} seed {spec['seed']}\n")
        log.flush()
        process = subprocess.Popen(
            [sys.executable, "-m", "recbole_ur4rec.experiments.compare", "--cell", json.dumps(spec)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except KeyboardInterrupt:  # a terminal's Ctrl-C reaches the child too; make sure it ends, then stop
            process.terminate()
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            raise CellInterrupted(time.time() - start, usage.ru_maxrss / 1024.0) from None
    returncode = process.returncode = os.waitstatus_to_exitcode(status)
    return returncode, time.time() - start, usage.ru_maxrss / 1024.0


def same_settings(a, b):
    """Whether two cells' settings decide the same result: equal, with config files compared by content (their
    digests, in order), not by where they lie."""
    def content(settings):
        return {**settings, "config_files": [digest for _, digest in settings.get("config_files", [])]}

    return a is not None and b is not None and content(a) == content(b)


def _reusable(done, settings, code, other_code):
    """Whether the finished cell record ``done`` stands for ``settings`` (run by this ``code``, or ``other_code``)."""
    if not done or done.get("status") != "ok" or not same_settings(done.get("settings"), settings):
        return False
    return other_code or (done.get("code") or {}).get("source") == code["source"]


def _claim(cells_dir, name):
    """Claim cell ``name`` for this process (a ``<name>.lock`` file holding its pid); False when a live process
    holds it: two comparisons over one folder share its cells instead of running one twice. A lock whose process
    is gone is taken over."""
    path = os.path.join(cells_dir, name + ".lock")
    for _ in range(2):
        try:
            with open(path, "x") as f:
                f.write(str(os.getpid()))
            return True
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read().strip())
                if pid <= 0:  # os.kill(0, ...) would ask this process group, not a holder
                    raise ValueError(pid)
                os.kill(pid, 0)  # raises when no such process
                return pid == os.getpid()
            except (ValueError, ProcessLookupError):
                os.remove(path)  # stale: its process ended without removing it (or before writing its pid)
            except PermissionError:  # a live process of another user
                return False
    return False


def _release(cells_dir, name):
    try:
        os.remove(os.path.join(cells_dir, name + ".lock"))
    except FileNotFoundError:
        pass


def run_compare(
    models=DEFAULT_MODELS,
    dataset="ml-100k",
    seeds=(DEFAULT_SEED,),
    config_files=None,
    model_configs=None,
    config_dir=None,
    overrides=None,
    output_dir=None,
    report_only=False,
    reuse_other_code=False,
    distributed=None,
):
    r"""Run every (model, seed) cell that is not finished yet, then write the comparison table and chart.

    Args:
        models (list of str): plugin or RecBole model names.
        dataset (str): dataset name.
        seeds (list of int): RecBole ``seed`` of each repetition.
        config_files (list of str): config files every model uses.
        model_configs (dict): model name -> list of its own config files (after the shared ones).
        config_dir (str): folder where ``<Model>.yaml``, when present, is a model's own config file
            (used when ``model_configs`` names none for that model).
        overrides (dict): settings above the config files for every cell (e.g. ``{"epochs": 20}``).
        output_dir (str): default ``results/<dataset>``.
        report_only (bool): run nothing; write the tables from the finished cells (the others show as not finished).
        reuse_other_code (bool): reuse finished cells that ran another version of the package (:func:`code_version`);
            by default they are rerun. The table's header lists the code versions of its cells either way.
        distributed (dict): each cell's ranks, ``run_recbole_ur4rec``'s ``nproc``, ``world_size``, ``ip``, ``port``
            and ``group_offset`` (docs/distributed.md); the machine of rank 0 records the cells.

    Returns:
        dict: ``ran`` and ``reused`` (cell names), ``cells`` (name -> cell record), ``rows`` (one per model),
        and the paths ``md``, ``csv``, ``cells_csv``, ``png``.
    """
    output_dir = os.path.abspath(output_dir or os.path.join("results", dataset))
    cells_dir = os.path.join(output_dir, "cells")
    os.makedirs(cells_dir, exist_ok=True)
    overrides = dict(overrides or {})
    model_configs = dict(model_configs or {})
    unknown = sorted(set(model_configs) - set(models))
    if unknown:
        raise ValueError(f"--model_config names {unknown}, which are not among the models {list(models)}")
    shared = [os.path.abspath(f) for f in (config_files or [])]
    files_of = {}
    for model in models:
        own = model_configs.get(model)
        if own is None and config_dir and os.path.isfile(os.path.join(config_dir, f"{model}.yaml")):
            own = [os.path.join(config_dir, f"{model}.yaml")]
        files_of[model] = shared + [os.path.abspath(f) for f in (own or [])]
        for path in files_of[model]:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"config file {path} (for {model}) does not exist")

    cells, ran, reused = {}, [], []
    code = code_version()
    distributed = dict(distributed or {})
    ranks = distributed.get("world_size", -1) if distributed.get("world_size", -1) != -1 else distributed.get("nproc", 1)
    report = dict(output_dir=output_dir, models=list(models), seeds=list(seeds), dataset=dataset, files_of=files_of, overrides=overrides)
    try:
        for seed in seeds:  # seed-major: one full pass over the models comes first
            for model in models:
                name = cell_name(model, seed)
                json_path = os.path.join(cells_dir, name + ".json")
                settings = cell_settings(model, dataset, seed, files_of[model], overrides, ranks)
                done = read_json(json_path)
                if _reusable(done, settings, code, reuse_other_code or report_only):
                    cells[name] = done
                    reused.append(name)
                    continue
                if report_only:
                    continue
                if not _claim(cells_dir, name):
                    logger.info(f"[compare] {name}: another comparison is running it (its .lock): skipped here")
                    continue
                try:
                    done = read_json(json_path)  # it may have finished elsewhere since this run read it
                    if _reusable(done, settings, code, reuse_other_code):
                        cells[name] = done
                        reused.append(name)
                        continue
                    if _reusable(done, settings, code, True):  # finished, by another version of the code
                        logger.info(f"[compare] {name}: ran another version of the code ({(done.get('code') or {}).get('source')}, now {code['source']}): rerun")
                    cells[name] = _run_one(model, dataset, seed, settings, files_of[model], overrides, cells_dir, code, distributed,
                                           reuse_other_code)
                finally:
                    _release(cells_dir, name)
                ran.append(name)
                write_report(cells, **report)
    finally:
        paths = write_report(cells, **report)
    return dict(paths, ran=ran, reused=reused, cells=cells)


def _trained_seconds(checkpoint_dir):
    """Training and validation seconds of the cell's run so far, from its newest resume state (0 without one)."""

    last = newest_resume_file(checkpoint_dir)
    if last is None:
        return 0.0
    validations = load_checkpoint(last).get("run_validations") or []
    return float(validations[-1]["seconds"]) if validations else 0.0


def _run_one(model, dataset, seed, settings, config_files, overrides, cells_dir, code=None, distributed=None,
             reuse_other_code=False):
    name = cell_name(model, seed)
    code = code or code_version()
    json_path = os.path.join(cells_dir, name + ".json")
    partial_path = os.path.join(cells_dir, name + ".partial.json")
    child_json = os.path.join(cells_dir, name + ".child.json")
    user_values_json = os.path.join(cells_dir, name + ".users.json")
    log_path = os.path.join(cells_dir, name + ".log")
    partial = read_json(partial_path)
    if partial and partial.get("code") not in (None, code["source"]) and not reuse_other_code:
        logger.info(f"[compare] {name}: its resume state ran another version of the code ({partial['code']}, now "
                    f"{code['source']}): started afresh")
        partial = None
    if not partial or not same_settings(partial.get("settings"), settings):
        partial = {"settings": settings, "elapsed_s": 0.0, "peak_rss_mb": 0.0, "segments": 0}
    segment_codes = sorted(set(partial.get("segment_codes", [])) | {code["source"]})  # more than one: reuse_other_code
    partial.update(code=code["source"], segment_codes=segment_codes)
    checkpoint_dir = os.path.join(cells_dir, "checkpoints", name)
    trained = _trained_seconds(checkpoint_dir)  # what the newest resume state reached
    if partial.get("running") is not None:  # a segment killed without notice (kill -9, a session's end): it counts
        # the training seconds its last resume state reached (file times do not survive a checkout)
        partial.update(segments=partial["segments"] + 1, elapsed_s=partial["elapsed_s"] + max(0.0, trained - partial["running"]))
    partial.pop("running", None)
    if partial["segments"] == 0 and os.path.isdir(checkpoint_dir):
        for stale in glob.glob(os.path.join(checkpoint_dir, "*.pth")):
            os.remove(stale)
    spec = {
        "model": model_of(model),
        "dataset": dataset,
        "seed": seed,
        "config_files": config_files,
        "overrides": overrides,
        "checkpoint_dir": checkpoint_dir,
        "child_json": child_json,
        "user_values_json": user_values_json,
        "resume": partial["segments"] > 0,
        "distributed": distributed or {},
    }
    for stale in (child_json, user_values_json):  # an earlier run's; this run writes its own
        if os.path.exists(stale):
            os.remove(stale)
    # a segment is recorded as running (with the training seconds it starts from), so that a killed one is known
    write_json(partial_path, dict(partial, running=trained if spec["resume"] else 0.0))
    logger.info(f"[compare] {name}: running (log {shown_path(log_path)})")
    try:
        returncode, elapsed, peak = _run_cell_process(spec, log_path)
    except CellInterrupted as stop:
        # its checkpoints let the next run continue it; time and memory add up over the segments
        partial.update(
            segments=partial["segments"] + 1,
            elapsed_s=partial["elapsed_s"] + stop.elapsed,
            peak_rss_mb=max(partial["peak_rss_mb"], stop.peak_rss_mb),
        )
        write_json(partial_path, partial)
        logger.info(f"[compare] {name}: interrupted; run the same command again to continue it")
        raise
    result = read_json(child_json) or {
        "status": "failed",
        "error": f"cell process exited with code {returncode} before writing its result; log tail:\n{_tail(log_path)}",
    }
    if result["status"] == "ok" and returncode != 0:
        result.update(status="failed", error=f"cell process exited with code {returncode} after its result; see {log_path}")
    result.update(
        model=model,
        dataset=dataset,
        seed=seed,
        settings=settings,
        code=result.get("code") or code,  # what the cell's process ran (the tree may change meanwhile)
        returncode=returncode,
        wall_time_s=partial["elapsed_s"] + elapsed,
        peak_rss_mb=max(partial["peak_rss_mb"], peak),
        segments=partial["segments"] + 1,
        log=shown_path(log_path),
    )
    if len(segment_codes) > 1:  # resumed across versions of the code (reuse_other_code): every version is named
        result["segment_codes"] = segment_codes
    write_json(json_path, result)
    for path in (child_json, partial_path):
        if os.path.exists(path):
            os.remove(path)
    status = "ok" if result["status"] == "ok" else f"FAILED: {result['error'].splitlines()[0]}"
    logger.info(f"[compare] {name}: {status} ({result['wall_time_s']:.0f} s, {result['peak_rss_mb']:.0f} MB)")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description="run one comparison cell (used by run_compare.py)")
    parser.add_argument("--cell", required=True, help="the cell's spec, as JSON")
    args = parser.parse_args(argv)
    result = run_cell(json.loads(args.cell))
    sys.exit(0 if result["status"] == "ok" else 1)


if __name__ == "__main__":
    main()
