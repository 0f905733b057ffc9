r"""
FastSASRec
################################################
Reference:
    Wang-Cheng Kang and Julian McAuley. "Self-Attentive Sequential Recommendation." In ICDM 2018.

SASRec trained as in the paper, with a next-item loss at every position of a user's whole training history,
on :class:`~recbole_ur4rec.model.layers.SequenceBackbone`.
"""
from recbole.model.abstract_recommender import SequentialRecommender

from recbole_ur4rec.common.checks import check_config_value as _check
from recbole_ur4rec.data.sequence_dataset import target_list_field
from recbole_ur4rec.model.layers import LOSS_TYPES, SequenceBackbone, position_loss, supervised_count, supervised_positions


class FastSASRec(SequentialRecommender):
    r"""SASRec with a loss at every position of whole-sequence training rows.

    NOTE:
        Deviations from RecBole's SASRec:

        - ``loss_position: all`` (default) trains on one row per user (windows of ``MAX_ITEM_LIST_LENGTH`` for
          longer histories) built by ``recbole_ur4rec.data.data_preparation`` and supervises every position;
          ``loss_position: last`` uses RecBole's one-row-per-prefix data and the last position only, as
          RecBole's SASRec does.
        - Attention is ``scaled_dot_product_attention`` with a causal mask on right-padded rows, each batch cut
          to its longest row; the causal mask already hides the padding from every valid position.
        - CE leaves the padding item out of the softmax. Negatives (``SSM``, ``BPR``, ``BCE``) are drawn
          uniformly inside the model, ``neg_sample_num`` of them, instead of by RecBole's sampler, so
          ``train_neg_sample_args`` must be ``~``.
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.loss_type = config["loss_type"]
        self.loss_position = config["loss_position"]
        self.neg_sample_num = config["neg_sample_num"]
        self.TARGET_SEQ = target_list_field(config)
        self._check_config(config)

        self.backbone = SequenceBackbone.from_config(config, self.n_items, self.max_seq_length)

    def _check_config(self, config):  # the backbone's keys: SequenceBackbone.from_config
        _check(config, "loss_type", None, choices=LOSS_TYPES)
        _check(config, "neg_sample_num", int, low=1)

    def forward(self, item_seq, item_seq_len):
        return self.backbone(item_seq, item_seq_len)  # [B L H]

    loss_units = supervised_count  # what the loss averages over (a distributed run's gradient weights)

    def calculate_loss(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]  # [B L]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]  # [B]
        hidden = self.forward(item_seq, item_seq_len)  # [B L H]
        hidden, targets, _ = supervised_positions(self, interaction, hidden)  # [N H], [N]
        return position_loss(hidden, targets, self.backbone.item_embedding.weight, self.loss_type, self.neg_sample_num)

    def _last_hidden(self, interaction):
        item_seq_len = interaction[self.ITEM_SEQ_LEN]  # [B]
        hidden = self.forward(interaction[self.ITEM_SEQ], item_seq_len)  # [B L H]
        return self.backbone.gather_last(hidden, item_seq_len)  # [B H]

    def predict(self, interaction):
        hidden = self._last_hidden(interaction)  # [B H]
        item_emb = self.backbone.item_embedding(interaction[self.ITEM_ID])  # [B H]
        return (hidden * item_emb).sum(-1)  # [B]

    def full_sort_predict(self, interaction):
        hidden = self._last_hidden(interaction)  # [B H]
        return hidden @ self.backbone.item_embedding.weight.t()  # [B n_items]
