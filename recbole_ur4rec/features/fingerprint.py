"""Fingerprints that tell caches when an input changed without reading it whole."""

import hashlib
import json
import os


def pairs_hash(keys, values):
    """sha256 of the (key, value) string pairs, independent of their order."""
    pairs = sorted(zip(keys, values))
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode("utf-8")).hexdigest()


def files_fingerprint(path):
    """sha256 over the relative names, sizes and modification times of ``path`` (a file or a folder tree)."""
    path = os.path.realpath(path)
    if os.path.isfile(path):
        entries = [(os.path.basename(path), path)]
    else:
        entries = [
            (os.path.relpath(os.path.join(root, name), path), os.path.join(root, name))
            for root, _, names in os.walk(path)
            for name in names
        ]
    digest = hashlib.sha256()
    for name, full in sorted(entries):
        stat = os.stat(full)
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8"))
    return digest.hexdigest()


STORE_FINGERPRINT_KEYS = ("modality", "text_hash", "poster_hash", "count", "dim")


def stores_fingerprint(stores):
    """A short hash of what feature stores hold (``{name: AlignedFeatures}``: texts' hashes, sizes), independent of
    where files live; a model checkpoint records it and refuses to load on other features."""
    manifests = {
        name: {key: store.manifest.get(key) for key in STORE_FINGERPRINT_KEYS} | {"shape": list(store.features.shape)}
        for name, store in sorted(stores.items())
    }
    return hashlib.sha1(json.dumps(manifests, sort_keys=True, default=str).encode()).hexdigest()[:16]
