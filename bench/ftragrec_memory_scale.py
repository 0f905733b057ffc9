"""FTRagRec's retrieval memory at scale, without a model: an ``ivfsq8`` RetrievalMemory over N synthetic keys, built
the way ``FTRagRec.refresh_memory`` builds it (keys streamed in chunks, never all in memory at once).

    OMP_NUM_THREADS=1 python bench/ftragrec_memory_scale.py --sizes 1m,5m --threads 1
    OMP_NUM_THREADS=1 python bench/ftragrec_memory_scale.py --sizes 20m --threads 1   # ~2.5 GB peak, ~30-60 min on 1 thread

Keys (hidden size 64) are drawn to resemble sequence representations: a Gaussian mixture of 5,000 clusters (unit
centres, Zipf-like weights ~ rank^-0.7) plus isotropic noise of norm ~0.5, L2-normalised, then scaled by a log-normal
norm around 8 (the memory normalises them and keeps the norms). Each chunk comes from a generator seeded by (seed,
chunk), so exact search regenerates the keys chunk by chunk. Queries are 1,000 fresh keys of the same mixture (not
entries of the memory) of a user outside it, so that the leakage rule excludes nothing and recall@10 measures the index.

Per size (each in its own process, so that the peak RSS is that size's): build seconds (training, encoding, writing the
lists; without generating the keys), bytes of the memory (serialized index + metadata tensors) per entry, process
peak RSS during the build and resident set after it, relative error of decoded keys (10,000 entries), seconds per
1,000 queries of ``RetrievalMemory.search`` (k = 10, leakage rule included) and recall@10 against exact search (chunked
torch matmul + top-k), at each ``--nprobe``.
``--ivf_up_to`` also builds today's ``ivf`` memory (float keys) for the sizes up to it, for comparison.
Results are merged into ``--output`` (JSON, one entry per size and index type) and the markdown table beside it.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import faiss
import numpy as np
import torch

from recbole_ur4rec.index.retrieval_memory import RetrievalMemory

DIM, CLUSTERS, NOISE, CHUNK, QUERIES, K = 64, 5000, 0.5, 65536, 1000, 10
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUTPUT = os.path.join(HERE, "results", "ftragrec_memory_scale_cpu2_2026-12-01.json")


def parse_size(text):
    scale = {"k": 10**3, "m": 10**6}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


class Mixture:
    """Seeded synthetic keys: chunk ``c`` of ``n`` entries is the same array every time it is drawn."""

    def __init__(self, seed):
        rng = np.random.default_rng([seed, 0])
        self.seed = seed
        self.centres = rng.normal(size=(CLUSTERS, DIM)).astype(np.float32)
        self.centres /= np.linalg.norm(self.centres, axis=1, keepdims=True)
        weights = 1.0 / np.arange(1, CLUSTERS + 1) ** 0.7
        self.weights = weights / weights.sum()

    def draw(self, n, stream):
        """(keys [n H] float32, cluster [n]) from the generator seeded by (seed, ``stream``)."""
        rng = np.random.default_rng([self.seed, 1, stream])
        cluster = rng.choice(CLUSTERS, n, p=self.weights)
        keys = self.centres[cluster] + NOISE * rng.standard_normal((n, DIM), dtype=np.float32) / np.sqrt(DIM)
        keys /= np.linalg.norm(keys, axis=1, keepdims=True)
        keys *= np.exp(rng.normal(np.log(8.0), 0.2, size=(n, 1))).astype(np.float32)
        return keys, cluster

    def chunks(self, n):
        """Chunks (keys, targets, users, positions) of ``n`` entries: 50 positions per user, a target per cluster."""
        for c, lo in enumerate(range(0, n, CHUNK)):
            keys, cluster = self.draw(min(CHUNK, n - lo), c + 1)
            ids = torch.arange(lo, lo + len(keys))
            yield torch.from_numpy(keys), torch.from_numpy(cluster + 1), ids // 50, ids % 50

    def queries(self):
        return torch.from_numpy(self.draw(QUERIES, 0)[0])


def exact_top_k(mixture, n, queries):
    """Ids [Q K] of the exact top-K cosine neighbours of ``queries`` among the ``n`` entries, chunk by chunk."""
    q = torch.nn.functional.normalize(queries, dim=1)
    best_sim, best_id = torch.full((len(q), K), -2.0), torch.zeros((len(q), K), dtype=torch.int64)
    for c, lo in enumerate(range(0, n, CHUNK)):
        keys = torch.nn.functional.normalize(torch.from_numpy(mixture.draw(min(CHUNK, n - lo), c + 1)[0]), dim=1)
        sim, idx = torch.topk(q @ keys.T, min(K, len(keys)), dim=1)  # [Q K]
        sim, order = torch.topk(torch.cat([best_sim, sim], 1), K, dim=1)
        best_id = torch.gather(torch.cat([best_id, idx + lo], 1), 1, order)
        best_sim = sim
    return best_id


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(n, index_type, nprobes, seed):
    mixture = Mixture(seed)
    memory = RetrievalMemory(index_type=index_type, nprobe=max(nprobes), seed=seed)
    generating = [0.0]

    def timed_chunks():
        stream = mixture.chunks(n)
        while True:
            begin = time.perf_counter()
            chunk = next(stream, None)
            generating[0] += time.perf_counter() - begin
            if chunk is None:
                return
            yield chunk

    rss_before = rss_mb()
    begin = time.perf_counter()
    memory.build_stream(timed_chunks(), n, "synthetic")
    build_s = time.perf_counter() - begin - generating[0]
    peak_rss_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    rss_after = rss_mb()
    queries = mixture.queries()
    users, positions = torch.full((QUERIES,), -1), torch.zeros(QUERIES, dtype=torch.long)
    truth = exact_top_k(mixture, n, queries).numpy()
    by_nprobe = {}
    for nprobe in nprobes:
        memory.index.nprobe = nprobe
        memory.search(queries[:10], users[:10], positions[:10], K)  # warm-up
        begin = time.perf_counter()
        found = memory.search(queries, users, positions, K)[0].numpy()
        search_s = time.perf_counter() - begin
        recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth)]))
        by_nprobe[str(nprobe)] = {"recall@10": round(recall, 4), "search_s_per_1k_queries": round(search_s * 1000 / QUERIES, 4)}
    first = torch.from_numpy(mixture.draw(min(CHUNK, n), 1)[0][:10000])  # the first entries' keys, drawn again
    decoded = memory.neighbour_keys(torch.arange(len(first)).view(-1, 1))[:, 0]
    error = ((decoded - first).norm(dim=1) / first.norm(dim=1)).numpy()
    metadata = {name: getattr(memory, name) for name in ("keys", "targets", "users", "positions", "norms")}
    metadata_bytes = sum(t.numel() * t.element_size() for t in metadata.values() if t is not None)
    index_bytes = faiss.serialize_index(memory.index).nbytes  # after the RSS readings: this makes a copy
    return {
        "entries": n,
        "index_type": memory.built_type,
        "nlist": memory.index.nlist,
        "build_s": round(build_s, 2),
        "generate_keys_s": round(generating[0], 2),
        "index_bytes": index_bytes,
        "metadata_bytes": metadata_bytes,
        "memory_bytes": index_bytes + metadata_bytes,
        "bytes_per_entry": round((index_bytes + metadata_bytes) / n, 2),
        "peak_rss_build_mb": round(peak_rss_build, 1),
        "rss_before_build_mb": round(rss_before, 1),
        "rss_after_build_mb": round(rss_after, 1),
        "decoded_key_relative_error": {"mean": round(float(error.mean()), 5), "max": round(float(error.max()), 5)},
        "by_nprobe": by_nprobe,
    }


def markdown(results, note):
    lines = [
        "# FTRagRec retrieval memory at scale (bench/ftragrec_memory_scale.py)",
        "",
        "Synthetic 64-d keys (Gaussian mixture of 5,000 clusters, see the script), streamed in chunks of 65,536; "
        "recall@10 of `RetrievalMemory.search` against exact search on 1,000 fresh queries; memory = serialized FAISS "
        "index (codes, ids, direct map, centroids) + metadata tensors; RSS includes the Python/torch baseline "
        "(`rss_before_build_mb` in the JSON).",
        "",
        *([note, ""] if note else []),
        "| entries | index | nlist | build s | memory MiB | bytes/entry | peak RSS MiB (build) | RSS after build MiB | "
        "decoded key rel. error mean / max | nprobe | recall@10 | search s / 1k queries |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["entries"], r["index_type"])):
        for nprobe, m in r["by_nprobe"].items():
            lines.append(
                f"| {r['entries']:,} | {r['index_type']} | {r['nlist']} | {r['build_s']} | {r['memory_bytes'] / 2**20:.0f} | "
                f"{r['bytes_per_entry']} | {r['peak_rss_build_mb']:.0f} | {r['rss_after_build_mb']:.0f} | "
                f"{r['decoded_key_relative_error']['mean']} / {r['decoded_key_relative_error']['max']} | {nprobe} | "
                f"{m['recall@10']} | {m['search_s_per_1k_queries']} |"
            )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1m,5m", help="entry counts, comma-separated (1m,5m,20m); '': only rewrite the markdown")
    parser.add_argument("--nprobe", default="16,32", help="comma-separated nprobe values searched")
    parser.add_argument("--ivf_up_to", default="1m", help="also build the float-key 'ivf' memory up to this size (0: never)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    parser.add_argument("--note", default=None, help="a line on the machine and run, kept in the JSON and the markdown")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # "<entries>:<index_type>": measure it, print JSON
    args = parser.parse_args()
    nprobes = [int(p) for p in args.nprobe.split(",")]
    if args.one:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
        size, index_type = args.one.split(":")
        print(json.dumps(measure(int(size), index_type, nprobes, args.seed)))
        return
    results, note = [], args.note
    if os.path.exists(args.output):
        with open(args.output) as f:
            saved = json.load(f)
        results, note = saved["results"], note or saved.get("note")
    for size in map(parse_size, filter(None, args.sizes.split(","))):
        for index_type in ["ivfsq8"] + (["ivf"] if size <= parse_size(args.ivf_up_to) else []):
            command = [sys.executable, __file__, "--one", f"{size}:{index_type}", "--nprobe", args.nprobe]
            command += ["--threads", str(args.threads), "--seed", str(args.seed)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            results = [r for r in results if (r["entries"], r["index_type"]) != (size, index_type)] + [result]
            print(json.dumps(result), flush=True)
            write(args, results, note)
    write(args, results, note)
    print(markdown(results, note))


def write(args, results, note):
    with open(args.output, "w") as f:
        json.dump({"threads": args.threads, "seed": args.seed, "dim": DIM, "note": note, "results": results}, f, indent=1)
    with open(os.path.splitext(args.output)[0] + ".md", "w") as f:
        f.write(markdown(results, note))


if __name__ == "__main__":
    main()
