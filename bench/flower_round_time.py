"""Benchmark: seconds per federated round of FedDMMR on ml-100k: in-process nodes against Flower SuperNodes.

The dataset is partitioned (``python -m recbole_ur4rec.apps.partition_dataset``: node ``k`` holds the users ``u % nodes
== k``); the server reads no interaction. FedDMMR's defaults (item-text expert, dropout), ``client_fraction: 0.2``,
``threads: 1``, no validation, ``--rounds`` rounds per engine, on this machine:

- ``loop``: the server and every node in this process (:class:`~recbole_ur4rec.federated.node.LocalNodes`, each node
  reading only its partition): the in-process engine's cost with node-side state;
- ``flower``: the Flower ServerApp on a :class:`~recbole_ur4rec.apps.flower.loopback.LocalFederation` (a SuperLink
  and ``--nodes`` SuperNodes on 127.0.0.1, each its own process, TLS and SuperNode authentication, each with its node
  worker holding the node across rounds, built when the server asks which partition it holds, before round 1); a
  round sends each node one message (global parameters, its users' ids and row orders) and gets one partial
  aggregate back; ``--without_workers`` adds the same without node workers (every
  ClientApp process builds its node);
- ``flower + SecAgg+`` (``--secagg``, needs 3 nodes or more): the same round through SecAgg+'s four stages.

    python bench/flower_round_time.py                          # 3 rounds each, 2 SuperNodes
    python bench/flower_round_time.py --nodes 3 --secagg
    python bench/flower_round_time.py --nodes 3 --secagg --dp 1.0     # with user-level DP (node-side noise)

Prints a markdown table: seconds per round (mean, per round) and bytes per sampled client per round (the message
payloads, arrays and settings, both ways; Flower's framing not counted).
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CLIENT_FRACTION = 0.2  # --client_fraction
DP = {}  # --dp: dp_clip_norm and dp_noise_multiplier of every engine


def settings(work, rounds):
    return {
        "threads": 1, "client_fraction": CLIENT_FRACTION, "epochs": rounds, "eval_step": 0, "state": "WARNING", "show_progress": False,
        "checkpoint_dir": os.path.join(work, "saved"), "feature_cache_dir": os.path.join(ROOT, "dataset", "ml-100k"), **DP,
    }


def partition(work, rounds, nodes):
    from recbole_ur4rec.apps.partition_dataset import write_partitions
    from recbole_ur4rec.build import build

    root = os.path.join(work, "fed")
    write_partitions(build("FedDMMR", "ml-100k", config_dict=settings(work, rounds), log=False), root, nodes)
    return root


def server_settings(work, rounds, root):
    return {**settings(work, rounds), "federation_dir": root, "feature_cache_dir": None, "node_state_dir": os.path.join(work, "node-state")}


def loop_rounds(work, rounds, root):
    """Seconds of each in-process round (the trainer's own timing)."""
    from recbole_ur4rec.build import build
    from recbole_ur4rec.trainer import FedDMMRTrainer

    run = build("FedDMMR", "ml-100k", config_dict={**server_settings(work, rounds, root), "federated_engine": "loop"}, log=False)
    trainer = FedDMMRTrainer(run.config, run.model)
    seconds = []
    for round_idx in range(rounds):
        trainer.model.train()
        trainer.run_round(run.train_data, round_idx)
        seconds.append(trainer.last_round["seconds"])
    return seconds


def flower_rounds(work, rounds, nodes, root, secagg, workers=True):
    """Per round: seconds of the Flower ServerApp's round and payload bytes; and the whole ``flwr run``'s seconds."""
    from recbole_ur4rec.apps.flower.loopback import LocalFederation

    with LocalFederation(num_nodes=nodes, cwd=work, partition_root=root, workers=workers) as federation:
        begin = time.time()
        run_config = {"model": "FedDMMR", "dataset": "ml-100k", "config-json": json.dumps(server_settings(work, rounds, root)), "secagg": secagg}
        out = federation.run(run_config, timeout=3600)
        total = time.time() - begin
        if workers:  # the seconds each node worker spent on its training requests (its log: "train: <s> s")
            import re

            busy = [[float(x) for x in re.findall(r"^train\S*: ([0-9.]+) s$", federation.log_tail(f"worker{i}", chars=10**6), re.M)] for i in range(nodes)]
            for r, seconds in zip(out["rounds"], zip(*busy)):  # the round's slowest node worker
                r["slowest_node_s"] = max(seconds)
    for r in out["rounds"]:
        if r["excluded"]:
            print(f"warning: round {r['call']}: {r['excluded']} clients left out", file=sys.stderr)
    return out["rounds"], total


def main():
    global CLIENT_FRACTION
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=2, help="SuperNodes of the Flower engine")
    parser.add_argument("--secagg", action="store_true", help="also run the Flower rounds with SecAgg+ (3 nodes or more)")
    parser.add_argument("--without_workers", action="store_true", help="also run the Flower rounds without node workers (a node built per message)")
    parser.add_argument("--client_fraction", type=float, default=CLIENT_FRACTION, help="clients sampled per round")
    parser.add_argument("--dp", type=float, metavar="Z", help="user-level DP on every engine: dp_noise_multiplier Z, dp_clip_norm 0.1")
    args = parser.parse_args()
    CLIENT_FRACTION = args.client_fraction
    if args.dp:
        DP.update(dp_clip_norm=0.1, dp_noise_multiplier=args.dp)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="flower-bench-") as work:
        os.chdir(work)  # RecBole's log/ goes there
        root = partition(work, args.rounds, args.nodes)
        loop = loop_rounds(work, args.rounds, root)
        runs = [("flower", *flower_rounds(work, args.rounds, args.nodes, root, False))]
        if args.without_workers:
            runs.append(("flower, no node worker", *flower_rounds(work, args.rounds, args.nodes, root, False, workers=False)))
        if args.secagg:
            runs.append(("flower + SecAgg+", *flower_rounds(work, args.rounds, args.nodes, root, True)))
    dp = f", DP z {args.dp} C 0.1" if args.dp else ""
    print(f"\nFedDMMR on ml-100k, client_fraction {CLIENT_FRACTION}{dp}, threads 1, {args.nodes} nodes, {platform.node()} ({os.cpu_count()} CPUs)\n")
    print("| engine | s / round (mean) | rounds (s) | bytes per sampled client per round |")
    print("|---|---:|---|---:|")
    print(f"| in-process nodes | {sum(loop) / len(loop):.1f} | {', '.join(f'{s:.1f}' for s in loop)} | 0 |")
    for name, rounds, total in runs:
        seconds = [r["seconds"] for r in rounds]
        per_client = [((r["bytes_sent"] or 0) + (r["bytes_received"] or 0)) / len(r["sampled"]) for r in rounds]
        size = f"{sum(per_client) / len(per_client) / 1024:.1f} KiB" if rounds[0]["bytes_sent"] is not None else "(masked: not counted)"
        print(f"| {name} ({args.nodes} SuperNodes, loopback, TLS) | {sum(seconds) / len(seconds):.1f} | {', '.join(f'{s:.1f}' for s in seconds)} | {size} |")
    print()
    for name, rounds, total in runs:
        print(f"`flwr run` wall time of {name} (ServerApp start, {args.rounds} rounds, checkpoints, test evaluation): {total:.0f} s")
        if all("slowest_node_s" in r for r in rounds):  # the rest of a round: Flower's messages and processes
            slowest = ", ".join(f"{r['slowest_node_s']:.1f}" for r in rounds)
            rest = ", ".join(f"{r['seconds'] - r['slowest_node_s']:.1f}" for r in rounds)
            print(f"{name}: the slowest node worker's training per round (s): {slowest}; the rest of each round "
                  f"(Flower's messaging, a ClientApp process per message): {rest}")

if __name__ == "__main__":
    main()
