r"""
FastSASRec
################################################
Reference:
    Wang-Cheng Kang and Julian McAuley. "Self-Attentive Sequential Recommendation." In ICDM 2018.

SASRec trained as in the paper, with a next-item loss at every position of a user's whole training history,
on :class:`~recbole_ur4rec.model.layers.SequenceBackbone`.
"""
from recbole.model.abstract_recommender import SequentialRecommender

from recbole_ur4rec.common import distributed
from recbole_ur4rec.common.checks import check_config_value as _check
from recbole_ur4rec.data.sequence_dataset import target_list_field
from recbole_ur4rec.evaluation.slices import items_with_training_interactions
from recbole_ur4rec.features import item_text_features, stores_fingerprint
from recbole_ur4rec.model.layers import (
    ITEM_TEXT_MODES,
    LOSS_TYPES,
    SequenceBackbone,
    position_loss,
    supervised_count,
    supervised_positions,
)
from recbole_ur4rec.model.layers.staged import FeatureFingerprintMixin


class FastSASRec(FeatureFingerprintMixin, SequentialRecommender):
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
        - ``item_text_embedding`` (``input`` / ``tied``) adds each item's projected text embedding (its item text
          encoded by the sentence encoder) to its item embedding, where SASRecF puts feature embeddings
          (:meth:`SequenceBackbone.use_item_text`); ``none`` (default) is SASRec.
    """

    FEATURE_HINT = "item_text_embedding, the item text settings and the text encoder"

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.loss_type = config["loss_type"]
        self.loss_position = config["loss_position"]
        self.neg_sample_num = config["neg_sample_num"]
        self.TARGET_SEQ = target_list_field(config)
        self._check_config(config)

        self.backbone = SequenceBackbone.from_config(config, self.n_items, self.max_seq_length)
        self.feature_fingerprint = ""
        mode = config["item_text_embedding"]
        if mode != "none":
            training = getattr(dataset, "training_split", dataset)  # RecBole's training split
            with distributed.first_on_each_machine(config["local_rank"]):  # one encoding per machine, as load_features
                text = item_text_features(config, training)
            warm = items_with_training_interactions(training)
            self.backbone.use_item_text(text.features, text.mask, warm, mode)
            self.feature_fingerprint = f"{mode}:{stores_fingerprint({'item_text': text})}"
        self.other_parameter_name = ["feature_fingerprint"]

    def _check_config(self, config):  # the backbone's keys: SequenceBackbone.from_config
        _check(config, "loss_type", None, choices=LOSS_TYPES)
        _check(config, "neg_sample_num", int, low=1)
        _check(config, "item_text_embedding", None, choices=ITEM_TEXT_MODES)

    def forward(self, item_seq, item_seq_len):
        return self.backbone(item_seq, item_seq_len)  # [B L H]

    loss_units = supervised_count  # what the loss averages over (a distributed run's gradient weights)

    def calculate_loss(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]  # [B L]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]  # [B]
        hidden = self.forward(item_seq, item_seq_len)  # [B L H]
        hidden, targets, _ = supervised_positions(self, interaction, hidden)  # [N H], [N]
        return position_loss(hidden, targets, self.backbone.output_items(), self.loss_type, self.neg_sample_num)

    def _last_hidden(self, interaction):
        item_seq_len = interaction[self.ITEM_SEQ_LEN]  # [B]
        hidden = self.forward(interaction[self.ITEM_SEQ], item_seq_len)  # [B L H]
        return self.backbone.gather_last(hidden, item_seq_len)  # [B H]

    def predict(self, interaction):
        hidden = self._last_hidden(interaction)  # [B H]
        item_emb = self.backbone.output_items()[interaction[self.ITEM_ID]]  # [B H]
        return (hidden * item_emb).sum(-1)  # [B]

    def full_sort_predict(self, interaction):
        hidden = self._last_hidden(interaction)  # [B H]
        return hidden @ self.backbone.output_items().t()  # [B n_items]
