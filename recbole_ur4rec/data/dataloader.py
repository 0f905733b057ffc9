"""Training loader for prefix rows whose item lists are gathered per batch (``loss_position: last``)."""
import numpy as np
from recbole.data.dataloader import TrainDataLoader
from recbole.data.interaction import Interaction

from recbole_ur4rec.data.sequence_dataset import prefix_item_lists


class PrefixTrainDataLoader(TrainDataLoader):
    """RecBole's :class:`TrainDataLoader` over :func:`~recbole_ur4rec.data.sequence_dataset.build_prefix_train_dataset`
    rows: each batch gets its ``item_id_list`` [B, L] from the flat training history, so memory stays ~ interactions.
    """

    def collate_fn(self, index):
        data = self._dataset[np.array(index)]
        data.update(Interaction({self._dataset.item_id_list_field: prefix_item_lists(self._dataset, data)}))
        return self._neg_sampling(self.transform(self._dataset, data))
