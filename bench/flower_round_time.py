"""Benchmark: seconds per federated round of FedDMMR on ml-100k, in-process loop engine against the Flower engine.

FedDMMR's defaults (item-text expert, dropout), ``client_fraction: 0.2``, ``threads: 1``, no validation, ``--rounds``
rounds per engine, on this machine:

- ``loop``: :meth:`FedDMMRTrainer.run_round` in this process (one model copy trained client after client);
- ``flower``: the Flower ServerApp on a :class:`~recbole_ur4rec.federated.flower.local.LocalFederation` (a SuperLink and
  ``--nodes`` SuperNodes on 127.0.0.1, each its own process); a round is :meth:`FlowerEngine.run`: messages pushed,
  one ClientApp process started per node (import, dataset and model rebuilt), its users trained, the per-client
  updates pulled and aggregated.

    python bench/flower_round_time.py                  # 3 rounds each, 2 SuperNodes
    python bench/flower_round_time.py --rounds 2 --nodes 3

Prints a markdown table (mean and per-round seconds). Where a Flower round's time goes (measured once on a shared
2-core machine, 2 SuperNodes, about 28 s a round): about 7 s until a node's ClientApp process has started, imported
recbole-ur4rec and pulled its message; about 5 s rebuilding the dataset and model; about 8 s training its ~95 clients
(both nodes and the other jobs share the 2 cores); about 7 s moving the per-client updates (about 1 MB a client,
float32) through SuperNode, SuperLink and ServerApp.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def settings(work, rounds):
    return {
        "threads": 1, "client_fraction": 0.2, "epochs": rounds, "eval_step": 0, "state": "WARNING", "show_progress": False,
        "checkpoint_dir": os.path.join(work, "saved"), "feature_cache_dir": os.path.join(ROOT, "dataset", "ml-100k"),
    }


def loop_rounds(work, rounds):
    """Seconds of each in-process round (the trainer's own timing)."""
    from recbole_ur4rec.build import build
    from recbole_ur4rec.trainer import FedDMMRTrainer

    run = build("FedDMMR", "ml-100k", config_dict={**settings(work, rounds), "federated_engine": "loop"}, log=False)
    train_data = run.train_data
    trainer = FedDMMRTrainer(run.config, run.model)
    seconds = []
    for round_idx in range(rounds):
        trainer.model.train()
        trainer.run_round(train_data, round_idx)
        seconds.append(trainer.last_round["seconds"])
    return seconds


def flower_rounds(work, rounds, nodes):
    """Seconds of each round of the Flower ServerApp (FlowerEngine.run) and of the whole ``flwr run``."""
    from recbole_ur4rec.federated.flower.local import LocalFederation

    with LocalFederation(num_nodes=nodes, cwd=work) as federation:
        begin = time.time()
        out = federation.run({"model": "FedDMMR", "dataset": "ml-100k", "config-json": json.dumps(settings(work, rounds))}, timeout=3600)
        total = time.time() - begin
    for r in out["rounds"]:
        if r["excluded"]:
            print(f"warning: round {r['call']}: {len(r['excluded'])} clients left out", file=sys.stderr)
    return [r["seconds"] for r in out["rounds"]], total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=2, help="SuperNodes of the Flower engine")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="flower-bench-") as work:
        os.chdir(work)  # RecBole's log/ goes there
        loop = loop_rounds(work, args.rounds)
        flower, total = flower_rounds(work, args.rounds, args.nodes)
    rows = [("loop (in-process)", loop), (f"flower ({args.nodes} SuperNodes, loopback)", flower)]
    print(f"\nFedDMMR on ml-100k, client_fraction 0.2, threads 1, {platform.node()} ({os.cpu_count()} CPUs)\n")
    print("| engine | s / round (mean) | rounds (s) |")
    print("|---|---:|---|")
    for name, seconds in rows:
        print(f"| {name} | {sum(seconds) / len(seconds):.1f} | {', '.join(f'{s:.1f}' for s in seconds)} |")
    print(f"\n`flwr run` wall time (ServerApp start, {args.rounds} rounds, checkpoints, test evaluation): {total:.0f} s")


if __name__ == "__main__":
    main()
