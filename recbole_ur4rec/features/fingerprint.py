"""Fingerprints that tell caches when an input changed: of files by their contents, of texts by their hash."""

import hashlib
import json
import os


def pairs_hash(keys, values):
    """sha256 of the (key, value) string pairs, independent of their order."""
    pairs = sorted(zip(keys, values))
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode("utf-8")).hexdigest()


_CONTENT_DIGESTS = {}  # (path, names, sizes and modification times) -> digest: each file set is read once a process


def files_fingerprint(path):
    """sha256 over the relative names and the contents of ``path`` (a file, or a folder tree without its hidden files
    and folders): the same for a copy anywhere else (another install, folder or machine), so caches keyed by it move
    with their inputs. Read once a process (about a second a GB)."""
    path = os.path.realpath(path)
    if os.path.isfile(path):
        entries = [(os.path.basename(path), path)]
    else:
        entries = []
        for root, folders, names in os.walk(path):
            folders[:] = [f for f in folders if not f.startswith(".")]  # e.g. a download tool's .cache/ metadata
            kept = [name for name in names if not name.startswith(".")]
            entries += [(os.path.relpath(os.path.join(root, name), path), os.path.join(root, name)) for name in kept]
        entries.sort()
    stats = [os.stat(full) for _, full in entries]
    memo_key = (path, tuple((name, stat.st_size, stat.st_mtime_ns) for (name, _), stat in zip(entries, stats)))
    if memo_key not in _CONTENT_DIGESTS:
        digest = hashlib.sha256()
        for (name, full), stat in zip(entries, stats):
            digest.update(f"{name}\0{stat.st_size}\0".encode("utf-8"))
            with open(full, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        _CONTENT_DIGESTS[memo_key] = digest.hexdigest()
    return _CONTENT_DIGESTS[memo_key]


STORE_FINGERPRINT_KEYS = ("modality", "text_hash", "poster_hash", "count", "dim")


def stores_fingerprint(stores):
    """A short hash of what feature stores hold (``{name: AlignedFeatures}``: texts' hashes, sizes), independent of
    where files live; a model checkpoint records it and refuses to load on other features."""
    manifests = {
        name: {key: store.manifest.get(key) for key in STORE_FINGERPRINT_KEYS} | {"shape": list(store.features.shape)}
        for name, store in sorted(stores.items())
    }
    return hashlib.sha1(json.dumps(manifests, sort_keys=True, default=str).encode()).hexdigest()[:16]
