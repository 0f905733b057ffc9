r"""
SequenceBackbone
################################################
Reference:
    Wang-Cheng Kang and Julian McAuley. "Self-Attentive Sequential Recommendation." In ICDM 2018.

The SASRec transformer shared by the plugin's sequential models: item + position embeddings and causal
self-attention returning the hidden state of every position, plus the position-wise losses.

Sequences are right-padded (item id 0 after the valid items), as RecBole's ``item_id_list`` is. With right
padding the causal mask alone keeps valid positions from attending to padding, so attention runs on
``scaled_dot_product_attention(is_causal=True)`` with no extra mask, and each batch is cut to its longest row.
"""
import torch
from torch import nn
from torch.nn import functional as F

from recbole_ur4rec.common.checks import check_config_value
from recbole_ur4rec.data.sequence_dataset import LOSS_POSITIONS

LOSS_TYPES = ("CE", "SSM", "BPR", "BCE")
ITEM_TEXT_MODES = ("none", "input", "tied")  # item_text_embedding: see SequenceBackbone.use_item_text
# what a checkpoint that starts a backbone (backbone_checkpoint, duorec_checkpoint) must share with the model
WARM_START_MATCH = (
    "the same dataset with the same hidden_size, inner_size, n_layers, MAX_ITEM_LIST_LENGTH and item_text_embedding "
    "(its text projection is not checked against the texts: use the same texts and encoder)."
)
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "swish": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def check_sequence_config(config, model_name):
    """The keys every model on :class:`SequenceBackbone` reads: sizes, dropouts, ``loss_position``, and
    ``train_neg_sample_args: ~`` (these models draw their own negatives). A bad value fails naming the key."""
    for key in ("hidden_size", "n_layers", "n_heads", "inner_size", "MAX_ITEM_LIST_LENGTH"):
        check_config_value(config, key, int, low=1)
    for key in ("hidden_dropout_prob", "attn_dropout_prob"):
        check_config_value(config, key, (int, float), low=0, high=1, high_open=True)
    check_config_value(config, "loss_position", None, choices=LOSS_POSITIONS)
    if config["train_neg_sample_args"]["distribution"] != "none":
        raise ValueError(
            f"train_neg_sample_args must be ~ for {model_name} (got {config['train_neg_sample_args']}): "
            f"it samples its own negatives, not RecBole's sampler"
        )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection."""

    def __init__(self, hidden_size, n_heads, attn_dropout_prob):
        super().__init__()
        if hidden_size % n_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of n_heads ({n_heads})")
        self.n_heads = n_heads
        self.attn_dropout_prob = attn_dropout_prob
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)

    def forward(self, x):
        batch_size, seq_len, hidden_size = x.shape  # [B L H]
        qkv = self.qkv(x).view(batch_size, seq_len, 3, self.n_heads, hidden_size // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B nh L dh]
        context = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_dropout_prob if self.training else 0.0, is_causal=True
        )  # [B nh L dh]
        return self.out(context.transpose(1, 2).reshape(batch_size, seq_len, hidden_size))  # [B L H]


class FeedForward(nn.Module):
    """Position-wise feed-forward block with dropout, residual and LayerNorm (RecBole's, on fused activations)."""

    def __init__(self, hidden_size, inner_size, hidden_dropout_prob, hidden_act, layer_norm_eps):
        super().__init__()
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {', '.join(ACTIVATIONS)}, got {hidden_act!r}")
        self.activation = ACTIVATIONS[hidden_act]
        self.dense_1 = nn.Linear(hidden_size, inner_size)
        self.dense_2 = nn.Linear(inner_size, hidden_size)
        self.dropout = nn.Dropout(hidden_dropout_prob)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, x):
        return self.layer_norm(x + self.dropout(self.dense_2(self.activation(self.dense_1(x)))))  # [B L H]


class TransformerLayer(nn.Module):
    """RecBole's post-norm SASRec layer: attention and feed-forward, each with dropout, residual and LayerNorm."""

    def __init__(self, hidden_size, n_heads, inner_size, hidden_dropout_prob, attn_dropout_prob, hidden_act, layer_norm_eps):
        super().__init__()
        self.attention = CausalSelfAttention(hidden_size, n_heads, attn_dropout_prob)
        self.dropout = nn.Dropout(hidden_dropout_prob)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.feed_forward = FeedForward(hidden_size, inner_size, hidden_dropout_prob, hidden_act, layer_norm_eps)

    def forward(self, x):
        x = self.layer_norm(x + self.dropout(self.attention(x)))  # [B L H]
        return self.feed_forward(x)  # [B L H]


