"""Multimodal features for the plugin's models: item and user text, offline sentence encoding, CLIP image
features, aligned to RecBole's ids and cached. Build them ahead with ``python -m recbole_ur4rec.apps.precompute_features``.
"""

from recbole_ur4rec.features.encoder import TextEncoder
from recbole_ur4rec.features.errors import FeatureError
from recbole_ur4rec.features.files import read_feature_file, write_feature_file
from recbole_ur4rec.features.fingerprint import stores_fingerprint
from recbole_ur4rec.features.pipeline import (
    item_image_features,
    item_text_features,
    load_features,
    text_encoder,
    user_text_features,
)
from recbole_ur4rec.features.store import AlignedFeatures

__all__ = [
    "AlignedFeatures",
    "FeatureError",
    "TextEncoder",
    "item_image_features",
    "item_text_features",
    "load_features",
    "read_feature_file",
    "stores_fingerprint",
    "text_encoder",
    "user_text_features",
    "write_feature_file",
]
