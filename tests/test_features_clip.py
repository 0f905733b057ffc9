"""CLIP image features from generated posters with randomly initialised models: transformers' CLIPModel (default
install) and open_clip (where requirements-clip.txt is installed)."""
import json
import logging
import os

import pytest
import torch
from features_fixtures import ITEM_TOKENS, build_splits, feat_root, features_config  # noqa: F401
from PIL import Image

from recbole_ur4rec.features import FeatureError, item_image_features, read_feature_file
from recbole_ur4rec.features.clip import OpenClip

IMAGE_SIZE = 32


def write_posters(folder, tokens):
    """One generated poster per token (a colour per token), a poster that cannot be decoded (named after a real
    item), a poster for an unknown item and a file that is not an image."""
    folder.mkdir()
    for k, token in enumerate(tokens):
        Image.new("RGB", (40 + k, 50), color=(9 * k % 256, 40, 200 - 5 * k)).save(
            folder / f"{token}.{'png' if k % 2 else 'jpg'}"
        )
    (folder / f"{ITEM_TOKENS[-1]}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    Image.new("RGB", (40, 40)).save(folder / "unknown-item.png")
    (folder / "notes.txt").write_text("not a poster")
    return folder


@pytest.fixture
def hf_clip(tmp_path):
    """A randomly initialised, tiny transformers CLIP saved as a local Hugging Face folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=8,
        ),
        projection_dim=12,
    )
    folder = tmp_path / "tiny-clip"
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(folder)
    return folder


def test_transformers_clip_posters(feat_root, tmp_path, hf_clip, caplog):
    from transformers import CLIPImageProcessor, CLIPModel

    posters = write_posters(tmp_path / "posters", ITEM_TOKENS[:6])
    config = features_config(
        feat_root, tmp_path / "cache", poster_dir=str(posters), clip_model=str(hf_clip), clip_batch_size=4
    )
    dataset, _ = build_splits(config)
    with caplog.at_level(logging.WARNING):
        store = item_image_features(config, dataset)
    assert "unknown-item.png" in caplog.text and "does not have (1 row(s)" in caplog.text
    assert f"posters that cannot be decoded were skipped (1 row(s): {posters / ITEM_TOKENS[-1]}.jpg)" in caplog.text

    token2id = dataset.field2token_id["item_id"]
    assert store.features.shape == (dataset.item_num, 12)
    assert sorted(store.mask.nonzero().flatten().tolist()) == sorted(token2id[t] for t in ITEM_TOKENS[:6])
    assert torch.allclose(store.features[store.mask].norm(dim=1), torch.ones(6), atol=1e-5)
    assert store.manifest["undecodable"] == [str(posters / f"{ITEM_TOKENS[-1]}.jpg")]

    model, processor = CLIPModel.from_pretrained(hf_clip).eval(), CLIPImageProcessor.from_pretrained(hf_clip)
    with Image.open(posters / f"{ITEM_TOKENS[3]}.png") as image:
        pixels = processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        output = model.get_image_features(pixel_values=pixels)
    expected = torch.nn.functional.normalize(output if torch.is_tensor(output) else output.pooler_output, dim=-1)[0]
    assert torch.allclose(store.features[token2id[ITEM_TOKENS[3]]], expected, atol=1e-5)

    # the written cache is a feature file models can load as image_feature_file; a second run reads it
    tokens, features = read_feature_file(str(tmp_path / "cache" / "feat.item_image.pt"), "item")
    assert sorted(tokens) == sorted(ITEM_TOKENS[:6])
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = item_image_features(config, dataset)
    assert "feature cache hit" in caplog.text and torch.equal(again.features, store.features)
    from_file = item_image_features(
        features_config(
            feat_root, tmp_path / "cache", image_feature_file=str(tmp_path / "cache" / "feat.item_image.pt")
        ),
        dataset,
    )
    assert torch.equal(from_file.features, store.features) and torch.equal(from_file.mask, store.mask)


def test_clip_settings_errors(feat_root, tmp_path, hf_clip):
    posters = write_posters(tmp_path / "posters", ITEM_TOKENS[:2])
    dataset, _ = build_splits(features_config(feat_root, tmp_path / "cache"))
    missing = features_config(feat_root, tmp_path / "cache", poster_dir=str(posters))
    with pytest.raises(FeatureError, match="clip_model is not set"):
        item_image_features(missing, dataset)
    not_a_folder = features_config(
        feat_root, tmp_path / "cache", poster_dir=str(posters), clip_model=str(tmp_path / "nope")
    )
    with pytest.raises(FeatureError, match="nope is not a local Hugging Face CLIP folder"):
        item_image_features(not_a_folder, dataset)
    no_posters = features_config(
        feat_root, tmp_path / "cache", poster_dir=str(tmp_path / "cache"), clip_model=str(hf_clip)
    )
    with pytest.raises(FeatureError, match="is not a folder|holds no image"):
        item_image_features(no_posters, dataset)
    with pytest.raises(FeatureError, match="config key 'clip_backend' must be one of"):
        item_image_features(
            features_config(feat_root, tmp_path / "cache", poster_dir=str(posters), clip_backend="tf"), dataset
        )


def open_clip_or_skip():
    try:
        import open_clip
    except ImportError:
        if os.environ.get("UR4REC_REQUIRE_OPEN_CLIP") == "1":  # CI's clip environment must really run it
            raise
        pytest.skip("open_clip is not installed here (requirements-clip.txt, see README)")
    return open_clip


def test_open_clip_missing_says_how_to_install(tmp_path):
    try:
        import open_clip  # noqa: F401
    except ImportError:
        with pytest.raises(
            FeatureError, match=r"needs open_clip_torch .*pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch"
        ):
            OpenClip("ViT-B-32", str(tmp_path / "weights.pt"))
    else:
        pytest.skip("open_clip is installed here")


def test_open_clip_posters(feat_root, tmp_path):
    open_clip = open_clip_or_skip()
    model_config = {
        "embed_dim": 12,
        "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-test-clip.json").write_text(json.dumps(model_config))
    open_clip.add_model_config(tmp_path / "models")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-test-clip")
    torch.save(model.state_dict(), tmp_path / "tiny.pt")

    posters = write_posters(tmp_path / "posters", ITEM_TOKENS[:4])
    config = features_config(
        feat_root,
        tmp_path / "cache",
        poster_dir=str(posters),
        clip_backend="open_clip",
        clip_model="tiny-test-clip",
        clip_checkpoint=str(tmp_path / "tiny.pt"),
    )
    dataset, _ = build_splits(config)
    store = item_image_features(config, dataset)
    assert store.features.shape == (dataset.item_num, 12) and int(store.mask.sum()) == 4
    assert torch.allclose(store.features[store.mask].norm(dim=1), torch.ones(4), atol=1e-5)

    _, _, preprocess = open_clip.create_model_and_transforms("tiny-test-clip", pretrained=str(tmp_path / "tiny.pt"))
    with Image.open(posters / f"{ITEM_TOKENS[1]}.png") as image, torch.no_grad():
        expected = torch.nn.functional.normalize(
            model.eval().encode_image(preprocess(image.convert("RGB"))[None]), dim=-1
        )[0]
    assert torch.allclose(store.features[dataset.field2token_id["item_id"][ITEM_TOKENS[1]]], expected, atol=1e-5)
