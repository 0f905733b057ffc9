"""The API models call: aligned item-text, user-text and item-image stores for a RecBole training split.

    train_data, valid_data, test_data = data_preparation(config, dataset)
    stores = load_features(config, train_data._dataset)   # {'item_text': AlignedFeatures, 'user_text': ..., ...}
    stores["item_text"].features  # [n_items, d], row 0 = padding;  stores["item_text"].mask  # [n_items] bool

Every store is cached under :func:`~recbole_ur4rec.features.settings.cache_dir` and rebuilt when its inputs change.
"""

import os
from logging import getLogger

from recbole_ur4rec.common import distributed
from recbole_ur4rec.features.cache import cached_features
from recbole_ur4rec.features.clip import clip_encoder, clip_identity, encode_posters, find_posters
from recbole_ur4rec.features.encoder import TextEncoder
from recbole_ur4rec.features.errors import FeatureError
from recbole_ur4rec.features.files import read_feature_file, read_text_file, rows_message
from recbole_ur4rec.features.fingerprint import files_fingerprint, pairs_hash
from recbole_ur4rec.features.item_text import item_texts, item_titles_and_genres
from recbole_ur4rec.features.llm import LLMWriter
from recbole_ur4rec.features.settings import cache_dir, setting
from recbole_ur4rec.features.store import align, check_dimension, match_tokens
from recbole_ur4rec.features.user_text import user_texts

USER_TEXT_VERSION = "user_text/1"


def text_encoder(config):
    """The sentence encoder of ``config`` (``text_encoder``, ``text_encoder_batch_size``); loaded on first use."""
    return TextEncoder(
        setting(config, "text_encoder"),
        batch_size=setting(config, "text_encoder_batch_size"),
        show_progress=bool(config["show_progress"]),
    )


def llm_writer(config):
    """The LLM writer of ``llm_path``, or None (template texts)."""
    path = setting(config, "llm_path")
    if path is None:
        return None
    return LLMWriter(
        path, os.path.join(cache_dir(config), f"{config['dataset']}.llm.jsonl"),
        max_new_tokens=setting(config, "llm_max_new_tokens"), batch_size=setting(config, "llm_batch_size"),
        max_chars=setting(config, "llm_max_chars"), show_progress=bool(config["show_progress"]),
        chat_template=setting(config, "llm_chat_template"), dtype=setting(config, "llm_dtype"),
        prompts={kind: prompt for kind in ("item", "user") if (prompt := setting(config, f"llm_{kind}_prompt")) is not None},
    )


def _llm_texts(config, kind, source, tokens, texts):
    """(source, texts): rewritten by the LLM of ``llm_path`` from the template texts, or unchanged."""
    writer = llm_writer(config)
    if writer is None:
        return source, texts
    texts, _ = writer.write(kind, tokens, texts)
    return f"{source} + {writer.source(kind)}", texts


def _known_rows(config, dataset, field, source, tokens, where):
    """Positions and ids of the rows whose token ``dataset`` has; no such row at all is an error."""
    positions, ids = match_tokens(source, tokens, where, dataset, field, setting(config, "strict_features"))
    if not positions:
        raise FeatureError(f"{source}: none of its {len(tokens)} {field} tokens is in dataset {config['dataset']!r}")
    return positions, ids


def _align_cached(dataset, field, tokens, ids, cached_tokens, features, manifest):
    """Align cached features (keyed by ``cached_tokens``, the same tokens as ``tokens`` in any order) to ``ids``."""
    id_of = dict(zip(tokens, ids.tolist()))
    return align([id_of[token] for token in cached_tokens], features, dataset.num(field), field, manifest)


def _text_store(config, dataset, kind, source, tokens, texts, where, encoder):
    modality, field = f"{kind}_text", dataset.iid_field if kind == "item" else dataset.uid_field
    positions, ids = _known_rows(config, dataset, field, source, tokens, where)
    tokens, texts = [tokens[p] for p in positions], [texts[p] for p in positions]
    encoder = encoder or text_encoder(config)
    # the key is what the features depend on (the encoder's weights, the texts); where they came from is information
    key = {"modality": modality, "encoder": encoder.identity, "text_hash": pairs_hash(tokens, texts)}
    cached_tokens, features, manifest = cached_features(
        cache_dir(config), config["dataset"], modality, kind, key, lambda: (tokens, encoder.encode(texts), {"source": source})
    )
    check_dimension(source, features.shape[1], setting(config, "text_feature_dim"), "text_feature_dim")
    return _align_cached(dataset, field, tokens, ids, cached_tokens, features, manifest)


def item_text_features(config, dataset, encoder=None):
    """Item-text embeddings ``[n_items, d]`` + mask, from ``item_text_file`` or the ``.item`` template.

    Args:
        dataset: a RecBole dataset of ``config`` (any split: item ids are shared).
        encoder (TextEncoder): reuse a loaded encoder; None builds one from ``config``.
    """
    source, tokens, texts, where = item_texts(config)
    if setting(config, "item_text_file") is None:  # descriptions given in a file are used as they are
        source, texts = _llm_texts(config, "item", source, tokens, texts)
    return _text_store(config, dataset, "item", source, tokens, texts, where, encoder)


