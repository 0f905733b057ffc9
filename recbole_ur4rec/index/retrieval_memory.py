r"""
RetrievalMemory
################################################
Reference:
    Jeff Johnson, Matthijs Douze and Hervé Jégou. "Billion-scale similarity search with GPUs." IEEE Transactions on
    Big Data, 2019 (FAISS).

A FAISS memory of training prefixes: one entry per (user, position) of the training split, keyed by the sequence
representation of the prefix that ends at that position and valued by the item that follows it (its target).

Leakage rule: an entry of the query's own user at or after the query's position (the query itself, its target and
its future) is never returned. Searches ask FAISS for more candidates than needed and drop the excluded ones,
asking again with more candidates for the queries left short, so excluded entries never take a neighbour's place.

Large memories (``ivfsq8``): an ``IndexIVFScalarQuantizer`` with 8-bit codes keeps one byte per dimension and entry
instead of float keys (four bytes, plus as much again inside an ``IndexIVFFlat``), is built from keys streamed in
chunks (trained on a sample of the first ones, then each chunk encoded and dropped), and decodes the neighbours' keys
from the codes. Its metadata (targets, users, positions) is int32.

Re-ranking (``ivfsq8`` with ``rerank`` > 0): keys of a trained encoder crowd together, closer than SQ8's resolution,
so the codes alone do not order near neighbours reliably. The memory therefore also writes every key (unit-normalised
when ``normalize``) as float32 to a file on disk while it streams, asks the index for a shortlist of ``rerank``
allowed candidates per query and orders them by their exact similarity read from that file. The file is
memory-mapped and its pages are released after each read: it costs disk (4 bytes x hidden size per entry), not
resident memory.
"""
import hashlib
import math
import mmap
import os
import struct
import tempfile
import weakref

import faiss
import numpy as np
import torch

from recbole_ur4rec.common.checkpoint_io import CheckpointError

INDEX_TYPES = ("auto", "flat", "ivf", "ivfsq8")
COMPRESSED = "ivfsq8"
MIN_TRAIN_SIZE = 65536  # keys that train the ivfsq8 index at least (when there are that many); 39 per IVF list otherwise
ADD_CHUNK = 65536  # streamed keys are encoded in chunks of about this many
LIST_GROUPS = 64  # ivfsq8 codes wait for the end of the stream in this many groups of IVF lists, written one at a time
INT32 = torch.iinfo(torch.int32)
# What FAISS writes first for each saved index type (its fourcc), and bytes per entry beyond the id (codes)
SAVED_INDEXES = {"ivf": (b"IwFl", faiss.IndexIVFFlat, 4), COMPRESSED: (b"IwSq", faiss.IndexIVFScalarQuantizer, 1)}
INDEX_HEADER = struct.Struct("<4siqqq?i")  # fourcc, d, ntotal, two placeholders, is_trained, metric_type


def read_index_bytes(index_bytes, index_type, n, dim):
    """The FAISS index of ``index_type`` with ``n`` entries of dimension ``dim`` saved as ``index_bytes`` (a uint8
    tensor from a checkpoint), checked before FAISS parses it: its type, dimension, entry count, metric and byte
    size; anything else raises :class:`CheckpointError` naming what differs."""
    def corrupt(what):
        return CheckpointError(f"the saved retrieval memory's index (checkpoint key 'index_bytes') is corrupt or foreign: {what}")

    if not isinstance(index_bytes, torch.Tensor) or index_bytes.dtype != torch.uint8 or index_bytes.dim() != 1:
        raise corrupt(f"expected a 1-d uint8 tensor, got {type(index_bytes).__name__} {getattr(index_bytes, 'dtype', '')}")
    data = index_bytes.numpy()
    if data.size < INDEX_HEADER.size:
        raise corrupt(f"{data.size} bytes, shorter than an index header ({INDEX_HEADER.size})")
    fourcc, d, ntotal, _, _, trained, metric = INDEX_HEADER.unpack_from(data[: INDEX_HEADER.size].tobytes())  # the header only
    expected_fourcc, expected_class, code_bytes = SAVED_INDEXES[index_type]
    if fourcc != expected_fourcc:
        raise corrupt(f"expected a FAISS {expected_class.__name__} (header {expected_fourcc!r}) for index type {index_type!r}, got header {fourcc!r}")
    if d != dim or ntotal != n or not trained or metric != faiss.METRIC_INNER_PRODUCT:
        raise corrupt(
            f"expected a trained inner-product index of {n} entries of dimension {dim}, got {ntotal} entries of dimension "
            f"{d} (trained: {trained}, metric {metric})"
        )
    least = n * (dim * code_bytes + 8)  # every entry's code and id
    most = least + (n + 1) * dim * 8 + (1 << 20)  # with IVF centroids (at most one per entry), trainer state, lists
    if not least <= data.size <= most:
        raise corrupt(f"{data.size} bytes, where {n} entries of dimension {dim} take between {least} and {most}")
    try:
        index = faiss.deserialize_index(data)  # FAISS returns the concrete index class
    except RuntimeError as error:
        raise corrupt(f"FAISS could not read it ({str(error).splitlines()[0]})") from None
    if not isinstance(index, expected_class) or index.d != dim or index.ntotal != n:
        raise corrupt(f"expected {expected_class.__name__} of {n} x {dim}, read {type(index).__name__} of {index.ntotal} x {index.d}")
    return index


