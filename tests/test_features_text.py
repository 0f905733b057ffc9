"""Item and user text stores with the real sentence encoder: texts, alignment, the no-leak rule, caches, CLI."""

import logging
import shutil
import sys

import pytest
import torch
from features_fixtures import (  # noqa: F401
    ITEM_TOKENS,
    build_splits,
    encoder,
    feat_root,
    features_config,
    title,
)

from recbole_ur4rec.apps.precompute_features import main
from recbole_ur4rec.features import FeatureError, item_text_features, user_text_features
from recbole_ur4rec.features.item_text import format_item_texts, item_texts
from recbole_ur4rec.features.pipeline import user_texts_of


def test_item_text_from_the_item_file_template(feat_root, tmp_path, encoder, caplog):
    config = features_config(feat_root, tmp_path / "cache")
    dataset, _ = build_splits(config)
    _, tokens, texts, _ = item_texts(config)
    assert texts[0] == f"{title(ITEM_TOKENS[0])} (1990). Genres: Drama, Comedy."

    with caplog.at_level(logging.WARNING):
        store = item_text_features(config, dataset, encoder)
    assert f"item_id tokens the dataset 'feat' does not have (1 row(s): line {len(ITEM_TOKENS) + 1})" in caplog.text
    token2id = dataset.field2token_id["item_id"]
    assert store.features.shape == (dataset.item_num, 384) and store.features.dtype == torch.float32
    assert not store.mask[0] and not store.mask[token2id[ITEM_TOKENS[-1]]]  # padding; an item without a .item row
    assert int(store.mask.sum()) == len(ITEM_TOKENS) - 1
    assert torch.allclose(store.features[store.mask].norm(dim=1), torch.ones(len(ITEM_TOKENS) - 1), atol=1e-5)
    assert torch.all(store.features[~store.mask] == 0)
    k = 5
    expected = encoder.encode([texts[k]])[0]
    assert torch.allclose(store.features[token2id[tokens[k]]], expected, atol=1e-5)


@pytest.mark.parametrize("suffix", ["jsonl", "tsv"])
def test_item_description_file(feat_root, tmp_path, encoder, suffix):
    described = {ITEM_TOKENS[3]: "A slow drama about a lighthouse.", ITEM_TOKENS[8]: "Robots fight in space."}
    path = tmp_path / f"descriptions.{suffix}"
    if suffix == "jsonl":
        path.write_text("".join(f'{{"item_id": "{t}", "text": "{d}"}}\n' for t, d in described.items()))
    else:
        path.write_text("item_id:token\ttext:token_seq\n" + "".join(f"{t}\t{d}\n" for t, d in described.items()))
    config = features_config(feat_root, tmp_path / "cache", item_text_file=str(path))
    dataset, _ = build_splits(config)
    store = item_text_features(config, dataset, encoder)
    token2id = dataset.field2token_id["item_id"]
    assert int(store.mask.sum()) == 2
    for token, text in described.items():
        assert torch.allclose(store.features[token2id[token]], encoder.encode([text])[0], atol=1e-5)


def test_user_text_never_contains_a_validation_or_test_item(feat_root, tmp_path, encoder):
    config = features_config(feat_root, tmp_path / "cache", user_text_recent_items=1000, MAX_ITEM_LIST_LENGTH=3)
    dataset, (train, valid, test) = build_splits(config)
    _, tokens, texts, _ = user_texts_of(config, train)
    text_of = dict(zip(tokens, texts))
    item_token, user_token = dataset.field2id_token["item_id"], dataset.field2id_token["user_id"]

    held_out = {}
    for split in (valid, test):
        for user, item in zip(split.inter_feat["user_id"].tolist(), split.inter_feat["item_id"].tolist()):
            held_out.setdefault(user_token[user], []).append(item_token[item])
    assert len(held_out) == len(text_of) == 25 and all(len(items) == 2 for items in held_out.values())
    for user, items in held_out.items():
        for item in items:
            assert title(item) not in text_of[user] and item not in text_of[user].split("; ")

    # and every training item is there: the history is whole, not cut to MAX_ITEM_LIST_LENGTH or to its targets
    u0 = text_of["u0"]
    assert (
        u0.startswith("Favourite genres: ") and "Rating habits: 7 ratings, average 2.57 on a 1-5 scale, 29% high" in u0
    )
    assert all(title(token) in u0 for token in ITEM_TOKENS[:7])

    store = user_text_features(config, train, encoder)
    assert store.features.shape == (dataset.user_num, 384) and int(store.mask.sum()) == 25 and not store.mask[0]
    row = dataset.field2token_id["user_id"]["u3"]
    assert torch.allclose(store.features[row], encoder.encode([text_of["u3"]])[0], atol=1e-5)