def user_texts_of(config, train_dataset):
    """User preference texts as ``(source, tokens, texts, where)``: from ``user_text_file``, else written from
    the interactions of ``train_dataset`` (the training split) and the titles and genres of the ``.item`` file.
    """
    text_file = setting(config, "user_text_file")
    if text_file is not None:
        text_file = os.path.abspath(text_file)
        sep = dict(field_separator=config["field_separator"], seq_separator=config["seq_separator"])
        return (text_file, *read_text_file(text_file, config["USER_ID_FIELD"], **sep))
    titles, genres = item_titles_and_genres(config)
    top_genres, recent_items = setting(config, "user_text_top_genres"), setting(config, "user_text_recent_items")
    tokens, texts = user_texts(train_dataset, titles, genres, top_genres, recent_items)
    source, texts = _llm_texts(config, "user", f"{USER_TEXT_VERSION}: training split of {config['dataset']}", tokens, texts)
    return source, tokens, texts, [f"user {t}" for t in tokens]


def user_text_features(config, train_dataset, encoder=None):
    """User-preference-text embeddings ``[n_users, d]`` + mask; ``train_dataset`` must be the training split."""
    source, tokens, texts, where = user_texts_of(config, train_dataset)
    return _text_store(config, train_dataset, "user", source, tokens, texts, where, encoder)


def item_image_features(config, dataset):
    """Item image embeddings ``[n_items, d]`` + mask from ``image_feature_file`` (precomputed, ``.pt``/``.npy``),
    or extracted with CLIP from ``poster_dir`` (cached); None when neither is set.
    """
    if setting(config, "image_feature_file") is not None:
        return _image_file_store(config, dataset, os.path.abspath(setting(config, "image_feature_file")))
    if setting(config, "poster_dir") is not None:
        return _poster_store(config, dataset, os.path.abspath(setting(config, "poster_dir")))
    return None


def _image_file_store(config, dataset, source):
    tokens, features = read_feature_file(source, "item")
    where = [f"row {i} ({token!r})" for i, token in enumerate(tokens)]
    positions, ids = _known_rows(config, dataset, dataset.iid_field, source, tokens, where)
    check_dimension(source, features.shape[1], setting(config, "image_feature_dim"), "image_feature_dim")
    manifest = {"source": source, "dim": features.shape[1]}
    return align(ids, features[positions], dataset.item_num, dataset.iid_field, manifest)


def _poster_store(config, dataset, source):
    posters = find_posters(source)
    tokens = list(posters)
    where = [os.path.basename(posters[token]) for token in tokens]
    positions, ids = _known_rows(config, dataset, dataset.iid_field, source, tokens, where)
    posters = {tokens[p]: posters[tokens[p]] for p in positions}
    backend, model, checkpoint = (setting(config, key) for key in ("clip_backend", "clip_model", "clip_checkpoint"))
    key = {
        "modality": "item_image",
        "encoder": clip_identity(backend, model, checkpoint),
        "poster_hash": pairs_hash(list(posters), [files_fingerprint(path) for path in posters.values()]),
    }

    def compute():
        encoder = clip_encoder(backend, model, checkpoint)
        batch_size, show_progress = setting(config, "clip_batch_size"), bool(config["show_progress"])
        tokens, features, undecodable = encode_posters(posters, encoder, batch_size, show_progress)
        return tokens, features, {"source": source, "undecodable": undecodable}

    folder = cache_dir(config)
    cached_tokens, features, manifest = cached_features(folder, config["dataset"], "item_image", "item", key, compute)
    if manifest.get("undecodable"):
        message = rows_message(source, "posters that cannot be decoded were skipped", manifest["undecodable"])
        getLogger().warning(message)
    check_dimension(source, features.shape[1], setting(config, "image_feature_dim"), "image_feature_dim")
    return _align_cached(dataset, dataset.iid_field, list(posters), ids, cached_tokens, features, manifest)


def load_features(config, train_dataset, encoder=None):
    """Every configured store: ``item_text`` and ``user_text`` always, ``item_image`` when set. In a distributed run
    rank 0 encodes (and caches) them first, then the other ranks read the cache (one encoding per machine at most).

    Returns:
        dict: modality name -> :class:`~recbole_ur4rec.features.store.AlignedFeatures`.
    """
    with distributed.first_on_each_machine(config["local_rank"]):
        encoder = encoder or text_encoder(config)
        stores = {
            "item_text": item_text_features(config, train_dataset, encoder),
            "user_text": user_text_features(config, train_dataset, encoder),
        }
        image = item_image_features(config, train_dataset)
        if image is not None:
            stores["item_image"] = image
    return stores
