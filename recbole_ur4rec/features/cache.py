"""Feature caches: a feature file (``.pt``, the format of :func:`read_feature_file`) and a JSON manifest beside
it. A cache is used when its manifest matches the inputs (encoder, input hash: never where a file lives); otherwise, or when
either file is corrupt, the features are computed again and the cache rewritten.
"""

import json
import os
from logging import getLogger

from recbole_ur4rec.features.errors import FeatureError
from recbole_ur4rec.features.files import read_feature_file, write_feature_file

CACHE_FORMAT = "recbole_ur4rec.features/1"


def cache_paths(folder, dataset_name, modality):
    """``(<folder>/<dataset>.<modality>.pt, <folder>/<dataset>.<modality>.manifest.json)``."""
    stem = os.path.join(folder, f"{dataset_name}.{modality}")
    return stem + ".pt", stem + ".manifest.json"


def _read_manifest(path):
    with open(path, "r", encoding="utf-8") as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict):
        raise ValueError("not a JSON object")
    return manifest


def _load(feature_path, manifest_path, key, kind):
    """Cached ``(tokens, features, manifest)`` when the cache matches ``key``, else None (with the reason logged)."""
    logger = getLogger()
    if not os.path.exists(manifest_path):
        return None
    try:
        manifest = _read_manifest(manifest_path)
    except (OSError, ValueError) as err:
        logger.warning(f"feature cache manifest {manifest_path} is corrupt ({err}): rebuilding the cache")
        return None
    changed = [name for name, value in key.items() if manifest.get(name) != value]
    if changed:
        logger.info(f"feature cache {feature_path}: {', '.join(changed)} changed, rebuilding")
        return None
    try:
        tokens, features = read_feature_file(feature_path, kind)
    except FeatureError as err:
        logger.warning(f"feature cache is corrupt, rebuilding it: {err}")
        return None
    if features.shape != (manifest.get("count"), manifest.get("dim")):
        logger.warning(
            f"feature cache {feature_path} is corrupt: it holds {tuple(features.shape)} features, its manifest says "
            f"{manifest.get('count')} x {manifest.get('dim')}; rebuilding it"
        )
        return None
    return tokens, features, manifest


def cached_features(folder, dataset_name, modality, kind, key, compute):
    """Features of one modality from the cache, or from ``compute()`` (then cached).

    Args:
        folder (str): cache folder.
        modality (str): e.g. ``'item_text'``; names the files.
        kind (str): ``'item'`` or ``'user'``.
        key (dict): what the features depend on (JSON values); a cache whose manifest differs is rebuilt.
        compute (callable): returns ``(tokens, features, extra)`` with ``extra`` a dict added to the manifest.

    Returns:
        tuple: (tokens, features, manifest).
    """
    key = {"format": CACHE_FORMAT, **key}
    feature_path, manifest_path = cache_paths(folder, dataset_name, modality)
    cached = _load(feature_path, manifest_path, key, kind)
    if cached is not None:
        getLogger().info(f"feature cache hit: {feature_path}")
        return cached
    tokens, features, extra = compute()
    manifest = {**key, **extra, "count": features.shape[0], "dim": features.shape[1]}
    write_feature_file(feature_path, kind, tokens, features)
    tmp_path = f"{manifest_path}.tmp{os.getpid()}"
    with open(tmp_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
    os.replace(tmp_path, manifest_path)
    getLogger().info(f"feature cache written: {feature_path}")
    return tokens, features, manifest
