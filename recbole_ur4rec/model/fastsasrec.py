r"""
FastSASRec
################################################
Reference:
    Wang-Cheng Kang and Julian McAuley. "Self-Attentive Sequential Recommendation." In ICDM 2018.

SASRec trained as in the paper, with a next-item loss at every position of a user's whole training history,
on :class:`~recbole_ur4rec.model.layers.SequenceBackbone`.
"""
from recbole.model.abstract_recommender import SequentialRecommender

from recbole_ur4rec.data.sequence_dataset import target_list_field
from recbole_ur4rec.model.layers import LOSS_TYPES, SequenceBackbone, position_loss, supervised_positions

LOSS_POSITIONS = ("all", "last")


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

    def _check_config(self, config):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)} for {type(self).__name__}, got {self.loss_type!r}")
        if self.loss_position not in LOSS_POSITIONS:
            raise ValueError(f"loss_position must be one of {', '.join(LOSS_POSITIONS)}, got {self.loss_position!r}")
        if not isinstance(self.neg_sample_num, int) or isinstance(self.neg_sample_num, bool) or self.neg_sample_num < 1:
            raise ValueError(f"neg_sample_num must be a positive int, got {self.neg_sample_num!r}")
        for key in ("hidden_size", "n_layers", "n_heads", "inner_size", "MAX_ITEM_LIST_LENGTH"):
            if not isinstance(config[key], int) or isinstance(config[key], bool) or config[key] < 1:
                raise ValueError(f"{key} must be a positive int, got {config[key]!r}")
        for key in ("hidden_dropout_prob", "attn_dropout_prob"):
            if not isinstance(config[key], (int, float)) or not 0 <= config[key] < 1:
                raise ValueError(f"{key} must be a number in [0, 1), got {config[key]!r}")
        if config["train_neg_sample_args"]["distribution"] != "none":
            raise ValueError(
                f"train_neg_sample_args must be ~ for {type(self).__name__} (got {config['train_neg_sample_args']}): "
                f"it samples its own negatives, neg_sample_num per position"
            )

    def forward(self, item_seq, item_seq_len):
        return self.backbone(item_seq, item_seq_len)  # [B L H]

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