def supervised_positions(model, interaction, hidden):
    """The positions that carry a loss: hidden states [N H], targets [N] and users [N].

    ``model.loss_position`` ``last``: the last position of each of RecBole's prefix rows; ``all``: every non-padding
    position of the whole-sequence training rows (targets from their ``model.TARGET_SEQ`` field).
    """
    users = interaction[model.USER_ID]  # [B]
    if model.loss_position == "last":
        return model.backbone.gather_last(hidden, interaction[model.ITEM_SEQ_LEN]), interaction[model.POS_ITEM_ID], users
    if model.TARGET_SEQ not in interaction:
        raise KeyError(
            f"loss_position: all needs the field {model.TARGET_SEQ!r} of whole-sequence training rows; "
            f"build the data with recbole_ur4rec.data.data_preparation (RecBole's gives prefix rows)"
        )
    targets = interaction[model.TARGET_SEQ][:, : hidden.size(1)]  # [B L]
    mask = targets > 0  # [B L], False at padding
    return hidden[mask], targets[mask], users.unsqueeze(1).expand_as(mask)[mask]  # [N H], [N], [N]


def supervised_count(model, interaction):
    """How many positions of ``interaction`` carry a loss (what :func:`position_loss` averages over): a distributed
    run weights each rank's gradient by it (the plugin's models have it as ``loss_units``)."""
    if model.loss_position == "last":
        return len(interaction)
    return int((interaction[model.TARGET_SEQ] > 0).sum())