def weights_fingerprint(tensors):
    """A short hash of tensors' names, shapes and values (the weights a memory was encoded with)."""
    digest = hashlib.sha1()
    for name, tensor in sorted(tensors.items()):
        data = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(data.shape)}".encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:16]


def _joined(parts):
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _int32(values, name):
    """``values`` [b] as int32 (ivfsq8's metadata), or a ValueError when one does not fit."""
    values = values.detach().to("cpu", torch.int64)
    if values.numel() and (values.min() < INT32.min or values.max() > INT32.max):
        raise ValueError(
            f"index_type 'ivfsq8' stores the entries' {name} as int32, but one is {int(values.abs().max())}; "
            "set config key 'index_type' to 'ivf' or 'flat'"
        )
    return values.to(torch.int32)


class ExactLists:
    """Writes IVF codes into an index's inverted lists with each list allocated once, at its final size.

    FAISS's own ``add`` grows every list's vector by doubling, which keeps unused capacity resident beyond the codes,
    ids and direct map. Here the codes of each chunk wait in ``LIST_GROUPS``
    groups of lists (64 + 8 bytes per entry) and :meth:`finish` moves them into the lists one group at a time.
    """

    def __init__(self, index):
        self.index, self.n = index, 0
        self.groups = [[] for _ in range(LIST_GROUPS)]

    def add(self, x):
        """Encode ``x`` [b H] (float32, C order); its entries get the next ids."""
        b = x.shape[0]
        lists = self.index.quantizer.assign(x, 1).ravel()  # [b]
        codes = np.empty((b, self.index.code_size), dtype=np.uint8)
        self.index.encode_vectors(b, faiss.swig_ptr(x), faiss.swig_ptr(lists), faiss.swig_ptr(codes), False)
        group = lists * LIST_GROUPS // self.index.nlist
        order = np.argsort(group, kind="stable")
        bounds = np.searchsorted(group[order], np.arange(LIST_GROUPS + 1))
        ids = np.arange(self.n, self.n + b, dtype=np.int32)
        for g in range(LIST_GROUPS):
            chosen = order[bounds[g] : bounds[g + 1]]
            if len(chosen):
                self.groups[g].append((lists[chosen].astype(np.int32), ids[chosen], codes[chosen]))
        self.n += b

    def finish(self):
        invlists = self.index.invlists
        for g, parts in enumerate(self.groups):
            self.groups[g] = None
            if not parts:
                continue
            lists, ids, codes = (np.concatenate(p) for p in zip(*parts))
            del parts
            order = np.argsort(lists, kind="stable")
            lists, ids, codes = lists[order], ids[order].astype(np.int64), codes[order]
            starts = np.flatnonzero(np.r_[True, lists[1:] != lists[:-1]])
            for lo, hi in zip(starts, np.r_[starts[1:], len(lists)]):
                invlists.add_entries(int(lists[lo]), int(hi - lo), faiss.swig_ptr(ids[lo:hi]), faiss.swig_ptr(codes[lo:hi]))
        self.index.ntotal = self.n
        self.index.make_direct_map()  # id -> (list, offset), for decoding the neighbours' keys


