"""Benchmark: RecBole's SASRec (its defaults) against the plugin's FastSASRec, same machine, same run.

For each model and seed, one subprocess trains under the same wall-clock budget (``--budget-minutes``,
training plus validation, checked after every batch) with RecBole's early stopping, evaluates the test
split with the best-validation weights, and reports seconds per full epoch, peak resident memory of the
process (data loading included, from ``wait4``), best validation NDCG@10, test HR@10 / NDCG@10 and the
validation curve. The table gives each model's time to reach RecBole SASRec's best validation NDCG@10
(mean over seeds), and the ratio of the two.

    python bench/backbone.py                                   # 2 models x 3 seeds x 30 minutes
    python bench/backbone.py --budget-minutes 1 --seeds 1      # smoke run
    python bench/backbone.py --budget-minutes 0                # no budget: train to early stopping (GPU)
    python bench/backbone.py --budget-minutes 0 --seeds 1 --threads 1 --state_dir bench/results/backbone_state
                                                               # the same, resumable: rerun it to continue
    python bench/backbone.py --models SASRec,FastSASRec,FastSASRec:stride25 \
        --model_config 'FastSASRec:stride25={"window_stride": 25}'  # a variant row, with its own settings
    python bench/backbone.py --dataset amazon-beauty --from_cells results/amazon-beauty/cells --models SASRec,FastSASRec
                                                               # the table from a comparison's cells (run_compare.py:
                                                               # the models trained to early stopping, seed after seed)

Writes ``bench/results/backbone_<host>_<date>.md`` and the raw numbers beside it (``.json``).
"""
import argparse
import datetime
import glob
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from recbole_ur4rec.common.tables import (  # a missing or unreadable file reads as None; atomic writes
    read_json,
    write_json,
)
from recbole_ur4rec.experiments.paired_users import cell_file  # <cells>/<label, ':' as '_'>-seed<seed>.json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("SASRec", "FastSASRec")
REFERENCE = "SASRec"


class BudgetExhausted(Exception):
    """The wall-clock budget of a cell is spent."""


class BudgetedBatches:
    """Iterates a train dataloader until ``deadline`` (``time.monotonic()``); the rest of it is delegated."""

    def __init__(self, loader, deadline):
        self.loader, self.deadline = loader, deadline
        self.complete = True

    def __iter__(self):
        for batch in self.loader:
            if time.monotonic() > self.deadline:
                self.complete = False
                return
            yield batch

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def budgeted(trainer_class, deadline, epoch_seconds):
    """``trainer_class`` whose epochs stop at ``deadline``; full epochs' training times go to ``epoch_seconds``."""

    class BudgetTrainer(trainer_class):
        def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
            if time.monotonic() > deadline:
                raise BudgetExhausted
            batches = BudgetedBatches(train_data, deadline)
            start = time.monotonic()
            loss = super()._train_epoch(batches, epoch_idx, loss_func, show_progress)
            if batches.complete:
                epoch_seconds.append(time.monotonic() - start)
            return loss

    return BudgetTrainer


class Interrupted(Exception):
    """``stop_after`` validations of this segment are done (tests: an interruption at a known point)."""