def test_user_text_file(feat_root, tmp_path, encoder):
    path = tmp_path / "users.jsonl"
    path.write_text('{"user_id": "u1", "text": "Loves horror."}\n{"user_id": "u9", "text": "Mostly comedies."}\n')
    config = features_config(feat_root, tmp_path / "cache", user_text_file=str(path))
    dataset, (train, _, _) = build_splits(config)
    store = user_text_features(config, train, encoder)
    assert int(store.mask.sum()) == 2 and store.mask[dataset.field2token_id["user_id"]["u9"]]


def test_cache_hits_then_rebuilds_on_changed_text_or_corruption(feat_root, tmp_path, encoder, monkeypatch, caplog):
    calls = []
    real_encode = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda texts: calls.append(len(texts)) or real_encode(texts))
    config = features_config(feat_root, tmp_path / "cache")
    dataset, _ = build_splits(config)

    first = item_text_features(config, dataset, encoder)
    second = item_text_features(config, dataset, encoder)
    assert len(calls) == 1 and torch.equal(first.features, second.features) and torch.equal(first.mask, second.mask)
    assert second.manifest["text_hash"] == first.manifest["text_hash"] and second.manifest["dim"] == 384

    changed = features_config(feat_root, tmp_path / "cache", item_text_template="{movie_title}")
    assert not torch.allclose(item_text_features(changed, dataset, encoder).features, first.features)
    assert len(calls) == 2

    (tmp_path / "cache" / "feat.item_text.pt").write_bytes(b"\x80\x02garbage")
    with caplog.at_level(logging.WARNING):
        rebuilt = item_text_features(changed, dataset, encoder)
    assert len(calls) == 3 and "feature cache is corrupt, rebuilding it" in caplog.text
    assert torch.allclose(rebuilt.features, item_text_features(changed, dataset, encoder).features)
    assert len(calls) == 3


def test_a_moved_dataset_folder_keeps_its_cache(feat_root, tmp_path, encoder, monkeypatch):
    """The cache is keyed by the texts and the encoder's weights, not by where the files are."""
    config = features_config(feat_root, tmp_path / "cache")
    first = item_text_features(config, build_splits(config)[0], encoder)
    moved_root = tmp_path / "moved"
    shutil.copytree(feat_root, moved_root)
    moved = features_config(str(moved_root), tmp_path / "cache")
    monkeypatch.setattr(encoder, "encode", lambda texts: pytest.fail("the cache was rebuilt"))
    assert torch.equal(item_text_features(moved, build_splits(moved)[0], encoder).features, first.features)


def test_encoder_dimension_differing_from_the_config(feat_root, tmp_path, encoder):
    config = features_config(feat_root, tmp_path / "cache", text_feature_dim=128)
    dataset, _ = build_splits(config)
    with pytest.raises(FeatureError, match=r"features have dimension 384, but config key 'text_feature_dim' is 128"):
        item_text_features(config, dataset, encoder)


def test_bad_template_and_encoder_path(feat_root, tmp_path, encoder):
    config = features_config(feat_root, tmp_path / "cache", item_text_template="{movie_title} by {director}")
    dataset, _ = build_splits(config)
    with pytest.raises(FeatureError, match=r"names field\(s\) \['director'\] that .*feat.item does not have"):
        item_text_features(config, dataset, encoder)
    config = features_config(feat_root, tmp_path / "cache", text_encoder=str(tmp_path / "no-model"))
    with pytest.raises(FeatureError, match=r"no-model is not a local folder: .*never downloads models"):
        item_text_features(config, dataset)


