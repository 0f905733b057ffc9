"""Benchmark: cost against dataset size (1M, 5M, 20M interactions) on generated data, per model.

For every (size, model) cell, one subprocess (so peak RSS is the cell's own, from ``getrusage``) measures:

- ``first_batch_s``: from the start of the process to the first training batch in hand: atomic-file check,
  RecBole's loading, filtering and remapping, the splits, the training rows and the model;
- ``peak_rss_gb`` after loading (``load_rss_gb``) and at the end;
- ``epoch_s``: seconds of one training epoch (FedDMMR: one round with ``client_fraction`` of the clients). An
  epoch that does not end within ``--train_budget_s`` is stopped and extrapolated from the batches done
  (``epoch_batches_done`` of ``epoch_batches``; ``epoch_complete`` says which);
- ``eval_s``: one full-ranking validation (every user, every item) with RecBole's evaluator.

The data come from ``bench/synthetic_data.py`` (written once into ``--data_root``): random, for speed and memory
only, never for accuracy. Each cell is written to ``<out>/cells/<size>-<model>.json`` as soon as it ends and is
skipped when present, so a long benchmark can be stopped and continued; ``--table`` only rebuilds the table and plot.

    python bench/scale.py --sizes 1m,5m --models FastSASRec-SSM,SASRec       # some cells
    python bench/scale.py                                                     # every cell (hours on 2 cores)
    python bench/scale.py --table                                             # table + plot from the cells
"""
import argparse
import datetime
import json
import math
import os
import platform
import resource
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {  # name: (interactions, users, items), MovieLens-1M/-20M-like shapes
    "1m": (1_000_000, 6_040, 3_700),
    "5m": (5_000_000, 30_000, 15_000),
    "20m": (20_000_000, 138_000, 27_000),
}
MODELS = {  # cell name: (model, config overrides)
    "FastSASRec-CE": ("FastSASRec", {"loss_type": "CE"}),
    "FastSASRec-SSM": ("FastSASRec", {"loss_type": "SSM"}),
    "DuoRec": ("DuoRec", {"loss_type": "SSM"}),
    "FTRagRec": ("FTRagRec", {"loss_type": "SSM", "stages": ["retriever"], "stage_epochs": {"retriever": 1}}),
    "UR4Rec": (  # sampled ranking losses, as the README's "Scale" section advises at this size
        "UR4Rec",
        {
            "ranking_loss_type": "InfoNCE",
            "distillation_weight": 0.0,
            "stages": ["pretrain_retriever"],
            "stage_epochs": {"pretrain_retriever": 1},
        },
    ),
    "FedDMMR": ("FedDMMR", {"client_fraction": 0.2, "loss_type": "SSM"}),
    "SASRec": ("SASRec", {"loss_type": "CE", "train_batch_size": 2048}),
    # the memory alone, its keys from the DuoRec cell's backbone (saved/<size>-DuoRec.pth, trained for that cell's
    # budget): recall of the compressed index on keys of a trained encoder, at several nprobe
    "FTRagRec-warm": ("FTRagRec", {"loss_type": "SSM", "stages": ["retriever"], "stage_epochs": {"retriever": 1}}),
}
MEMORY_ONLY = ("FTRagRec-warm",)
NPROBES = (8, 16, 32, 64, 128, 256)  # recall@10 of the compressed memory is measured at each
COMMON = {"show_progress": False, "epochs": 1, "eval_batch_size": 4096, "state": "INFO", "seed": 2020}
TEXT_FIELDS = {"item_title_field": "title", "item_genre_field": "genre"}  # of the generated .item file
TEXT_MODELS = ("UR4Rec", "FedDMMR")  # their cells read feature caches built ahead (features_s)


def rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def machine():
    return {
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def ensure_dataset(data_root, size):
    name = f"synth-{size}"
    if not os.path.isfile(os.path.join(data_root, name, f"{name}.inter")):
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        from synthetic_data import generate

        interactions, users, items = SIZES[size]
        generate(data_root, name, interactions, users, items, seed=0, item_text=True)
    return name


def run_cell(size, cell, data_root, threads, train_budget_s, saved_dir, fed_fraction=None):
    """Measure one cell in this process; returns a dict of plain numbers."""
    started = time.monotonic()
    from recbole_ur4rec.build import build
    from recbole_ur4rec.registry import get_trainer

    model_name, overrides = MODELS[cell]
    config_dict = {**COMMON, **TEXT_FIELDS, **overrides, "data_path": data_root, "threads": threads, "checkpoint_dir": saved_dir}
    warm_start = os.path.join(saved_dir, f"{size}-DuoRec.pth")
    if cell == "FTRagRec-warm":
        if not os.path.exists(warm_start):
            raise SystemExit(f"{warm_start} is missing: run the {size} DuoRec cell first (it saves its backbone there)")
        config_dict["duorec_checkpoint"] = warm_start
    config, model, dataset, train_data, valid_data, _ = build(model_name, f"synth-{size}", config_dict=config_dict, log=False)
    out = {"interactions": len(dataset.inter_feat), "users": dataset.user_num - 1, "items": dataset.item_num - 1}
    del dataset
    next(iter(train_data))
    out["first_batch_s"] = time.monotonic() - started
    out["load_rss_gb"] = rss_gb()
    out["train_rows"] = len(train_data._dataset)

    trainer = get_trainer(config["MODEL_TYPE"], model_name)(config, model)
    if model_name == "FTRagRec":  # the memory is built when the retrieval stage starts: timed on its own
        out.update(measure_memory_build(model), memory_backbone="random" if cell == "FTRagRec" else "DuoRec cell")
    if cell in MEMORY_ONLY:
        out["peak_rss_gb"] = rss_gb()
        return out
    n_batches = math.ceil(len(train_data._dataset) / train_data.step)
    timing = {"batches": 0}
    deadline = time.monotonic() + train_budget_s

    class Budgeted:
        """The training loader, stopped at the deadline; counts its batches."""

        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            timing["start"] = time.monotonic()
            for batch in self.loader:
                if time.monotonic() > deadline:
                    break
                timing["batches"] += 1
                yield batch
            timing["end"] = time.monotonic()

        def __len__(self):
            return len(self.loader)

        def __getattr__(self, name):
            return getattr(self.loader, name)

    if cell == "FedDMMR":  # a round: the trainer iterates its clients, not the loader
        fraction = config["client_fraction"]
        if fed_fraction:  # clients train one after another: a round's time is proportional to the clients sampled
            trainer.client_fraction = fed_fraction
        start = time.monotonic()
        trainer._train_epoch(train_data, 0, show_progress=False)
        seconds = time.monotonic() - start
        out.update(
            epoch_s=seconds * fraction / (fed_fraction or fraction),
            epoch_complete=not fed_fraction,
            epoch_batches=None,
            epoch_batches_done=None,
            measured_client_fraction=fed_fraction or fraction,
        )
    else:
        trainer.fit(Budgeted(train_data), None, saved=False, show_progress=False)  # one epoch, no validation
        if cell == "DuoRec":  # its backbone warm-starts the FTRagRec-warm cell
            os.makedirs(saved_dir, exist_ok=True)
            trainer._save_checkpoint(0, verbose=False, saved_model_file=warm_start)  # fit(saved=False) wrote nothing
        done = timing["batches"]
        elapsed = timing.get("end", time.monotonic()) - timing["start"]
        out.update(
            epoch_s=elapsed * n_batches / max(done, 1),
            epoch_complete=done >= n_batches,
            epoch_batches=n_batches,
            epoch_batches_done=done,
        )
    start = time.monotonic()
    result = trainer.evaluate(valid_data, load_best_model=False, show_progress=False)
    out["eval_s"] = time.monotonic() - start
    out["eval_users"] = len(valid_data._dataset)
    out["valid_ndcg@10"] = float(result["ndcg@10"])  # random data: a sanity check, not an accuracy claim
    out["peak_rss_gb"] = rss_gb()
    return out


def measure_memory_build(model, n_queries=1000, k=10):
    """FTRagRec: seconds to encode every training prefix and build the FAISS index, its size, search time per
    1,000 queries, and recall@10 against exact search over the same keys: the first ``n_queries`` keys of the stream
    are the queries (the stream is in random order for ivfsq8), and the exact top-k (with the memory's leakage rule)
    is kept up to date chunk by chunk as the keys stream past, so no key matrix is held."""
    import faiss
    import torch

    memory = model.memory
    exact = {}

    def tee(chunks):
        offset = 0
        for chunk in chunks:
            keys, _, users, positions = chunk
            if "queries" not in exact:
                exact.update(queries=keys[:n_queries].clone(), users=users[:n_queries], positions=positions[:n_queries])
                exact.update(sim=torch.full((n_queries, k), -float("inf")), ids=torch.zeros((n_queries, k), dtype=torch.int64))
            q = exact["queries"]
            q = torch.nn.functional.normalize(q, dim=1) if memory.normalize else q
            for lo in range(0, keys.size(0), 1 << 15):
                part = keys[lo : lo + (1 << 15)]
                part = torch.nn.functional.normalize(part, dim=1) if memory.normalize else part
                sim = q @ part.t()  # [Q C]
                leaked = (users[lo : lo + part.size(0)].unsqueeze(0) == exact["users"].unsqueeze(1)) & (
                    positions[lo : lo + part.size(0)].unsqueeze(0) >= exact["positions"].unsqueeze(1)
                )
                top_sim, top_id = sim.masked_fill(leaked, -float("inf")).topk(min(k, part.size(0)), dim=1)
                merged_sim = torch.cat([exact["sim"], top_sim], 1)
                merged_id = torch.cat([exact["ids"], top_id + offset + lo], 1)
                exact["sim"], order = merged_sim.topk(k, dim=1)
                exact["ids"] = merged_id.gather(1, order)
            offset += keys.size(0)
            yield chunk

    build_stream = memory.build_stream
    memory.build_stream = lambda chunks, n, fingerprint: build_stream(tee(chunks), n, fingerprint)
    start = time.monotonic()
    model.refresh_memory(force=True)
    out = {"memory_build_s": time.monotonic() - start, "memory_entries": len(memory), "memory_index": memory.built_type}
    del memory.build_stream
    tensors = [getattr(memory, name, None) for name in ("keys", "norms", "targets", "users", "positions")]
    metadata = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    out["memory_gb"] = (metadata + faiss.serialize_index(memory.index).nbytes) / 2**30
    recall = {}
    configured = getattr(memory.index, "nprobe", None)  # the built memory's (None: flat, exact)
    for nprobe in sorted(set(NPROBES) | {configured}) if configured is not None else (None,):
        if nprobe is not None:
            if nprobe > memory.index.nlist:
                continue
            memory.index.nprobe = nprobe
        start = time.monotonic()
        found, _, mask = memory.search(exact["queries"], exact["users"], exact["positions"], k)
        seconds = (time.monotonic() - start) * 1000 / n_queries
        hits = [len(set(a[m].tolist()) & set(b.tolist())) for a, m, b in zip(found, mask, exact["ids"])]
        recall[str(nprobe)] = {"recall@10": sum(hits) / (k * n_queries), "search_s_per_1k": seconds}
    if configured is not None:
        memory.index.nprobe = configured  # the cell goes on training with the memory as configured
    if memory.exact is not None:  # ivfsq8 with re-ranking: the file on disk, and the recall of its codes alone
        out["memory_rerank"] = memory.rerank
        out["memory_disk_gb"] = os.path.getsize(memory.exact.path) / 2**30
        exact_keys, memory.exact = memory.exact, None
        found, _, mask = memory.search(exact["queries"], exact["users"], exact["positions"], k)
        memory.exact = exact_keys
        hits = [len(set(a[m].tolist()) & set(b.tolist())) for a, m, b in zip(found, mask, exact["ids"])]
        out["memory_recall@10_codes_only"] = sum(hits) / (k * n_queries)
    out["memory_nlist"] = getattr(memory.index, "nlist", None)
    out["memory_nprobe"] = configured
    out["memory_recall_by_nprobe"] = recall
    out["memory_search_s_per_1k"] = recall[str(configured)]["search_s_per_1k"]
    out["memory_recall@10"] = recall[str(configured)]["recall@10"]
    return out


def cell_path(out_dir, size, cell):
    return os.path.join(out_dir, "cells", f"{size}-{cell}.json")


def features_path(folder, size, model):
    """The timing file of a size's text features for ``model`` in the cells folder ``folder``."""
    return os.path.join(folder, f"{size}-features.json" if model == "UR4Rec" else f"{size}-features-{model}.json")


def build_features(size, data_root, out_dir, model):
    """The text features ``model`` reads (UR4Rec: item and user text; FedDMMR: item text) of a generated dataset,
    cached beside it, timed once per size and model."""
    path = features_path(os.path.join(out_dir, "cells"), size, model)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["features_s"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    overrides = [f"--{key}={value}" for key, value in TEXT_FIELDS.items()]
    command = [sys.executable, "-m", "recbole_ur4rec.apps.precompute_features", "-d", f"synth-{size}", "-m", model, f"--data_path={data_root}", *overrides]
    started = time.monotonic()
    with open(path.replace(".json", ".log"), "w") as f:
        subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, check=True)
    seconds = time.monotonic() - started
    with open(path, "w") as f:
        json.dump({"features_s": seconds, "size": size, "model": model}, f)
    return seconds


def run_in_subprocess(size, cell, args):
    path = cell_path(args.out, size, cell)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if MODELS[cell][0] in TEXT_MODELS:
        build_features(size, args.data_root, args.out, MODELS[cell][0])
    command = [
        sys.executable, os.path.abspath(__file__), "--cell", size, cell, "--data_root", args.data_root,
        "--threads", str(args.threads), "--train_budget_s", str(args.train_budget_s), "--out", args.out,
    ] + (["--fed_fraction", str(args.fed_fraction)] if args.fed_fraction else [])
    log = path.replace(".json", ".log")
    started = time.monotonic()
    with open(log, "w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0:
        print(f"{size} {cell}: failed (rc {done.returncode}), see {log}")
        return
    with open(path) as f:
        cell_result = json.load(f)
    print(f"{size} {cell}: {cell_result} ({time.monotonic() - started:.0f} s)")


def fit_exponent(points):
    """Least-squares slope of log(cost) against log(interactions)."""
    if len(points) < 2:
        return None
    xs, ys = zip(*[(math.log(x), math.log(y)) for x, y in points])
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def write_table(out_dir):
    cells = {}
    folder = os.path.join(out_dir, "cells")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json") and "-features" not in name:
            with open(os.path.join(folder, name)) as f:
                data = json.load(f)
            cells[(data["size"], data["cell"])] = data
    if not cells:
        print("no cells yet")
        return
    any_cell = next(iter(cells.values()))
    lines = [
        "# Cost against size (generated data; speed and memory only)",
        "",
        f"Machine: {any_cell['machine']['cpus']} CPUs, {any_cell['machine']['memory_gb']} GB, "
        f"{any_cell['machine']['platform']}, Python {any_cell['machine']['python']}; torch threads per cell in the table.",
        "Command: `python bench/scale.py` (cells in `cells/`). An epoch marked * was stopped at the training budget and "
        "extrapolated from the batches done; for FedDMMR (epoch = one round at client_fraction 0.2), * marks a round "
        "timed with fewer clients (`--fed_fraction`) and scaled to 0.2 (clients train one after another).",
        "",
        "| size | model | interactions | threads | first batch (s) | RSS after load (GB) | peak RSS (GB) | epoch (s) | full-ranking validation (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in SIZES:
        for cell in MODELS:
            c = cells.get((size, cell))
            if c is None or cell in MEMORY_ONLY:
                continue
            epoch = f"{c['epoch_s']:.0f}" + ("" if c["epoch_complete"] else "*")
            lines.append(
                f"| {size} | {cell} | {c['interactions']:,} | {c['threads']} | {c['first_batch_s']:.0f} | {c['load_rss_gb']:.2f} | "
                f"{c['peak_rss_gb']:.2f} | {epoch} | {c['eval_s']:.0f} |"
            )
    memory_rows = [c for (size, cell), c in cells.items() if "memory_build_s" in c]
    if memory_rows:
        lines += [
            "",
            "FTRagRec's memory (one entry per training position), its keys from a randomly initialised backbone or from "
            "the DuoRec cell's backbone (trained for that cell's budget); recall@10 against exact search (1,000 queries "
            "from the memory, the leakage rule applied), at the configured nprobe and at others; ivfsq8 re-ranks a shortlist of "
            "`rerank` candidates by the exact keys it keeps in a file on disk (cells measured before re-ranking existed "
            "have no disk column), and 'codes alone' is its recall without that step:",
            "",
            "| size | backbone | entries | index | nlist | memory (GB) | exact keys on disk (GB) | build (s) | search per 1,000 queries (s) | recall@10 vs exact | codes alone | recall@10 by nprobe |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for c in sorted(memory_rows, key=lambda c: (c["interactions"], c["cell"])):
            recall = c.get("memory_recall@10")
            search = c.get("memory_search_s_per_1k")
            disk = f"{c['memory_disk_gb']:.2f}" if "memory_disk_gb" in c else ""
            codes = f"{c['memory_recall@10_codes_only']:.3f}" if "memory_recall@10_codes_only" in c else ""
            by_nprobe = ", ".join(f"{p}: {v['recall@10']:.3f}" for p, v in c.get("memory_recall_by_nprobe", {}).items())
            lines.append(
                f"| {c['size']} | {c.get('memory_backbone', 'random')} | {c['memory_entries']:,} | {c['memory_index']} | "
                f"{c.get('memory_nlist') or ''} | {c['memory_gb']:.2f} | {disk} | {c['memory_build_s']:.0f} | "
                f"{'' if search is None else f'{search:.2f}'} | {'' if recall is None else f'{recall:.3f}'} | {codes} | {by_nprobe} |"
            )
    features = []
    for size in SIZES:
        for model, what in (("UR4Rec", "item and user text"), ("FedDMMR", "item text")):
            path = features_path(folder, size, model)
            if os.path.exists(path):
                with open(path) as f:
                    features.append(f"{size} {what} ({model}): {json.load(f)['features_s']:.0f} s")
    if features:
        lines += ["", "Text features (`python -m recbole_ur4rec.apps.precompute_features -m <model>`, all-MiniLM-L6-v2 on the CPU, built "
                  "once per dataset and read from the cache by the UR4Rec and FedDMMR cells; a store already cached "
                  "is read, not rebuilt): " + "; ".join(features) + "."]
    lines += ["", "Exponent b of cost ~ interactions^b (least squares over the sizes measured):", ""]
    lines += ["| model | first batch | peak RSS | epoch | validation |", "|---|---:|---:|---:|---:|"]
    for cell in MODELS:
        if cell in MEMORY_ONLY:
            continue
        row = [cell]
        for key in ("first_batch_s", "peak_rss_gb", "epoch_s", "eval_s"):
            points = [(c["interactions"], c[key]) for (s, m), c in cells.items() if m == cell and c[key]]
            b = fit_exponent(points)
            row.append("" if b is None else f"{b:.2f} ({len(points)} sizes)")
        if any(row[1:]):
            lines.append("| " + " | ".join(row) + " |")
    path = os.path.join(out_dir, "scale.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(cells, os.path.join(out_dir, "scale.png"))


def plot(cells, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("first_batch_s", "first batch (s)"), ("peak_rss_gb", "peak RSS (GB)"), ("epoch_s", "epoch (s)"), ("eval_s", "validation (s)"))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6))
    for ax, (key, label) in zip(axes, keys):
        for cell in (c for c in MODELS if c not in MEMORY_ONLY):
            points = sorted((c["interactions"], c[key]) for (s, m), c in cells.items() if m == cell and c[key])
            if points:
                ax.plot(*zip(*points), marker="o", label=cell)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("interactions")
        ax.set_title(label)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--data_root", default=os.path.join(ROOT, "dataset"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train_budget_s", type=float, default=900, help="stop an epoch after this many seconds and extrapolate")
    parser.add_argument(
        "--fed_fraction", type=float, default=None,
        help="FedDMMR: time a round at this client fraction and scale it to client_fraction (0.2), for sizes where a full round takes hours",
    )
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "scale"))
    parser.add_argument("--cell", nargs=2, metavar=("SIZE", "MODEL"), help="(internal) measure one cell in this process")
    parser.add_argument("--table", action="store_true", help="only rebuild the table and plot from the cells")
    args = parser.parse_args()

    if args.cell:
        size, cell = args.cell
        saved = os.path.join(args.out, "saved")
        result = run_cell(size, cell, args.data_root, args.threads, args.train_budget_s, saved, args.fed_fraction)
        result.update(size=size, cell=cell, threads=args.threads, machine=machine(), date=datetime.date.today().isoformat())
        with open(cell_path(args.out, size, cell) + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(cell_path(args.out, size, cell) + ".tmp", cell_path(args.out, size, cell))
        return
    if not args.table:
        for size in args.sizes.split(","):
            ensure_dataset(args.data_root, size)
            for cell in args.models.split(","):
                if os.path.exists(cell_path(args.out, size, cell)):
                    print(f"{size} {cell}: done, skipped")
                    continue
                run_in_subprocess(size, cell, args)
    write_table(args.out)


if __name__ == "__main__":
    main()
