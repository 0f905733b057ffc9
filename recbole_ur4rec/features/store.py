"""Aligned feature stores: token-keyed features mapped through RecBole's ``field2token_id`` into an
``[n, d]`` tensor whose row 0 is padding, with a mask of the ids that really have the modality.
"""

from dataclasses import dataclass
from logging import getLogger

import torch

from recbole_ur4rec.features.errors import FeatureError
from recbole_ur4rec.features.files import rows_message


@dataclass
class AlignedFeatures:
    """One modality for every id of one field (``item_id`` or ``user_id``).

    Attributes:
        features (torch.Tensor): ``[n, d]`` float32; row ``i`` belongs to RecBole id ``i``; row 0 (padding)
            and the rows of ids without the modality are zeros.
        mask (torch.Tensor): ``[n]`` bool, True where id ``i`` has a feature of its own.
        field (str): the RecBole field the ids belong to.
        manifest (dict): where the features came from (source, encoder, hash, dimension).
    """

    features: torch.Tensor
    mask: torch.Tensor
    field: str
    manifest: dict

    @property
    def dim(self):
        return self.features.shape[1]

    def to(self, device):
        """The same store on ``device``."""
        return AlignedFeatures(self.features.to(device), self.mask.to(device), self.field, self.manifest)


def match_tokens(source, tokens, where, dataset, field, strict):
    """Positions and RecBole ids of the ``tokens`` that ``dataset`` knows for ``field``.

    Tokens the dataset does not have (e.g. filtered out, or from another dataset) are counted and named:
    an error with ``strict``, otherwise a warning; their rows are left out of the store.

    Returns:
        tuple: (positions in ``tokens`` to keep, LongTensor of their ids).
    """
    token2id = dataset.field2token_id[field]
    positions, ids, unknown = [], [], []
    for position, token in enumerate(tokens):
        index = token2id.get(token, 0)
        if index == 0:
            unknown.append(where[position])
        else:
            positions.append(position)
            ids.append(index)
    if unknown:
        message = rows_message(source, f"{field} tokens the dataset {dataset.dataset_name!r} does not have", unknown)
        if strict:
            raise FeatureError(message + "; strict_features is on")
        getLogger().warning(message + "; these rows are not used (strict_features: True makes this an error)")
    return positions, torch.tensor(ids, dtype=torch.long)


def align(ids, features, n, field, manifest):
    """Scatter ``features[j]`` to row ``ids[j]`` of an ``[n, d]`` zero tensor and mark those rows present."""
    if len(ids) != features.shape[0]:
        raise FeatureError(f"{manifest.get('source')}: {features.shape[0]} feature rows for {len(ids)} ids")
    table = torch.zeros(n, features.shape[1], dtype=torch.float32)
    mask = torch.zeros(n, dtype=torch.bool)
    table[ids] = features.float()
    mask[ids] = True
    return AlignedFeatures(table, mask, field, manifest)


def check_dimension(source, dim, expected, key):
    """Fail when ``dim`` differs from the configured ``expected`` dimension (None accepts any)."""
    if expected is not None and dim != expected:
        raise FeatureError(f"{source}: features have dimension {dim}, but config key {key!r} is {expected}")