def test_command_builds_then_hits_the_cache(feat_root, tmp_path, monkeypatch, capsys, caplog, encoder):
    encoder.model  # the command's encoder shares this loaded model
    argv = [
        "-d",
        "feat",
        f"--data_path={feat_root}",
        f"--feature_cache_dir={tmp_path / 'cache'}",
        "--show_progress=False",
        "--load_col={'inter': ['user_id', 'item_id', 'rating', 'timestamp']}",
    ]
    monkeypatch.setattr(sys, "argv", ["pytest", "--data_path=/nonexistent"])  # main(argv) never reads sys.argv
    stores = main(argv)
    out = capsys.readouterr().out
    assert "item_text: 29/30 item_ids with a feature, dim 384" in out
    assert "user_text: 25/25 user_ids with a feature, dim 384" in out and "item_image" not in stores
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "feat.item_text.manifest.json",
        "feat.item_text.pt",
        "feat.user_text.manifest.json",
        "feat.user_text.pt",
    ]
    with caplog.at_level(logging.INFO):
        again = main(argv)
    assert caplog.text.count("feature cache hit") == 2
    assert torch.equal(again["user_text"].features, stores["user_text"].features)


def test_features_command_builds_only_the_stores_of_the_model(feat_root, tmp_path, monkeypatch, capsys, encoder):
    encoder.model  # the command's encoder shares this loaded model
    argv = [
        "-d", "feat", "-m", "FedDMMR", f"--data_path={feat_root}", f"--feature_cache_dir={tmp_path / 'cache'}",
        "--show_progress=False", "--load_col={'inter': ['user_id', 'item_id', 'rating', 'timestamp']}",
    ]
    monkeypatch.setattr(sys, "argv", ["pytest", "--data_path=/nonexistent"])  # main(argv) never reads sys.argv
    stores = main(argv)
    assert sorted(stores) == ["item_text"]  # FedDMMR's experts read item features only: no user text is encoded
    assert "user_text" not in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["feat.item_text.manifest.json", "feat.item_text.pt"]


def test_user_text_refuses_rows_it_cannot_read_as_interactions(feat_root, tmp_path):
    from recbole.data.interaction import Interaction

    config = features_config(feat_root, tmp_path / "cache")
    _, (train, _, _) = build_splits(config)
    fields = ["user_id", "item_id_list", "item_length", "item_id"]  # e.g. whole-sequence rows: no time field
    rows = train.copy(Interaction({field: train.inter_feat[field] for field in fields}))
    with pytest.raises(FeatureError, match=r"user text needs RecBole's training split of 'feat'"):
        user_texts_of(config, rows)


def test_optional_template_segments_are_left_out_where_a_field_is_empty():
    fields = ["item_id", "title", "brand", "categories"]
    rows = [
        {"item_id": "1", "title": "Nail Lacquer", "brand": "OPI", "categories": ["Makeup", "Nails"]},
        {"item_id": "2", "title": "Palette [15 colours]", "brand": "", "categories": ["Makeup"]},
        {"item_id": "3", "title": "Clips", "brand": "Oyang", "categories": []},
    ]
    template = "{title}.[ Brand: {brand}.][ Categories: {categories:, }.] [[new]]"
    tokens, texts = format_item_texts(template, fields, rows, "x.item", "item_id")
    assert tokens == ["1", "2", "3"]
    assert texts == [
        "Nail Lacquer. Brand: OPI. Categories: Makeup, Nails. [new]",
        "Palette [15 colours]. Categories: Makeup. [new]",  # brackets in a value are text
        "Clips. Brand: Oyang. [new]",
    ]
    for bad in ("{title}[ Brand: {brand}.", "{title}] x", "{title}[ a [ {brand} ] ]"):
        with pytest.raises(FeatureError, match=r"item_text_template .*'\[\.\.\.\]'|without its"):
            format_item_texts(bad, fields, rows, "x.item", "item_id")
    with pytest.raises(FeatureError, match=r"names field\(s\) \['colour'\]"):
        format_item_texts("{title}[ {colour}]", fields, rows, "x.item", "item_id")