def run_cell(model_name, dataset, seed, budget_minutes, threads, config_dict, state_dir=None, stop_after=None):
    """Train and test one (model, seed) in this process; returns a dict of plain numbers.

    With ``state_dir`` the cell is resumable: its checkpoints and its progress (validation curve, full epochs'
    seconds, seconds of training so far) are kept there after every validation, and a later call continues from
    them (the budget counts per call). ``stop_after`` (tests) ends this call after that many validations, as an
    interruption would, and returns None. Test metrics always use the best-validation weights.
    """
    import torch

    from recbole_ur4rec.build import build
    from recbole_ur4rec.common.checkpoint_io import newest_resume_file
    from recbole_ur4rec.registry import get_trainer

    data_start = time.monotonic()
    settings = {"seed": seed, "state": "WARNING", "show_progress": False, **config_dict}
    if threads:
        settings["threads"] = threads
    if state_dir:
        os.makedirs(state_dir, exist_ok=True)
        settings["checkpoint_dir"] = state_dir
    progress_file = os.path.join(state_dir, "progress.json") if state_dir else None
    progress = (progress_file and read_json(progress_file)) or {"train_seconds": 0.0, "curve": [], "epoch_seconds": [], "segments": 0}
    progress["segments"] += 1
    config, model, _, train_data, valid_data, test_data = build(model_name, dataset, config_dict=settings, log=False)
    data_seconds = time.monotonic() - data_start  # config, data and model (the model takes milliseconds)

    start, before = time.monotonic(), progress["train_seconds"]
    deadline = start + budget_minutes * 60 if budget_minutes > 0 else float("inf")
    epoch_seconds, curve = progress["epoch_seconds"], progress["curve"]
    trainer = budgeted(get_trainer(config["MODEL_TYPE"], config["model"]), deadline, epoch_seconds)(config, model)
    last = newest_resume_file(state_dir) if state_dir else None
    if last is not None:
        trainer.resume_checkpoint(last)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    validations = 0

    def after_validation(epoch_idx, valid_score):
        nonlocal validations
        progress["train_seconds"] = before + time.monotonic() - start
        curve.append([round(progress["train_seconds"], 2), epoch_idx, float(valid_score)])
        validations += 1
        if state_dir:  # after the trainer's own -last.pth: the progress never runs ahead of the checkpoint
            write_json(progress_file, progress)
        if stop_after is not None and validations >= stop_after:
            raise Interrupted

    stopped_by = "early stopping or epochs"
    try:
        trainer.fit(train_data, valid_data, saved=bool(state_dir), show_progress=False, callback_fn=after_validation)
    except BudgetExhausted:
        stopped_by = "budget"
    except Interrupted:
        return None
    train_seconds = before + time.monotonic() - start
    test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    return {
        "model": model_name,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "device": str(config["device"]),
        "train_rows": len(train_data._dataset),
        "train_batch_size": config["train_batch_size"],
        "max_item_list_length": config["MAX_ITEM_LIST_LENGTH"],
        "data_seconds": round(data_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "segments": progress["segments"],
        "stopped_by": stopped_by,
        "full_epochs": len(epoch_seconds),
        "seconds_per_epoch": statistics.median(epoch_seconds) if epoch_seconds else None,
        "best_valid_ndcg10": max((score for _, _, score in curve), default=-1.0),
        "test_hit10": float(test["hit@10"]),
        "test_ndcg10": float(test["ndcg@10"]),
        "curve": curve,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


def cell_config(label, args):
    """The settings of a row: ``--config``, then the row's ``--model_config`` (a label ``Model:variant`` names a
    variant of ``Model``)."""
    return {**args.config, **args.model_config.get(label, {})}


def run_cell_subprocess(label, args):
    """Run one cell in a fresh Python process; returns its result with the process's peak RSS. With
    ``--state_dir`` a finished cell is read back, and an unfinished one continues from its last validation."""
    results = []
    model_name, config = label.split(":")[0], cell_config(label, args)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        # absolute: the cell's process runs in the work folder, and a relative --state_dir means the caller's folder
        cell_dir = os.path.join(os.path.abspath(args.state_dir), f"{label.replace(':', '_')}-seed{seed}") if args.state_dir else None
        done = read_json(os.path.join(cell_dir, "result.json")) if cell_dir else None
        if done is not None:
            if done.get("config", config) != config:
                raise SystemExit(f"{cell_dir}/result.json was made with {done['config']}, not {config}: give another --state_dir")
            print(f"[bench] {label} seed {seed}: finished earlier ({cell_dir})", flush=True)
            results.append(done)
            continue
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            result_file = f.name
        command = [
            sys.executable, os.path.abspath(__file__), "--cell", model_name, "--seed", str(seed),
            "--dataset", args.dataset, "--budget-minutes", str(args.budget_minutes),
            "--threads", str(args.threads), "--config", json.dumps(config), "--result-file", result_file,
        ] + (["--state_dir", cell_dir] if cell_dir else [])  # fmt: skip
        print(f"[bench] {label} seed {seed}: budget {args.budget_minutes} min", flush=True)
        process = subprocess.Popen(command, cwd=args.workdir)
        _, status, usage = os.wait4(process.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{label} seed {seed} failed (exit {os.waitstatus_to_exitcode(status)})")
        with open(result_file) as f:
            result = json.load(f)
        os.unlink(result_file)
        result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux reports KiB; the last segment's process
        result["config"] = config
        if cell_dir:
            write_json(os.path.join(cell_dir, "result.json"), result)
            for checkpoint in glob.glob(os.path.join(cell_dir, "*.pth")):  # a finished cell is read back from its result
                os.remove(checkpoint)
        print(
            f"[bench] {label} seed {seed}: {result['seconds_per_epoch'] or float('nan'):.1f} s/epoch, "
            f"best valid NDCG@10 {result['best_valid_ndcg10']:.4f}, test NDCG@10 {result['test_ndcg10']:.4f}, "
            f"peak RSS {result['peak_rss_mb']:.0f} MB, stopped by {result['stopped_by']}",
            flush=True,
        )
        results.append(result)
    return results


def results_from_cells(cells, labels, first_seed, seeds):
    """The benchmark's results read from ``run_compare`` cells (``<cells>/<label>-seed<seed>.json``, written with
    their validation curve): the same fields as :func:`run_cell`'s, where seconds per epoch include validation (the
    cells record the seconds of training and validation at each validation) and train rows are not recorded."""
    results = {}
    for label in labels:
        rows = []
        for seed in range(first_seed, first_seed + seeds):
            path = cell_file(cells, label, seed)
            cell = read_json(path)
            if cell is None or cell.get("status") != "ok":
                raise SystemExit(f"{path}: no finished cell (status {cell and cell.get('status')!r}); run the comparison first")
            validations = cell.get("validations")
            if not validations:
                raise SystemExit(f"{path} records no validation curve (cells written before the curve was kept): rerun the cell")
            seconds = [v["seconds"] for v in validations]
            settings = cell.get("settings") or {}
            rows.append({
                "model": label, "seed": seed, "threads": settings.get("threads"), "device": "cpu", "train_rows": None,
                "train_batch_size": settings.get("train_batch_size"), "max_item_list_length": settings.get("MAX_ITEM_LIST_LENGTH"),
                "data_seconds": None, "train_seconds": seconds[-1], "segments": cell.get("segments"), "stopped_by": "early stopping",
                "full_epochs": cell.get("epochs_trained"),
                "seconds_per_epoch": statistics.median(b - a for a, b in zip([0.0] + seconds, seconds)),
                "best_valid_ndcg10": float(cell["valid_result"]["ndcg@10"]),
                "test_hit10": float(cell["test_result"]["hit@10"]), "test_ndcg10": float(cell["test_result"]["ndcg@10"]),
                "curve": [(v["seconds"], v["epoch"], v["score"]) for v in validations],
                "peak_rss_mb": cell.get("peak_rss_mb"), "cuda_peak_mb": None, "config": settings,
                "machine": cell.get("machine"),
            })  # fmt: skip
        results[label] = rows
    return results


def time_to_reach(curve, target):
    """Seconds of training (validation included) until the validation NDCG@10 first reaches ``target``."""
    return next((seconds for seconds, _, score in curve if score >= target), None)


def machine():
    import recbole
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "host": socket.gethostname(),
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "recbole": recbole.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def fmt(values, digits=4):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = statistics.mean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {spread:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def report(results, args, info):
    target = statistics.mean(r["best_valid_ndcg10"] for r in results[REFERENCE])
    reach = {}
    lines = [
        f"# Backbone benchmark: RecBole SASRec vs FastSASRec on {args.dataset}",
        "",
        f"Run {datetime.datetime.now():%Y-%m-%d %H:%M} on `{info['host']}`: {info['cpu']}, {info['logical_cores']} logical cores, "
        f"GPU {info['gpu']}, Python {info['python']}, torch {info['torch']}, RecBole {info['recbole']}, "
        f"torch threads {results[REFERENCE][0]['threads']}, device {results[REFERENCE][0]['device']}.",
        "",
        f"Protocol: RecBole's time-ordered leave-one-out, full ranking; {args.seeds} seed(s) from {args.first_seed}; "
        + (
            f"the cells of the comparison `{args.from_cells}` (each model trained to early stopping with its settings "
            f"there; s / epoch includes validation). "
            if args.from_cells
            else f"budget {args.budget_minutes or 'none'} min of training + validation per run "
            f"(RecBole's early stopping, stopping_step from the model's defaults, also applies); "
        )
        + "test metrics with the best-validation weights. Mean ± standard deviation over seeds.",
        f"Target = RecBole SASRec's best validation NDCG@10 (mean over seeds) = {target:.4f}.",
        *(
            [f"The cells ran on: {'; '.join(sorted({json.dumps(r.get('machine'), sort_keys=True) for rows in results.values() for r in rows}))}."]
            if args.from_cells
            else []
        ),
        "",
        "| model | train rows | batch | max len | s / epoch | full epochs | peak RSS (MB) | best valid NDCG@10 "
        "| test HR@10 | test NDCG@10 | time to target (s) | reached | stopped by |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model_name, rows in results.items():
        times = [time_to_reach(r["curve"], target) for r in rows]
        reached = [t for t in times if t is not None]
        reach[model_name] = statistics.mean(reached) if reached else None
        lines.append(
            f"| {model_name} | {rows[0]['train_rows'] or 'n/a'} | {rows[0]['train_batch_size']} | {rows[0]['max_item_list_length']} "
            f"| {fmt([r['seconds_per_epoch'] for r in rows], 1)} | {fmt([r['full_epochs'] for r in rows], 1)} "
            f"| {fmt([r['peak_rss_mb'] for r in rows], 0)} | {fmt([r['best_valid_ndcg10'] for r in rows])} "
            f"| {fmt([r['test_hit10'] for r in rows])} | {fmt([r['test_ndcg10'] for r in rows])} "
            f"| {fmt(reached, 0)} | {len(reached)}/{len(rows)} | {', '.join(sorted(set(r['stopped_by'] for r in rows)))} |"
        )
    lines.append("")
    ref = reach.get(REFERENCE)
    for label in results:
        if label.split(":")[0] == "FastSASRec":
            fast = reach.get(label)
            ratio = f"{fast / ref:.3f}" if fast is not None and ref is not None else "not reached"
            lines.append(f"Time to target, {label} / SASRec: {ratio} (target: at most 0.1).")
    for label in results:
        if not args.from_cells and cell_config(label, args) != args.config:
            lines.append(f"{label} settings: {json.dumps(cell_config(label, args))}.")
    spe = {m: [r["seconds_per_epoch"] for r in rows if r["seconds_per_epoch"]] for m, rows in results.items()}
    if spe.get("FastSASRec") and spe.get(REFERENCE):
        lines.append(f"Seconds per epoch, SASRec / FastSASRec: {statistics.mean(spe[REFERENCE]) / statistics.mean(spe['FastSASRec']):.1f}x.")
    if any(r["cuda_peak_mb"] for rows in results.values() for r in rows):
        lines.append("Peak CUDA memory (MB): " + ", ".join(f"{m} {fmt([r['cuda_peak_mb'] for r in rows], 0)}" for m, rows in results.items()))
    lines += [
        "",
        "Peak RSS is the maximum resident memory of the whole run's process (data loading and evaluation included).",
        f"Command: `python bench/backbone.py {' '.join(sys.argv[1:])}`",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated; must include SASRec (the target)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds per model")
    parser.add_argument("--first-seed", type=int, default=2020)
    parser.add_argument("--budget-minutes", type=float, default=30.0, help="wall-clock budget per run; 0 = none")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads per run; 0 = torch's default")
    parser.add_argument("--config", type=json.loads, default={}, help="JSON config_dict given to every run")
    parser.add_argument("--model_config", action="append", default=[], metavar="LABEL=JSON",
                        help="settings of one row over --config, e.g. FastSASRec:stride25='{\"window_stride\": 25}' "
                        "with FastSASRec:stride25 in --models (repeatable)")
    parser.add_argument("--output", default=None, help="markdown file (default bench/results/backbone_<host>_<date>.md)")
    parser.add_argument("--workdir", default=None, help="where runs write RecBole's log/ (default: a temporary folder)")
    parser.add_argument("--state_dir", default=None, help="resumable cells: each cell's checkpoints and progress in "
                        "<state_dir>/<model>-seed<seed>/; a rerun reads finished cells back and continues the others")
    parser.add_argument("--from_cells", default=None, help="build the table from this run_compare cells folder instead "
                        "of training (--models are its labels; --seeds and --first-seed pick its cells)")
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.cell:
        result = run_cell(args.cell, args.dataset, args.seed, args.budget_minutes, args.threads, args.config, args.state_dir)
        with open(args.result_file, "w") as f:
            json.dump(result, f)
        return
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    model_config = {}
    for item in args.model_config:
        label, _, text = item.partition("=")
        if label not in models:
            raise SystemExit(f"--model_config {item!r}: {label!r} is not in --models {models}")
        try:
            model_config[label] = json.loads(text)
        except json.JSONDecodeError as err:
            raise SystemExit(f"--model_config {item!r}: expected LABEL=<JSON object>: {err}") from None
    args.model_config = model_config
    if REFERENCE not in models:
        raise SystemExit(f"--models must include {REFERENCE}: its best validation NDCG@10 is the target")
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be at least 1, got {args.seeds}")
    if args.from_cells:
        results = results_from_cells(args.from_cells, models, args.first_seed, args.seeds)
    else:
        workdir = tempfile.TemporaryDirectory(prefix="bench_backbone_")
        args.workdir = args.workdir or workdir.name
        print(
            f"[bench] {len(models)} models x {args.seeds} seeds, at most {args.budget_minutes} min each "
            f"(+ data loading and test): up to about {len(models) * args.seeds * args.budget_minutes:.0f} min",
            flush=True,
        )
        results = {model_name: run_cell_subprocess(model_name, args) for model_name in models}
    info = machine()
    stem = args.output or os.path.join(ROOT, "bench", "results", f"backbone_{info['host']}_{datetime.date.today():%Y%m%d}.md")
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    text = report(results, args, info)
    with open(stem, "w") as f:
        f.write(text)
    with open(os.path.splitext(stem)[0] + ".json", "w") as f:
        # the arguments without the run folder (a temporary folder by default: a machine path, not a setting)
        args_kept = {key: value for key, value in vars(args).items() if key != "workdir"}
        json.dump({"machine": info, "args": args_kept, "results": results}, f, indent=1)
    print(text)
    print(f"[bench] wrote {stem}")


if __name__ == "__main__":
    main()