def _remove(path, state):
    if not state["pinned"] and os.path.exists(path):
        os.remove(path)


class ExactKeys:
    """Float32 keys [N H] in a ``.npy`` file on disk, read a few rows at a time.

    Written by :meth:`append` (chunks in entry order) and :meth:`finish`, or opened from an existing file. The file
    is memory-mapped read-only; after each gather its pages are handed back (``MADV_DONTNEED``: clean file pages, so
    nothing is lost), so reading costs no resident memory. A file not ``pinned`` (saved in a checkpoint by
    :meth:`RetrievalMemory.state_dict`) is deleted when the object goes away or its memory is rebuilt.
    """

    def __init__(self, path, n, dim, pinned=False):
        self.path, self.n, self.dim = path, n, dim
        self.state = {"pinned": pinned}
        self._file, self._map, self._rows = None, None, None
        self._finalizer = weakref.finalize(self, _remove, path, self.state)

    @classmethod
    def create(cls, folder, n, dim):
        os.makedirs(folder, exist_ok=True)
        handle, path = tempfile.mkstemp(prefix="ftragrec-keys-", suffix=".npy", dir=folder)
        keys = cls(path, n, dim)
        keys._file = os.fdopen(handle, "wb")
        np.lib.format.write_array_header_1_0(keys._file, {"descr": "<f4", "fortran_order": False, "shape": (n, dim)})
        keys._written = 0
        return keys

    @classmethod
    def open(cls, path, n, dim):
        """The keys saved at ``path``; a ValueError naming the file when it is missing or not [n dim] float32."""
        if not os.path.isfile(path):
            raise ValueError(f"the retrieval memory's exact keys file {path} is missing (it is written beside the checkpoints)")
        with open(path, "rb") as f:
            try:
                if np.lib.format.read_magic(f) != (1, 0):
                    raise ValueError("not a version 1.0 .npy file")
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            except ValueError as error:
                raise ValueError(f"the retrieval memory's exact keys file {path} is not a .npy file: {error}") from None
            size = f.tell() + n * dim * 4
        if shape != (n, dim) or fortran or dtype != np.float32 or os.path.getsize(path) != size:
            raise ValueError(
                f"the retrieval memory's exact keys file {path} holds {dtype} {shape} in {os.path.getsize(path)} bytes, "
                f"expected float32 {(n, dim)} in {size}"
            )
        return cls(path, n, dim, pinned=True)

    def append(self, x):
        """Write ``x`` [b H] (float32) as the next entries' keys."""
        self._file.write(np.ascontiguousarray(x, dtype="<f4").tobytes())
        self._written += x.shape[0]

    def finish(self):
        self._file.close()
        self._file = None
        if self._written != self.n:
            raise ValueError(f"the retrieval memory's exact keys file {self.path} got {self._written} keys, expected {self.n}")

    def gather(self, ids):
        """Keys [len(ids) H] (float32) of the entries ``ids`` (int64 numpy array)."""
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            offset = len(self._map) - self.n * self.dim * 4
            self._rows = np.frombuffer(self._map, dtype="<f4", count=self.n * self.dim, offset=offset).reshape(self.n, self.dim)
        rows = self._rows[ids]  # a copy
        self._map.madvise(mmap.MADV_DONTNEED)  # file-backed, read-only pages: dropped from this process, not lost
        return rows

    def pin(self):
        self.state["pinned"] = True

    def release(self):
        """Close the file; delete it unless a checkpoint refers to it."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._rows = None
        if self._map is not None:
            self._map.close()
            self._map = None
        self._finalizer()


class RetrievalMemory:
    """Training-prefix memory over a FAISS inner-product index (exact ``IndexFlatIP``, ``IndexIVFFlat`` or the
    compressed ``IndexIVFScalarQuantizer`` with 8-bit codes).

    ``flat`` and ``ivf`` keep the float keys (``keys`` [N H]) and int64 ``targets``, ``users`` and ``positions``;
    ``ivfsq8`` keeps no float keys (``keys`` is None; :meth:`neighbour_keys` decodes them, approximately), its metadata
    as int32, and, with ``normalize``, each key's norm (float32), so that decoded keys keep their scale.

    Args:
        index_type (str): ``flat``, ``ivf``, ``ivfsq8``, or ``auto`` (``ivf`` from ``ivf_min_size`` entries on,
            ``ivfsq8`` from ``compressed_min_size`` on).
        nlist (int or None): IVF lists; None: ``4 * sqrt(n)``, at most ``n / 39`` (FAISS's points per centroid).
        nprobe (int): IVF lists searched per query.
        ivf_min_size (int): entries from which ``auto`` picks IVF.
        compressed_min_size (int): entries from which ``auto`` picks ``ivfsq8``.
        compressed_nprobe (int): IVF lists searched per query by ``ivfsq8`` (its larger memories have more, smaller
            lists).
        normalize (bool): L2-normalise keys and queries, so that similarities are cosines in [-1, 1].
        seed (int): seed of the IVF k-means.
        kmeans_iterations (int): iterations of the IVF k-means (FAISS's default is 25; fewer make refreshes
            cheaper).
        rerank (int): ``ivfsq8``: candidates per query re-ranked by exact similarity (keys in a float32 file); 0: none.
        exact_keys_dir (str or None): folder of that file (None: the system's temporary folder).
    """

    def __init__(
        self,
        index_type="auto",
        nlist=None,
        nprobe=16,
        ivf_min_size=20000,
        normalize=True,
        seed=0,
        kmeans_iterations=5,
        compressed_min_size=2000000,
        compressed_nprobe=32,
        rerank=0,
        exact_keys_dir=None,
    ):
        if index_type not in INDEX_TYPES:
            raise ValueError(f"config key 'index_type' must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}")
        self.index_type, self.nlist, self.nprobe = index_type, nlist, nprobe
        self.ivf_min_size, self.compressed_min_size, self.compressed_nprobe = ivf_min_size, compressed_min_size, compressed_nprobe
        self.normalize, self.seed, self.kmeans_iterations = normalize, seed, kmeans_iterations
        self.index, self.keys, self.targets, self.users, self.positions = None, None, None, None, None
        self.norms, self.fingerprint, self.built_type = None, None, None
        self.rerank, self.exact_keys_dir, self.exact = rerank, exact_keys_dir, None  # exact: ExactKeys of ivfsq8
        self._searched = None  # (exact, index [Q k], keys [Q k H]) of the last re-ranked search: read once

    def __len__(self):
        return 0 if self.targets is None else self.targets.size(0)

    @property
    def built(self):
        return self.index is not None

    def _vectors(self, x):
        x = np.array(x.detach().to("cpu", torch.float32).numpy(), dtype=np.float32, order="C")  # a copy: normalised in place
        if self.normalize:
            faiss.normalize_L2(x)
        return x

    def resolved_type(self, n):
        """The index type a memory of ``n`` entries gets."""
        if self.index_type != "auto":
            return self.index_type
        if n >= self.compressed_min_size:
            return COMPRESSED
        return "ivf" if n >= self.ivf_min_size else "flat"

    def _resolved_nlist(self, n):
        nlist = self.nlist or int(4 * math.sqrt(n))
        return max(1, min(nlist, n // 39 if self.nlist is None else n))

    def build(self, keys, targets, users, positions, fingerprint, index_bytes=None):
        """Index ``keys`` [N H] of entries with ``targets``, ``users`` and ``positions`` [N] (int64).

        ``index_bytes`` (a uint8 tensor from :meth:`state_dict`) restores a saved IVF index instead of training one.
        """
        n = keys.size(0)
        if n == 0:
            raise ValueError("the retrieval memory has no entries: the training split holds no (prefix, next item) pair")
        if self.resolved_type(n) == COMPRESSED:
            self._build_compressed([(keys, targets, users, positions)], n, fingerprint)
            return
        self._drop_exact()
        self.built_type = self.resolved_type(n)
        self.keys, self.norms = keys.detach().to("cpu", torch.float32).contiguous(), None
        self.targets, self.users, self.positions = (t.detach().to("cpu", torch.int64) for t in (targets, users, positions))
        self.fingerprint = fingerprint
        vectors = self._vectors(self.keys)
        if self.built_type == "ivf" and index_bytes is not None:
            self.index = read_index_bytes(index_bytes, "ivf", n, vectors.shape[1])
        elif self.built_type == "ivf":
            nlist = self._resolved_nlist(n)
            quantizer = faiss.IndexFlatIP(vectors.shape[1])
            self.index = faiss.IndexIVFFlat(quantizer, vectors.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
            self.index.cp.seed = self.seed
            self.index.cp.niter = self.kmeans_iterations
            self.index.train(vectors)
            self.index.add(vectors)
        else:
            self.index = faiss.IndexFlatIP(vectors.shape[1])
            self.index.add(vectors)
        if self.built_type == "ivf":
            self.index.nprobe = min(self.nprobe, self.index.nlist)

    def build_stream(self, chunks, n, fingerprint):
        """Index ``n`` entries that arrive as ``chunks`` of (keys [b H], targets [b], users [b], positions [b]).

        ``ivfsq8`` never holds all float keys: it trains on a random sample of the first keys (at least
        ``MIN_TRAIN_SIZE``, or 39 per IVF list; pass the chunks in random order, so that they are a sample of all)
        and encodes the rest chunk by chunk. ``flat`` and ``ivf`` keep the float keys anyway, so they gather them
        and :meth:`build`.
        """
        if n == 0:
            raise ValueError("the retrieval memory has no entries: the training split holds no (prefix, next item) pair")
        if self.resolved_type(n) != COMPRESSED:
            keys, targets, users, positions = (torch.cat(parts) for parts in zip(*chunks))
            if keys.size(0) != n:
                raise ValueError(f"the retrieval memory was announced {n} entries but received {keys.size(0)}")
            self.build(keys, targets, users, positions, fingerprint)
        else:
            self._build_compressed(chunks, n, fingerprint)

    def _build_compressed(self, chunks, n, fingerprint):
        targets, users, positions = (torch.empty(n, dtype=torch.int32) for _ in range(3))
        norms = torch.empty(n, dtype=torch.float32) if self.normalize else None
        nlist = self._resolved_nlist(n)
        train_size = min(n, max(39 * nlist, MIN_TRAIN_SIZE))
        writer, pending, n_pending, filled, exact = None, [], 0, 0, None
        for chunk_keys, chunk_targets, chunk_users, chunk_positions in chunks:
            b = chunk_keys.size(0)
            if filled + b > n:
                raise ValueError(f"the retrieval memory was announced {n} entries but received more")
            entries = slice(filled, filled + b)
            targets[entries], users[entries] = _int32(chunk_targets, "targets"), _int32(chunk_users, "users")
            positions[entries] = _int32(chunk_positions, "positions")
            if norms is not None:
                norms[entries] = torch.linalg.vector_norm(chunk_keys.detach().to("cpu", torch.float32), dim=1)
            pending.append(self._vectors(chunk_keys))
            if self.rerank:
                if exact is None:
                    exact = ExactKeys.create(self._keys_folder(), n, chunk_keys.size(1))
                exact.append(pending[-1])
            n_pending, filled = n_pending + b, filled + b
            if writer is None and n_pending >= train_size:
                pending = [_joined(pending)]
                writer = ExactLists(self._trained_compressed(pending[0], train_size, nlist))
            if writer is not None and n_pending >= ADD_CHUNK:
                writer.add(_joined(pending))
                pending, n_pending = [], 0
        if filled != n:
            raise ValueError(f"the retrieval memory was announced {n} entries but received {filled}")
        if writer is None:
            pending = [_joined(pending)]
            writer = ExactLists(self._trained_compressed(pending[0], train_size, nlist))
        if pending:
            writer.add(_joined(pending))
        writer.finish()
        writer.index.nprobe = min(self.compressed_nprobe, nlist)
        if exact is not None:
            exact.finish()
        self._drop_exact()
        self.index, self.keys, self.norms, self.exact = writer.index, None, norms, exact
        self.targets, self.users, self.positions = targets, users, positions
        self.fingerprint, self.built_type = fingerprint, COMPRESSED

    def _trained_compressed(self, vectors, train_size, nlist):
        """An empty IVF-SQ8 index trained on ``train_size`` random rows of ``vectors`` [S H]."""
        if vectors.shape[0] > train_size:
            vectors = vectors[np.random.default_rng(self.seed).choice(vectors.shape[0], train_size, replace=False)]
        index = faiss.index_factory(vectors.shape[1], f"IVF{nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = self.seed
        index.cp.niter = self.kmeans_iterations
        index.train(vectors)
        return index

    def _keys_folder(self):
        return self.exact_keys_dir or tempfile.gettempdir()

    def _drop_exact(self):
        if self.exact is not None:
            self.exact.release()
            self.exact = None

    def neighbour_keys(self, index):
        """Keys [Q k H] of the entries ``index`` [Q k] (on the CPU).

        ``ivfsq8`` reads them from its exact keys file (times the saved norms) when it re-ranks, else
        decodes them from its 8-bit codes (approximate);
        ``flat`` and ``ivf`` return the exact keys.
        """
        if self.keys is not None:
            return self.keys[index.cpu()]
        ids = index.reshape(-1).to("cpu", torch.int64).numpy()
        searched = self._searched
        if searched is not None and searched[0] is self.exact and np.array_equal(searched[1], index.cpu().numpy()):
            decoded = searched[2].reshape(len(ids), -1).copy()  # the last search's re-ranking read them already
        elif self.exact is not None:
            decoded = self.exact.gather(ids)  # [Q*k H]
        else:
            decoded = self.index.reconstruct_batch(ids)
        if self.norms is not None:
            decoded *= self.norms.numpy()[ids, None]
        return torch.from_numpy(decoded).view(*index.shape, -1)

    def search(self, queries, users, positions, k, threshold=None):
        """Top-``k`` allowed neighbours of ``queries`` [Q H].

        Args:
            users (torch.Tensor): [Q] user of each query.
            positions (torch.Tensor): [Q] position of each query in its user's history: entries of the same user
                at this position or later are excluded (0 excludes the user entirely).
            threshold (float or None): neighbours less similar than this are masked out.

        Returns:
            tuple: ``index`` [Q k] (entry ids, 0 where masked), ``similarity`` [Q k] and ``mask`` [Q k] (True for a
            neighbour), on the device of ``queries``.
        """
        device = queries.device
        q = self._vectors(queries)
        users, positions = users.to("cpu", torch.int64).numpy(), positions.to("cpu", torch.int64).numpy()
        if self.exact is None:
            out_index, out_sim = self._allowed(q, users, positions, k)
        else:  # a shortlist from the 8-bit codes, ordered by the exact keys
            out_index, _ = self._allowed(q, users, positions, max(k, self.rerank))  # [Q R]
            found = out_index >= 0
            keys = self.exact.gather(np.where(found, out_index, 0).ravel()).reshape(*out_index.shape, -1)  # [Q R H]
            sim = np.where(found, np.einsum("qrh,qh->qr", keys, q), -np.inf)
            order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
            out_index = np.where(np.take_along_axis(found, order, 1), np.take_along_axis(out_index, order, 1), -1)
            out_sim = np.where(out_index >= 0, np.take_along_axis(sim, order, 1), 0.0).astype(np.float32)
            kept_keys = np.take_along_axis(keys, order[:, :, None], 1)  # [Q k H]
        mask = out_index >= 0
        if threshold is not None:
            mask &= out_sim >= threshold
        index = np.where(mask, out_index, 0)
        if self.exact is not None:  # neighbour_keys(index) reads nothing again (masked slots: entry 0, as it reads)
            if not mask.all():
                kept_keys[~mask] = self.exact.gather(np.zeros(1, dtype=np.int64))[0]
            self._searched = (self.exact, index.copy(), kept_keys)
        return (
            torch.from_numpy(index).to(device),
            torch.from_numpy(np.where(mask, out_sim, 0.0).astype(np.float32)).to(device),
            torch.from_numpy(mask).to(device),
        )

    def _allowed(self, q, users, positions, k):
        """FAISS's top-``k`` allowed entries of the vectors ``q`` [Q H]: ids [Q k] (-1 where fewer) and similarities."""
        n_queries, n = q.shape[0], len(self)
        entry_users, entry_positions = self.users.numpy(), self.positions.numpy()
        out_index = np.full((n_queries, k), -1, dtype=np.int64)
        out_sim = np.zeros((n_queries, k), dtype=np.float32)
        todo = np.arange(n_queries)
        n_search = min(n, 2 * k + 16)
        while len(todo):
            sim, index = self.index.search(q[todo], n_search)  # [T S]
            found = index >= 0
            safe = np.where(found, index, 0)
            leaked = (entry_users[safe] == users[todo, None]) & (entry_positions[safe] >= positions[todo, None])
            allowed = found & ~leaked  # [T S]
            order = np.argsort(~allowed, axis=1, kind="stable")[:, :k]  # allowed first, FAISS order kept
            chosen = np.take_along_axis(allowed, order, axis=1)
            out_index[todo] = np.where(chosen, np.take_along_axis(index, order, axis=1), -1)
            out_sim[todo] = np.where(chosen, np.take_along_axis(sim, order, axis=1), 0.0)
            # ask again, with more candidates, for queries left short while FAISS could still return more
            short = (allowed.sum(1) < k) & (found.sum(1) == n_search) & (n_search < n)
            todo, n_search = todo[short], min(n, 4 * n_search)
        return out_index, out_sim

    def state_dict(self):
        """Tensors and plain data that :meth:`load_state_dict` restores the memory from (None before a build)."""
        if not self.built:
            return None
        state = {
            "targets": self.targets,
            "users": self.users,
            "positions": self.positions,
            "fingerprint": self.fingerprint,
            "index_type": self.built_type,
        }
        if self.built_type == COMPRESSED:  # no float keys: the index (codes, lists, direct map) and the norms
            state["norms"] = self.norms
            if self.exact is not None:  # the file stays (beside the checkpoint) for as long as a checkpoint names it
                self.exact.pin()
                state["exact_keys"] = os.path.basename(self.exact.path)
        else:
            state["keys"] = self.keys
        if self.built_type != "flat":  # a flat index is rebuilt exactly from the keys
            state["index_bytes"] = torch.from_numpy(faiss.serialize_index(self.index))
        return state

    def load_state_dict(self, state, dim):
        """Restore a saved memory of keys of dimension ``dim``; a saved ``ivfsq8`` one comes back as it was, whatever
        ``index_type`` says now (it has no float keys to build another from), and the next refresh builds the
        configured type. Saved index bytes are checked before FAISS reads them (:func:`read_index_bytes`)."""
        if state["index_type"] != COMPRESSED:
            keys, targets, users, positions = (state[name] for name in ("keys", "targets", "users", "positions"))
            if keys.dim() != 2 or keys.size(1) != dim or not len(keys) == len(targets) == len(users) == len(positions):
                raise CheckpointError(
                    f"the saved retrieval memory does not fit this model: keys {tuple(keys.shape)} for dimension {dim}, "
                    f"{len(targets)} targets, {len(users)} users, {len(positions)} positions"
                )
            self.build(keys, targets, users, positions, state["fingerprint"], state.get("index_bytes"))
            return
        index = read_index_bytes(state["index_bytes"], COMPRESSED, state["targets"].size(0), dim)
        exact = None
        if self.rerank and state.get("exact_keys"):
            exact = ExactKeys.open(os.path.join(self._keys_folder(), state["exact_keys"]), index.ntotal, index.d)
        elif self.rerank:
            raise ValueError("the saved retrieval memory has no exact keys file to re-rank with (it was saved with rerank 0)")
        self._drop_exact()
        self.index, self.keys, self.norms, self.exact = index, None, state["norms"], exact
        self.index.nprobe = min(self.compressed_nprobe, self.index.nlist)
        self.targets, self.users, self.positions = state["targets"], state["users"], state["positions"]
        self.fingerprint, self.built_type = state["fingerprint"], COMPRESSED
