"""Aligned feature stores from precomputed files: id alignment, masks and every kind of bad input."""

import json
import logging
import os

import numpy as np
import pytest
import torch
from features_fixtures import ITEM_ONLY_TOKEN, ITEM_TOKENS, build_splits, feat_root, features_config  # noqa: F401

from recbole_ur4rec.config import Config
from recbole_ur4rec.features import FeatureError, item_image_features, read_feature_file, write_feature_file
from recbole_ur4rec.features.cache import cached_features
from recbole_ur4rec.features.files import read_text_file
from recbole_ur4rec.features.settings import cache_dir, setting


def vector(token, dim=6):
    """A distinct vector per token, so that a row given to the wrong item is caught."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(token))
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(dim)).float()


def image_store(feat_root, tmp_path, feature_file, **overrides):
    config = features_config(feat_root, tmp_path / "cache", image_feature_file=str(feature_file), **overrides)
    dataset, _ = build_splits(config)
    return dataset, item_image_features(config, dataset)


def test_rows_follow_recbole_ids_for_string_non_contiguous_tokens(feat_root, tmp_path):
    present = ITEM_TOKENS[::-1][:-3]  # reversed file order; the last three tokens get no feature
    path = tmp_path / "img.pt"
    write_feature_file(str(path), "item", present, torch.stack([vector(t) for t in present]))
    dataset, store = image_store(feat_root, tmp_path, path)

    token2id = dataset.field2token_id["item_id"]
    assert store.features.shape == (dataset.item_num, 6) and store.mask.shape == (dataset.item_num,)
    assert not store.mask[0] and torch.all(store.features[0] == 0)
    for token in ITEM_TOKENS:
        row = token2id[token]
        if token in present:
            assert store.mask[row] and torch.equal(store.features[row], vector(token))
        else:  # masked, never another item's row
            assert not store.mask[row] and torch.all(store.features[row] == 0)
    assert int(store.mask.sum()) == len(present)


def test_npy_with_token_file_loads_the_same(feat_root, tmp_path):
    features = torch.stack([vector(t) for t in ITEM_TOKENS])
    np.save(tmp_path / "img.npy", features.numpy())
    (tmp_path / "img.tokens.txt").write_text("\n".join(ITEM_TOKENS) + "\n")
    write_feature_file(str(tmp_path / "img.pt"), "item", ITEM_TOKENS, features)
    _, from_npy = image_store(feat_root, tmp_path, tmp_path / "img.npy")
    _, from_pt = image_store(feat_root, tmp_path, tmp_path / "img.pt")
    assert torch.equal(from_npy.features, from_pt.features) and torch.equal(from_npy.mask, from_pt.mask)


def test_unknown_tokens_warn_by_default_and_fail_when_strict(feat_root, tmp_path, caplog):
    tokens = ITEM_TOKENS + ["ghost-1", ITEM_ONLY_TOKEN]
    path = tmp_path / "img.pt"
    write_feature_file(str(path), "item", tokens, torch.stack([vector(t) for t in tokens]))
    with caplog.at_level(logging.WARNING):
        dataset, store = image_store(feat_root, tmp_path, path)
    assert (
        "img.pt: item_id tokens the dataset 'feat' does not have (2 row(s): row 30 ('ghost-1'), row 31 ('not-rated'))"
        in caplog.text
    )
    assert int(store.mask.sum()) == len(ITEM_TOKENS)
    with pytest.raises(FeatureError, match=r"img.pt: item_id tokens .* \(2 row\(s\).*strict_features is on"):
        image_store(feat_root, tmp_path, path, strict_features=True)


def test_no_known_token_at_all_is_an_error(feat_root, tmp_path):
    path = tmp_path / "img.pt"
    write_feature_file(str(path), "item", ["a", "b"], torch.ones(2, 6))
    with pytest.raises(FeatureError, match=r"img.pt: none of its 2 item_id tokens is in dataset 'feat'"):
        image_store(feat_root, tmp_path, path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_rows_are_named(tmp_path, bad):
    features = torch.ones(4, 3)
    features[2, 1] = bad
    path = tmp_path / "img.pt"
    write_feature_file(str(path), "item", ["a", "b", "c", "d"], features)
    with pytest.raises(FeatureError, match=r"img.pt: NaN or infinite values \(1 row\(s\): row 2 \('c'\)\)"):
        read_feature_file(str(path), "item")


def test_dimension_differing_from_the_config(feat_root, tmp_path):
    path = tmp_path / "img.pt"
    write_feature_file(str(path), "item", ITEM_TOKENS, torch.ones(len(ITEM_TOKENS), 6))
    with pytest.raises(
        FeatureError, match=r"img.pt: features have dimension 6, but config key 'image_feature_dim' is 512"
    ):
        image_store(feat_root, tmp_path, path, image_feature_dim=512)


def test_empty_unreadable_and_malformed_feature_files(tmp_path):
    empty, garbage, wrong, short = (tmp_path / n for n in ("empty.pt", "garbage.pt", "wrong.pt", "short.pt"))
    empty.write_bytes(b"")
    garbage.write_bytes(b"\x00not a torch file")
    torch.save({"tokens": ["a"], "features": torch.ones(1, 2)}, wrong)
    torch.save({"item_tokens": ["a", "b"], "features": torch.ones(3, 2)}, short)
    with pytest.raises(FeatureError, match="feature file .*empty.pt is empty"):
        read_feature_file(str(empty), "item")
    with pytest.raises(FeatureError, match="garbage.pt: corrupt or not a torch file"):
        read_feature_file(str(garbage), "item")
    with pytest.raises(FeatureError, match=r"wrong.pt: expected a dict with keys 'item_tokens' and 'features'"):
        read_feature_file(str(wrong), "item")
    with pytest.raises(FeatureError, match=r"short.pt: 3 feature rows but 2 tokens"):
        read_feature_file(str(short), "item")
    with pytest.raises(FeatureError, match="missing.pt does not exist"):
        read_feature_file(str(tmp_path / "missing.pt"), "item")


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"item_tokens": ["a"], "features": torch.ones(1, 2), "extra": FeatureError("x")}, path)
    with pytest.raises(FeatureError, match="evil.pt: corrupt or not a torch file of tensors and plain data"):
        read_feature_file(str(path), "item")


def test_duplicate_tokens_are_named(tmp_path):
    path = tmp_path / "dup.pt"
    write_feature_file(str(path), "item", ["a", "b", "a"], torch.ones(3, 2))
    with pytest.raises(
        FeatureError, match=r"dup.pt: duplicate item tokens.* row 2 \('a'\) repeats item 'a' of row 0 \('a'\)"
    ):
        read_feature_file(str(path), "item")


def test_description_files_bad_rows(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"item_id": "i7", "text": "ok"}\nnot json\n{"item_id": "i10"}\n')
    with pytest.raises(
        FeatureError, match=r"d.jsonl: lines that are not JSON objects .* \(2 row\(s\): line 2, line 3\)"
    ):
        read_text_file(str(jsonl), "item_id")
    tsv = tmp_path / "d.tsv"
    tsv.write_text("item_id:token\ttext:token_seq\ni7\tfine\ni10\t \n")
    with pytest.raises(FeatureError, match=r"d.tsv: empty text \(1 row\(s\): line 3\)"):
        read_text_file(str(tsv), "item_id")
    tsv.write_text("item_id:token\tdescription:token_seq\ni7\tfine\n")
    with pytest.raises(FeatureError, match=r"d.tsv: header must be 'item_id:token\\ttext:token_seq'"):
        read_text_file(str(tsv), "item_id")
    binary = tmp_path / "b.tsv"
    binary.write_bytes(b"item_id:token\ttext:token_seq\n\xff\xfe\x00\n")
    with pytest.raises(FeatureError, match="b.tsv: unreadable as a UTF-8 text file"):
        read_text_file(str(binary), "item_id")
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(FeatureError, match="e.jsonl is empty"):
        read_text_file(str(tmp_path / "e.jsonl"), "item_id")


def test_cache_rebuilds_on_a_changed_key_and_on_corruption(tmp_path, caplog):
    calls = []

    def compute():
        calls.append(1)
        return ["a", "b"], torch.eye(2), {}

    def load(encoder):
        return cached_features(str(tmp_path), "d", "item_text", "item", {"encoder": encoder, "text_hash": "h"}, compute)

    tokens, features, manifest = load("enc-a")
    assert manifest["dim"] == 2 and manifest["count"] == 2 and manifest["encoder"] == "enc-a"
    load("enc-a")
    assert len(calls) == 1  # hit
    load("enc-b")
    assert len(calls) == 2  # a changed encoder rebuilds

    (tmp_path / "d.item_text.pt").write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING):
        tokens, features, _ = load("enc-b")
    assert len(calls) == 3 and "feature cache is corrupt, rebuilding it" in caplog.text
    assert tokens == ["a", "b"] and torch.equal(features, torch.eye(2))

    (tmp_path / "d.item_text.manifest.json").write_text("{broken")
    load("enc-b")
    assert len(calls) == 4 and "manifest" in caplog.text and "is corrupt" in caplog.text

    manifest = json.loads((tmp_path / "d.item_text.manifest.json").read_text())
    (tmp_path / "d.item_text.manifest.json").write_text(json.dumps({**manifest, "count": 5}))
    load("enc-b")
    assert len(calls) == 5 and "its manifest says 5 x 2" in caplog.text


def test_default_cache_folder_and_setting_checks(feat_root):
    config = Config(model="SASRec", dataset="feat", config_dict={"data_path": feat_root, "state": "WARNING"})
    assert cache_dir(config) == os.path.join(feat_root, "feat")
    ml_100k = Config(model="SASRec", dataset="ml-100k", config_dict={"state": "WARNING", "text_encoder_batch_size": 0})
    assert cache_dir(ml_100k) == os.path.abspath(os.path.join("dataset", "ml-100k"))  # never inside the recbole wheel
    with pytest.raises(FeatureError, match=r"config key 'text_encoder_batch_size' must be an integer >= 1, got 0"):
        setting(ml_100k, "text_encoder_batch_size")
