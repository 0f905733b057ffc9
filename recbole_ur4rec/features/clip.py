"""CLIP image features from a folder of posters named by item token (``<token>.jpg``, ``.png``, ...).

Two backends read local weights only: ``transformers`` (``CLIPModel`` from a local Hugging Face folder; works
on the default install) and ``open_clip`` (a model name and a local checkpoint file; needs
``requirements-clip.txt``, see the README). Embeddings are L2-normalised; posters that cannot be decoded are skipped and listed.
"""

import os

import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from recbole_ur4rec.features.errors import FeatureError
from recbole_ur4rec.features.files import rows_message
from recbole_ur4rec.features.fingerprint import files_fingerprint

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
OPEN_CLIP_INSTALL = (
    "pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch   "
    "(after pip install -e .; torchvision does not import beside the default CPU torch 2.13)"
)


def find_posters(folder):
    """Poster paths keyed by item token (the file name without its image suffix)."""
    if not os.path.isdir(folder):
        raise FeatureError(f"poster_dir {folder} is not a folder")
    posters, clashes = {}, []
    for name in sorted(os.listdir(folder)):
        token, suffix = os.path.splitext(name)
        if suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if token in posters:
            clashes.append(f"{name} and {os.path.basename(posters[token])}")
        posters[token] = os.path.join(folder, name)
    if clashes:
        raise FeatureError(rows_message(folder, "several posters for one item token", clashes))
    if not posters:
        raise FeatureError(f"poster_dir {folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    return posters


class TransformersClip:
    """Image tower of a transformers ``CLIPModel`` read from a local Hugging Face folder."""

    def __init__(self, model_path, device="cpu"):
        if not os.path.isdir(model_path):
            raise FeatureError(
                f"clip_model {model_path} is not a local Hugging Face CLIP folder (nothing is downloaded)"
            )
        os.environ["HF_HUB_OFFLINE"] = "1"
        from transformers import CLIPImageProcessor, CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(model_path, local_files_only=True).to(device).eval()
            self.processor = CLIPImageProcessor.from_pretrained(model_path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise FeatureError(f"clip_model {model_path}: not a loadable CLIPModel folder ({err})") from None
        self.device = device

    @torch.no_grad()
    def encode(self, images):
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        output = self.model.get_image_features(pixel_values=pixels)
        # transformers 5 returns the projected embeddings as pooler_output, 4.x a tensor
        return output if torch.is_tensor(output) else output.pooler_output


class OpenClip:
    """An open_clip model built by name with weights from a local checkpoint file."""

    def __init__(self, model_name, checkpoint, device="cpu"):
        try:
            import open_clip
        except ImportError as err:
            raise FeatureError(
                f"clip_backend 'open_clip' needs open_clip_torch ({err}); install it with: {OPEN_CLIP_INSTALL}"
            ) from None
        if checkpoint is None or not os.path.isfile(checkpoint):
            raise FeatureError(f"clip_checkpoint {checkpoint} is not a local file: open_clip needs its weights file")
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=checkpoint, device=device
            )
        except RuntimeError as err:
            raise FeatureError(f"open_clip model {model_name!r} with checkpoint {checkpoint}: {err}") from None
        self.model.eval()
        self.device = device

    @torch.no_grad()
    def encode(self, images):
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        return self.model.encode_image(pixels)


def clip_identity(backend, model, checkpoint=None):
    """What names the weights of a CLIP encoder in a cache manifest, without loading them."""
    weights = model if backend == "transformers" else checkpoint
    if weights is None or not os.path.exists(weights):
        return f"{backend}:{model}:{checkpoint}"
    architecture = f"{model}:" if backend == "open_clip" else ""  # transformers: model is the weights' folder
    return f"{backend}:{architecture}{files_fingerprint(weights)[:16]}"


def clip_encoder(backend, model, checkpoint=None, device="cpu"):
    """The image encoder of ``backend`` (``'transformers'`` or ``'open_clip'``)."""
    if model is None:
        raise FeatureError("clip_model is not set: a local Hugging Face CLIP folder, or an open_clip model name")
    if backend == "open_clip":
        return OpenClip(model, checkpoint, device)
    return TransformersClip(model, device)


def _open_image(path):
    """The decoded RGB image, or None when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def encode_posters(posters, encoder, batch_size=32, show_progress=True):
    """Embed the posters ``{token: path}`` in batches.

    Returns:
        tuple: (tokens, L2-normalised float32 features ``[len(tokens), d]``, paths that could not be decoded).
    """
    tokens, chunks, undecodable = [], [], []
    items = list(posters.items())
    for start in tqdm(range(0, len(items), batch_size), desc="CLIP posters", disable=not show_progress):
        batch_tokens, images = [], []
        for token, path in items[start : start + batch_size]:
            image = _open_image(path)
            if image is None:
                undecodable.append(path)
            else:
                batch_tokens.append(token)
                images.append(image)
        if images:
            tokens += batch_tokens
            chunks.append(torch.nn.functional.normalize(encoder.encode(images).float(), dim=-1).cpu())
    if not tokens:
        raise FeatureError(f"none of the {len(posters)} posters could be decoded")
    return tokens, torch.cat(chunks), undecodable
