"""Benchmark: one process against ``--nproc`` gloo ranks (``--threads`` each) on generated data (bench/scale.py's
sizes), FastSASRec with SSM: one training epoch's seconds, one full-ranking validation's seconds, peak RSS per rank,
and whether the ranks' validation of the weights they reached equals one process's validation of the same weights.

Each configuration runs in its own process (peak RSS is its own). The result goes to
``<out>/distributed_<size>_<date>.json`` and ``.md`` with the machine and the load average before and after
(``os.getloadavg``): timings taken while other jobs run are not the machine's.

    python bench/distributed.py --size 1m --nproc 2 --threads 1        # the issue's target: 2 x 1 thread <= 0.6 x 1 x 1
    python bench/distributed.py --size 5m --nproc 2 --threads 1        # memory per rank at 5M
    python bench/distributed.py --size 5m --nproc 2 --gpu              # on a GPU machine: 1 GPU against 2 (NCCL)
"""
import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from scale import SIZES, ensure_dataset, machine  # noqa: E402

CONFIG = {"loss_type": "SSM", "show_progress": False, "epochs": 1, "eval_batch_size": 4096, "state": "WARNING", "seed": 2020}


def _measure(settings, size, data_root, threads, gpu, batch_size, weights_file):
    """One epoch and one validation on this rank (or process); every rank's numbers, gathered, from rank 0."""
    import torch

    from recbole_ur4rec.build import build
    from recbole_ur4rec.common import distributed
    from recbole_ur4rec.registry import get_trainer

    config_dict = {**CONFIG, "data_path": data_root, "threads": threads, "use_gpu": gpu, "train_batch_size": batch_size,
                   **(settings or {})}
    run = build("FastSASRec", f"synth-{size}", config_dict=config_dict, log=False)
    trainer = get_trainer(run.config["MODEL_TYPE"], "FastSASRec")(run.config, run.model)
    if weights_file and not os.path.exists(weights_file):  # the 2-rank cell: train one epoch, then keep the weights
        start = time.monotonic()
        trainer._train_epoch(run.train_data, 0)
        epoch_s = time.monotonic() - start
        if distributed.rank() == 0:
            torch.save(run.model.state_dict(), weights_file)
    elif weights_file:  # one process evaluating the ranks' weights
        run.model.load_state_dict(torch.load(weights_file, weights_only=True))
        epoch_s = None
    else:
        start = time.monotonic()
        trainer._train_epoch(run.train_data, 0)
        epoch_s = time.monotonic() - start
    start = time.monotonic()
    valid = trainer.evaluate(run.valid_data, load_best_model=False)
    eval_s = time.monotonic() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ranks = distributed.all_gather_plain({"epoch_s": epoch_s, "eval_s": eval_s, "peak_rss_gb": rss})
    return {"valid": {k: float(v) for k, v in valid.items()}, "ranks": ranks, "train_batches": len(run.train_data)}


def cell(args):
    """One configuration in this process: ``--cell_nproc`` ranks (1: one plain process)."""
    from recbole_ur4rec.common import distributed

    data_root = os.path.abspath(args.data_root)
    job = (args.size, data_root, args.threads, args.gpu, args.train_batch_size, args.weights)
    if args.cell_nproc == 1:
        return _measure(None, *job)
    settings = distributed.launch_settings(nproc=args.cell_nproc, ip="127.0.0.1", port=str(args.port))
    return distributed.spawn(_measure, settings, *job)


def run(args, nproc, weights=None):
    command = [sys.executable, os.path.abspath(__file__), "--cell_nproc", str(nproc), "--size", args.size,
               "--threads", str(args.threads), "--data_root", args.data_root, "--port", str(args.port),
               "--train_batch_size", str(args.train_batch_size)]
    command += ["--weights", weights] if weights else []
    command += ["--gpu"] if args.gpu else []
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1m", choices=sorted(SIZES))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--gpu", action="store_true", help="one GPU per process (NCCL); default CPU (gloo)")
    parser.add_argument("--train_batch_size", type=int, default=32, help="rows per step over all ranks (FastSASRec's default)")
    parser.add_argument("--data_root", default=os.path.join(ROOT, "dataset"))
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "distributed"))
    parser.add_argument("--port", type=int, default=29517)
    parser.add_argument("--cell_nproc", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell_nproc is not None:
        print(json.dumps(cell(args)))
        return None
    ensure_dataset(args.data_root, args.size)
    os.makedirs(args.out, exist_ok=True)
    weights = os.path.join(args.out, f".weights-{args.size}-{os.getpid()}.pth")
    load_before = os.getloadavg()
    one = run(args, 1)
    ranks = run(args, args.nproc, weights)
    same_weights = run(args, 1, weights)  # one process validating the ranks' weights
    os.remove(weights)
    result = {
        "command": " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "environment": {key: os.environ.get(key) for key in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")},
        "one_process": one,
        "ranks": ranks,
        "epoch_ratio": ranks["ranks"][0]["epoch_s"] / one["ranks"][0]["epoch_s"],
        "peak_rss_ratio": max(r["peak_rss_gb"] for r in ranks["ranks"]) / one["ranks"][0]["peak_rss_gb"],
        "validation_equal": ranks["valid"] == same_weights["valid"],
    }
    stem = os.path.join(args.out, f"distributed_{args.size}_{args.nproc}x{args.threads}_b{args.train_batch_size}_{result['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(
            f"# {args.nproc} ranks against one process: FastSASRec (SSM), {args.size} generated interactions\n\n"
            f"`{result['command']}` on {result['machine']['cpus']} CPUs ({result['machine']['platform']}), "
            f"{'GPU' if args.gpu else 'CPU'}, {args.threads} thread(s) per process, train_batch_size {args.train_batch_size}; "
            f"load average before "
            f"{load_before[0]:.2f}, after {result['load_after'][0]:.2f} (timings taken while other jobs run are not the machine's); "
            f"OMP_WAIT_POLICY {result['environment']['OMP_WAIT_POLICY']}.\n\n"
            "| | epoch s | validation s | peak RSS GB (max over ranks) |\n|---|---|---|---|\n"
            f"| 1 process | {one['ranks'][0]['epoch_s']:.1f} | {one['ranks'][0]['eval_s']:.1f} | {one['ranks'][0]['peak_rss_gb']:.2f} |\n"
            f"| {args.nproc} ranks | {ranks['ranks'][0]['epoch_s']:.1f} | {ranks['ranks'][0]['eval_s']:.1f} | "
            f"{max(r['peak_rss_gb'] for r in ranks['ranks']):.2f} |\n\n"
            f"Epoch ratio {result['epoch_ratio']:.2f} (target <= 0.6), peak RSS ratio {result['peak_rss_ratio']:.2f} "
            f"(target <= 1.2); validation of the ranks' weights equal to one process's: {result['validation_equal']}.\n"
        )
    print(open(stem + ".md").read())
    return result


if __name__ == "__main__":
    main()
