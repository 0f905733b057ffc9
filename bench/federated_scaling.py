"""Seconds per federated round of FedDMMR as the number of clients grows (in-process engines, same machine, one run).

More clients are simulated by repeating every user's training history: with ``--copies 10`` each of ml-100k's 943
users becomes 10 clients holding the same rows (9,430 clients), and every round samples ``client_fraction`` of them,
so the work per round grows with the number of clients. Each point is the mean over ``--rounds`` rounds (after one
untimed warm-up round) of one engine call plus the aggregation, from the model's initial weights.

    python bench/federated_scaling.py --copies 1,2,5,10 --engines loop,batched --rounds 2 --threads 1
    python bench/federated_scaling.py --dataset amazon-beauty --copies 1 --engines loop --loss_type SSM --client_fraction 0.02

Prints a markdown table; ``--output`` also writes the numbers as JSON.
"""
import argparse
import copy
import json
import time

import torch

from recbole_ur4rec.build import build
from recbole_ur4rec.common.argv import isolated_argv
from recbole_ur4rec.data.sequence_dataset import target_list_field
from recbole_ur4rec.federated import ENGINES, BatchedEngine, ClientData, FedAvg, round_plan


def repeated_clients(data, copies):
    """``data`` with every client repeated ``copies`` times (copy k of client c is client c + k * offset)."""
    if copies == 1:
        return data
    offset = int(data.clients.max()) + 1
    more = copy.copy(data)
    more.clients = torch.cat([torch.as_tensor(data.clients) + k * offset for k in range(copies)]).numpy()
    more.rows = {c + k * offset: rows for k in range(copies) for c, rows in data.rows.items()}
    more.counts = {c + k * offset: n for k in range(copies) for c, n in data.counts.items()}
    return more


def seconds_per_round(engine, data, config, rounds):
    n_rows = {c: len(r) for c, r in data.rows.items()}
    global_params = {n: p.detach().clone() for n, p in engine.model.named_parameters() if p.requires_grad}
    times, sampled_counts = [], []
    for round_idx in range(rounds + 1):  # round 0 warms up
        sampled, orders = round_plan(config["seed"], round_idx, data.clients, config["client_fraction"], config["local_epochs"], n_rows)
        begin = time.perf_counter()
        aggregator = FedAvg(global_params)
        engine.run(sampled, orders, global_params, {}, aggregator)
        aggregator.result()
        if round_idx:
            times.append(time.perf_counter() - begin)
            sampled_counts.append(len(sampled))
    return sum(times) / len(times), sum(sampled_counts) / len(sampled_counts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--copies", default="1,2,5,10", help="comma-separated client multipliers (default 1,2,5,10)")
    parser.add_argument("--engines", default="loop,batched", help=f"comma-separated, among {', '.join(ENGINES)}")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per point (default 2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--loss_type", choices=("CE", "SSM"), help="FedDMMR's loss_type (default: the model's, CE); the batched engine needs CE")
    parser.add_argument("--client_fraction", type=float, help="clients sampled per round (default: the model's, 0.2)")
    parser.add_argument("--neg_sample_num", type=int, help="SSM's uniform negatives (default: the model's, 100)")
    parser.add_argument("--output", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    copies = [int(c) for c in args.copies.split(",")]
    engines = args.engines.split(",")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or any(c < 1 for c in copies):
        parser.error(f"--engines must be among {', '.join(ENGINES)} and --copies >= 1 (got {args.engines}, {args.copies})")

    with isolated_argv():  # RecBole's Config reads --key=value from sys.argv
        overrides = {"threads": args.threads, "show_progress": False}
        overrides.update({k: v for k, v in vars(args).items() if k in ("loss_type", "client_fraction", "neg_sample_num") and v is not None})
        config, model, _, train_data, _, _ = build("FedDMMR", args.dataset, config_dict=overrides, log=False)
    base = ClientData(train_data._dataset, target_list_field(config))
    # the clients' optimizer and step as the trainer sets them (local_learning_rate, else learning_rate)
    lr, batch, optimizer = config["local_learning_rate"] or config["learning_rate"], config["train_batch_size"], config["local_optimizer"]

    points = []
    for c in copies:
        data = repeated_clients(base, c)
        point = {"copies": c, "clients": len(data.clients)}
        for name in engines:
            if name == "batched":
                engine = BatchedEngine(model, data, lr, batch, config["client_batch_size"], optimizer)
            else:
                engine = ENGINES[name](model, data, lr, batch, optimizer)
            point[f"{name}_s"], point["sampled"] = seconds_per_round(engine, data, config, args.rounds)
        points.append(point)
        print(json.dumps(point), flush=True)

    print(
        f"\nFedDMMR on {args.dataset}, loss_type {config['loss_type']} (neg_sample_num {config['neg_sample_num']}), client_fraction {config['client_fraction']}, "
        f"local_epochs {config['local_epochs']}, "
        f"threads {args.threads}; seconds per round (mean of {args.rounds}):\n"
    )
    print("| clients | sampled per round | " + " | ".join(f"{e} (s/round)" for e in engines) + " | " + " | ".join(f"{e} (ms/client)" for e in engines) + " |")
    print("|---" * (2 + 2 * len(engines)) + "|")
    for p in points:
        per_round = " | ".join(f"{p[f'{e}_s']:.1f}" for e in engines)
        per_client = " | ".join(f"{1000 * p[f'{e}_s'] / p['sampled']:.1f}" for e in engines)
        print(f"| {p['clients']:,} | {p['sampled']:.0f} | {per_round} | {per_client} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"dataset": args.dataset, "loss_type": config["loss_type"], "neg_sample_num": config["neg_sample_num"], "client_fraction": config["client_fraction"], "threads": args.threads, "points": points}, f, indent=1)


if __name__ == "__main__":
    main()