class SequenceBackbone(nn.Module):
    """Item and position embeddings, then ``n_layers`` causal transformer layers.

    ``forward`` returns the hidden state of every position, ``[B L H]`` with ``L`` the longest row of the
    batch; the item embedding table doubles as the output layer (``output_items()``: ``item_embedding.weight``
    unless item text is tied in, :meth:`use_item_text`).
    """

    CONFIG_KEYS = (
        "hidden_size", "n_layers", "n_heads", "inner_size", "hidden_dropout_prob", "attn_dropout_prob",
        "hidden_act", "layer_norm_eps", "initializer_range",
    )

    @classmethod
    def from_config(cls, config, n_items, max_seq_length):
        """The backbone a RecBole config describes (keys ``CONFIG_KEYS``, checked by :func:`check_sequence_config`)."""
        check_sequence_config(config, config["model"])
        return cls(n_items=n_items, max_seq_length=max_seq_length, **{key: config[key] for key in cls.CONFIG_KEYS})

    def __init__(
        self,
        n_items,
        max_seq_length,
        hidden_size,
        n_layers,
        n_heads,
        inner_size,
        hidden_dropout_prob,
        attn_dropout_prob,
        hidden_act,
        layer_norm_eps,
        initializer_range,
    ):
        super().__init__()
        self.initializer_range = initializer_range
        self.item_embedding = nn.Embedding(n_items, hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(max_seq_length, hidden_size)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(hidden_dropout_prob)
        self.layers = nn.ModuleList(
            TransformerLayer(hidden_size, n_heads, inner_size, hidden_dropout_prob, attn_dropout_prob, hidden_act, layer_norm_eps)
            for _ in range(n_layers)
        )
        self.apply(self._init_weights)
        self.item_text_mode = "none"

    def use_item_text(self, features, mask, warm_items, mode):
        """Item text in the item representation (``item_text_embedding``; RecBole's SASRecF puts feature
        embeddings there, concatenated with the ID embedding and projected): an item is its ID embedding plus a
        learned projection (no bias) of its frozen text features; an item without training interactions (``warm_items`` False) is its projected text
        alone, its ID embedding never having been trained, and an item without text (``mask`` False) its ID
        embedding alone. ``input``: so in the input sequence, scored by the ID embeddings (as SASRecF scores);
        ``tied``: so on both sides, so that new items are ranked by their text; ``none``: unchanged.

        Args:
            features (torch.Tensor): [n_items d] text features (row = RecBole id).
            mask (torch.Tensor): [n_items] bool, where an item has text.
            warm_items (torch.Tensor): [n_items] bool, where an item has training interactions.
        """
        if mode not in ITEM_TEXT_MODES:
            raise ValueError(f"config key 'item_text_embedding' must be one of {', '.join(ITEM_TEXT_MODES)}, got {mode!r}")
        self.item_text_mode = mode
        if mode == "none":
            return
        self.register_buffer("item_text", features * mask.unsqueeze(1).to(features.dtype), persistent=False)  # [n d]
        self.register_buffer("id_weight", warm_items.to(features.dtype).unsqueeze(1), persistent=False)  # [n 1]
        self.text_projection = nn.Linear(features.size(1), self.item_embedding.embedding_dim, bias=False)
        self._init_weights(self.text_projection)

    def embed_items(self, item_seq):
        """Input embeddings of the items ``item_seq`` [B L] -> [B L H]."""
        x = self.item_embedding(item_seq)
        if self.item_text_mode != "none":
            x = x * self.id_weight[item_seq] + self.text_projection(self.item_text[item_seq])
        return x

    def output_items(self):
        """The table that scores items [n_items H]: the ID embeddings, and with ``tied`` item text the items as
        :meth:`embed_items` represents them."""
        weight = self.item_embedding.weight
        if self.item_text_mode == "tied":
            weight = weight * self.id_weight + self.text_projection(self.item_text)
        return weight

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def parameter_groups(self):
        """``item_embedding`` (item and position tables, and the item text's projection, part of the items'
        representation) and ``backbone`` (every other parameter), the groups the plugin's trainers freeze, clip,
        scale or keep local separately."""
        embeddings = [self.item_embedding.weight, self.position_embedding.weight]
        if self.item_text_mode != "none":
            embeddings.append(self.text_projection.weight)
        embedding_ids = {id(p) for p in embeddings}
        return {"item_embedding": embeddings, "backbone": [p for p in self.parameters() if id(p) not in embedding_ids]}

    def forward(self, item_seq, item_seq_len):
        """Hidden states of ``item_seq`` [B L'] (right-padded, ``item_seq_len`` [B] valid items per row).

        Returns:
            torch.Tensor: [B L H] with ``L = item_seq_len.max()``; rows are valid up to their length.
        """
        seq_len = int(item_seq_len.max())
        item_seq = item_seq[:, :seq_len]  # [B L]
        position_ids = torch.arange(seq_len, device=item_seq.device)
        x = self.embed_items(item_seq) + self.position_embedding(position_ids)  # [B L H]
        x = self.dropout(self.layer_norm(x))
        for layer in self.layers:
            x = layer(x)
        return x  # [B L H]

    @staticmethod
    def gather_last(hidden, item_seq_len):
        """Hidden state at each row's last valid position: [B L H], [B] -> [B H]."""
        index = (item_seq_len - 1).view(-1, 1, 1).expand(-1, 1, hidden.size(-1))
        return hidden.gather(1, index).squeeze(1)  # [B H]


def position_loss(hidden, targets, item_weight, loss_type="CE", neg_sample_num=1):
    """Mean next-item loss over the supervised positions.

    Args:
        hidden (torch.Tensor): [N H] hidden states of the supervised positions only (padding already dropped).
        targets (torch.Tensor): [N] next item of each position (ids >= 1).
        item_weight (torch.Tensor): [n_items H] output item embeddings; row 0 is padding and never scored.
        loss_type (str): ``CE`` full softmax over all items; ``SSM`` sampled softmax against ``neg_sample_num``
            uniform negatives shared by the batch; ``BPR`` / ``BCE`` against ``neg_sample_num`` uniform
            negatives per position. Sampled negatives equal to the target are masked out.
        neg_sample_num (int): negatives for SSM, BPR and BCE.
    """
    n_items = item_weight.size(0)
    if loss_type == "CE":
        logits = hidden @ item_weight[1:].t()  # [N n_items-1]
        return F.cross_entropy(logits, targets - 1)
    pos_score = (hidden * item_weight[targets]).sum(-1)  # [N]
    if loss_type == "SSM":
        negatives = torch.randint(1, n_items, (neg_sample_num,), device=hidden.device)  # [K]
        neg_score = hidden @ item_weight[negatives].t()  # [N K]
        neg_score = neg_score.masked_fill(negatives.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))
        logits = torch.cat([pos_score.unsqueeze(1), neg_score], dim=1)  # [N K+1]
        return F.cross_entropy(logits, torch.zeros_like(targets))
    negatives = torch.randint(1, n_items, (targets.size(0), neg_sample_num), device=hidden.device)  # [N K]
    neg_score = torch.einsum("nh,nkh->nk", hidden, item_weight[negatives])  # [N K]
    valid = (negatives != targets.unsqueeze(1)).float()  # [N K]
    if loss_type == "BPR":
        loss = -F.logsigmoid(pos_score.unsqueeze(1) - neg_score)  # [N K]
        return (loss * valid).sum() / valid.sum().clamp(min=1)
    if loss_type == "BCE":
        pos_loss = F.binary_cross_entropy_with_logits(pos_score, torch.ones_like(pos_score))
        neg_loss = F.binary_cross_entropy_with_logits(neg_score, torch.zeros_like(neg_score), reduction="none")
        return pos_loss + (neg_loss * valid).sum() / valid.sum().clamp(min=1)
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
