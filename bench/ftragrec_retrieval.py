"""What FTRagRec's retrieval adds and what it costs, for trained FTRagRec checkpoints (one per seed).

    python bench/ftragrec_retrieval.py --checkpoints results/ml-100k/cells/checkpoints/FTRagRec-seed{seed} \
        --seeds 2020,2021,2022 --threads 1

Accuracy (dual evaluation): RecBole's full-sort validation and test with and without retrieval (the same weights;
without = the model's own backbone alone). Cost, on CPU: ``--epochs`` epochs of the finetune objective (every
parameter trained, Adam, the checkpoint's batch size) with the time inside ``RetrievalMemory.search`` kept apart from
the rest (forward, backward, optimiser step); the memory refresh (re-encoding every training prefix and rebuilding the
index), timed on its own and spread over ``refresh_every`` epochs; and the full-sort evaluation per user with and
without retrieval. Prints markdown tables; ``--output`` also writes the numbers as JSON.
"""
import argparse
import json
import statistics
import time

import torch

from recbole_ur4rec.common.argv import isolated_argv
from recbole_ur4rec.common.checkpoint_io import resolve_checkpoint_path
from recbole_ur4rec.quick_start import load_data_and_model
from recbole_ur4rec.trainer import FTRagRecTrainer


class Clock:
    """Adds up the wall time of every call of ``owner.<name>`` (an instance attribute wraps the bound method)."""

    def __init__(self, owner, name):
        self.seconds, self.calls = 0.0, 0
        method = getattr(owner, name)

        def timed(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - begin
                self.calls += 1

        setattr(owner, name, timed)

    def reset(self):
        self.seconds, self.calls = 0.0, 0


def evaluate(trainer, model, data, use_retrieval, search):
    model.use_retrieval = use_retrieval
    search.reset()
    begin = time.perf_counter()
    result = trainer.evaluate(data, load_best_model=False)
    return dict(result), time.perf_counter() - begin, search.seconds


def measure(path, epochs):
    with isolated_argv():  # RecBole's Config reads --key=value from sys.argv
        config, model, _, train_data, valid_data, test_data = load_data_and_model(path)
    if config["model"] != "FTRagRec":
        raise SystemExit(f"{path} holds a {config['model']} model, not FTRagRec")
    model.set_objective("retrieval")
    trainer = FTRagRecTrainer(config, model)
    trainer.dual_evaluation = False  # each evaluation below is one pass, with or without retrieval
    search, build = Clock(model.memory, "search"), Clock(model.memory, "build")
    out = {"checkpoint": path, "seed": config["seed"]}

    # accuracy first, on the checkpoint's own weights
    for split, data in (("valid", valid_data), ("test", test_data)):
        for use in (True, False):
            result, seconds, search_s = evaluate(trainer, model, data, use, search)
            key = f"{split}_{'with' if use else 'without'}"
            out[key] = result
            if split == "valid":
                out[f"eval_{'with' if use else 'without'}_s"], out[f"eval_{'with' if use else 'without'}_search_s"] = seconds, search_s
    out["eval_users"] = len(valid_data.dataset.inter_feat)  # one validation row per user
    out["memory_entries"], out["index"] = len(model.memory), model.memory.built_type

    # refresh: re-encode and rebuild
    build.reset()
    begin = time.perf_counter()
    model.refresh_memory(force=True)
    out["refresh_s"], out["index_build_s"] = time.perf_counter() - begin, build.seconds
    schedule = config["refresh_every"]
    out["refresh_every"] = schedule if isinstance(schedule, int) else min(schedule.values())

    # training epochs
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    epoch_s, search_s = [], []
    for _ in range(epochs):
        search.reset()
        model.train()
        begin = time.perf_counter()
        for interaction in train_data:
            optimizer.zero_grad()
            loss = model.calculate_loss(interaction)
            loss.backward()
            optimizer.step()
        epoch_s.append(time.perf_counter() - begin)
        search_s.append(search.seconds)
        model.refresh_memory()  # keep the memory in step with the weights, as the trainer does
    out["train_epoch_s"], out["train_search_s"] = statistics.mean(epoch_s), statistics.mean(search_s)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", required=True, help="FTRagRec checkpoint file or folder; {seed} is replaced by each of --seeds")
    parser.add_argument("--seeds", default="", help="comma-separated seeds for {seed} in --checkpoints")
    parser.add_argument("--threads", type=int, default=1, help="torch and FAISS threads (default 1)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs timed per checkpoint (default 2)")
    parser.add_argument("--output", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    seeds = [s for s in args.seeds.split(",") if s] or [""]
    runs = [measure(resolve_checkpoint_path(args.checkpoints, seed), args.epochs) for seed in seeds]

    metrics = ("ndcg@10", "hit@10", "mrr@10")
    print("\nDual evaluation (same weights, with and without retrieval):\n")
    print("| seed | " + " | ".join(f"{split} {m} with / without" for split in ("valid", "test") for m in metrics) + " |")
    print("|---" * (1 + 2 * len(metrics)) + "|")
    for r in runs:
        cells = [f"{r[f'{split}_with'][m]:.4f} / {r[f'{split}_without'][m]:.4f}" for split in ("valid", "test") for m in metrics]
        print(f"| {r['seed']} | " + " | ".join(cells) + " |")

    def mean(key):
        return statistics.mean(r[key] for r in runs)

    rest = mean("train_epoch_s") - mean("train_search_s")
    refresh_every = runs[0]["refresh_every"]
    eval_rest = mean("eval_with_s") - mean("eval_with_search_s")
    users = runs[0]["eval_users"]
    ms = lambda s: f"{1000 * s / users:.3f} ms"  # noqa: E731
    print(
        f"\nCost (mean over {len(runs)} checkpoint(s); {runs[0]['memory_entries']} entries, {runs[0]['index']} index, "
        f"threads {args.threads}):\n"
    )
    print("| phase | total | FAISS | rest | FAISS / rest |")
    print("|---|---|---|---|---|")
    print(
        f"| training epoch (finetune objective) | {mean('train_epoch_s'):.2f} s | {mean('train_search_s'):.2f} s search | "
        f"{rest:.2f} s forward, backward, step | {mean('train_search_s') / rest:.1%} |"
    )
    print(
        f"| memory refresh (every {refresh_every} epochs, only when the backbone changed) | {mean('refresh_s'):.2f} s | "
        f"{mean('index_build_s'):.2f} s index build | {mean('refresh_s') - mean('index_build_s'):.2f} s encoding | "
        f"epoch with refresh / {refresh_every}: {(mean('train_search_s') + mean('refresh_s') / refresh_every) / rest:.1%} |"
    )
    print(
        f"| validation, per user ({users} users) | {ms(mean('eval_with_s'))} | {ms(mean('eval_with_search_s'))} search | "
        f"{ms(eval_rest)} | {mean('eval_with_search_s') / eval_rest:.1%} |"
    )
    print(
        f"| validation without retrieval, per user | {ms(mean('eval_without_s'))} | | | with / without: "
        f"{mean('eval_with_s') / mean('eval_without_s') - 1:+.1%} |"
    )
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"threads": args.threads, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
