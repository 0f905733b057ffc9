"""Fusion of backbone and retriever scores (UR4Rec), of retrieved neighbours into a representation (FTRagRec),
and the losses between two score distributions."""
import math

import torch
from torch import nn
from torch.nn import functional as F

FUSION_TYPES = ("fixed", "gate", "residual")
CALIBRATIONS = ("none", "affine", "standardize")


class ScoreFusion(nn.Module):
    """Mix backbone scores ``b`` and retriever scores ``r`` (both [.. n]).

    - ``fixed``: ``(1 - w) * b + w * r`` with ``w = fusion_weight``;
    - ``gate``: the same with ``w = sigmoid(linear([h; q]))`` per position, from the backbone state ``h`` and the
      retriever query ``q``, initialised so that ``w`` starts near ``fusion_weight``;
    - ``residual``: ``b + g * r`` with a learned scalar ``g`` starting at ``fusion_weight``.

    The two branches are on different scales (logits against cosines / temperature); ``calibration`` puts them on
    one before mixing: ``none`` (as they are), ``affine`` (each branch times a learned positive scale ``exp(s)``,
    starting at 1; a per-branch bias would shift every item of a row alike, so it changes no ranking and no softmax)
    or ``standardize`` (each branch's row standardised over the scored items: zero mean, unit variance).
    """

    def __init__(self, fusion_type, fusion_weight, context_dim, calibration="none"):
        super().__init__()
        if fusion_type not in FUSION_TYPES:
            raise ValueError(f"fusion_type must be one of {', '.join(FUSION_TYPES)}, got {fusion_type!r}")
        if calibration not in CALIBRATIONS:
            raise ValueError(f"config key 'fusion_calibration' must be one of {', '.join(CALIBRATIONS)}, got {calibration!r}")
        self.fusion_type = fusion_type
        self.fusion_weight = fusion_weight
        self.calibration = calibration
        if calibration == "affine":
            self.log_scale = nn.Parameter(torch.zeros(2))  # backbone, retriever
        if fusion_type == "gate":
            if not 0 < fusion_weight < 1:
                raise ValueError(f"fusion_weight must be in (0, 1) with fusion_type: gate, got {fusion_weight!r}")
            self.gate = nn.Linear(context_dim, 1)
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, math.log(fusion_weight / (1 - fusion_weight)))
        elif fusion_type == "residual":
            self.g = nn.Parameter(torch.tensor(float(fusion_weight)))

    def weight(self, context):
        """The retriever's weight: [.. 1] for ``gate``, a scalar tensor otherwise."""
        if self.fusion_type == "gate":
            return torch.sigmoid(self.gate(context))
        if self.fusion_type == "residual":
            return self.g
        return context.new_tensor(self.fusion_weight)

    def calibrate(self, backbone_scores, retriever_scores):
        """Both branches' scores [.. n] on one scale (see ``calibration``)."""
        if self.calibration == "affine":
            scale = self.log_scale.exp()
            return backbone_scores * scale[0], retriever_scores * scale[1]
        if self.calibration == "standardize":
            return tuple(
                (s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True).clamp(min=1e-6) for s in (backbone_scores, retriever_scores)
            )
        return backbone_scores, retriever_scores

    def forward(self, backbone_scores, retriever_scores, context):
        backbone_scores, retriever_scores = self.calibrate(backbone_scores, retriever_scores)
        w = self.weight(context)
        if self.fusion_type == "residual":
            return backbone_scores + w * retriever_scores, w
        return (1 - w) * backbone_scores + w * retriever_scores, w  # [.. n]


class RetrievalFusion(nn.Module):
    """Reads retrieved neighbours (their representation and their target item), pools them by attention with a
    temperature, and mixes the result into the sequence representation."""

    def __init__(self, hidden_size, n_heads, inner_size, n_layers, encoder, dropout, fusion, alpha, layer_norm_eps,
                 knowledge_targets="direct"):
        super().__init__()
        self.fusion, self.alpha, self.encoder_type = fusion, alpha, encoder
        self.start_alpha = alpha  # ``alpha`` moves from here on a schedule (FTRagRec's alpha_end); the gate's bias starts here
        self.knowledge_targets = knowledge_targets
        self.neighbour_proj = nn.Linear(2 * hidden_size, hidden_size)
        if encoder == "transformer":
            layer = nn.TransformerEncoderLayer(
                hidden_size, n_heads, inner_size, dropout, activation="gelu", batch_first=True, layer_norm_eps=layer_norm_eps
            )
            self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        else:
            self.encoder = nn.ModuleList(
                nn.Sequential(nn.Linear(hidden_size, inner_size), nn.GELU(), nn.Dropout(dropout), nn.Linear(inner_size, hidden_size))
                for _ in range(n_layers)
            )
            self.norms = nn.ModuleList(nn.LayerNorm(hidden_size, eps=layer_norm_eps) for _ in range(n_layers))
        self.query_proj = nn.Linear(hidden_size, hidden_size)
        self.value_proj = nn.Linear(hidden_size, hidden_size)
        if fusion == "gate":
            self.gate = nn.Linear(2 * hidden_size, hidden_size)
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, float(torch.logit(torch.tensor(alpha))))  # starts at alpha
        elif fusion == "dynamic":
            self.quality_scale = nn.Parameter(torch.tensor(5.0))
            self.quality_center = nn.Parameter(torch.tensor(0.5))
        if knowledge_targets == "learned":  # the direct path's weight, sigmoid(0) = 0.5 at the start
            self.target_logit = nn.Parameter(torch.zeros(()))

    def encode(self, x, mask):
        """Neighbour encodings [Q k H] from inputs [Q k H]; ``mask`` [Q k] True for real neighbours."""
        if self.encoder_type == "transformer":
            padding = ~mask
            padding[~mask.any(1)] = False  # a row without neighbours attends to all (its output is dropped)
            return self.encoder(x, src_key_padding_mask=padding)
        for block, norm in zip(self.encoder, self.norms):
            x = norm(x + block(x))
        return x

    def forward(self, states, keys, target_emb, similarity, mask, temperature):
        """Mix retrieved knowledge into ``states`` [Q H].

        Args:
            keys (torch.Tensor): [Q k H] representations of the retrieved prefixes.
            target_emb (torch.Tensor): [Q k H] embeddings of their next items.
            similarity (torch.Tensor): [Q k] FAISS similarities; mask (torch.Tensor): [Q k] real neighbours.

        Returns:
            dict: ``enhanced`` [Q H], ``knowledge`` [Q H], ``quality`` [Q] (mean similarity of the neighbours),
            ``weight`` [Q 1] or [Q H] (the mixing weight), ``has`` [Q] (rows with at least one neighbour).
        """
        has = mask.any(1)  # [Q]
        x = self.encode(self.neighbour_proj(torch.cat([keys, target_emb], dim=-1)), mask)  # [Q k H]
        query = self.query_proj(states)  # [Q H]
        logits = F.cosine_similarity(query.unsqueeze(1), x, dim=-1) / temperature  # [Q k]
        logits = logits.masked_fill(~mask, float("-inf")).masked_fill(~has.unsqueeze(1), 0.0)
        attention = torch.softmax(logits, dim=-1) * has.unsqueeze(1)  # [Q k]
        # the neighbours (prefix and target, through the encoder), and their target embeddings directly unless
        # knowledge_targets says otherwise: 'encoded' drops the direct path, 'learned' weighs it
        values = self.value_proj(x)  # [Q k H]
        if self.knowledge_targets == "direct":
            values = values + target_emb
        elif self.knowledge_targets == "learned":
            values = values + torch.sigmoid(self.target_logit) * target_emb
        knowledge = (attention.unsqueeze(-1) * values).sum(1)  # [Q H]
        quality = (similarity * mask).sum(1) / mask.sum(1).clamp(min=1)  # [Q]
        if self.fusion == "fixed":
            weight = states.new_full((states.size(0), 1), self.alpha)
        elif self.fusion == "dynamic":
            weight = self.alpha * torch.sigmoid(self.quality_scale * (quality - self.quality_center)).unsqueeze(1)
        else:  # the gate's logit follows alpha's schedule: shifted by logit(alpha) - logit(start_alpha)
            shift = _logit(self.alpha) - _logit(self.start_alpha)
            weight = torch.sigmoid(self.gate(torch.cat([states, knowledge], dim=-1)) + shift)  # [Q H]
        weight = weight * has.unsqueeze(1)
        enhanced = (1 - weight) * states + weight * knowledge
        return {"enhanced": enhanced, "knowledge": knowledge, "quality": quality, "weight": weight, "has": has}


def _logit(p):
    return math.log(p / (1 - p))


def bidirectional_distillation(scores_a, scores_b, temperature, padding_column=True):
    """``T^2 * (KL(p_b || p_a) + KL(p_a || p_b)) / 2`` with softmax(scores / T); each side learns from the other's
    detached distribution. Scores are [N n] with the padding column 0 (left out), or [N U] of sampled candidates
    (``padding_column`` False: the KL is then over the candidates)."""
    if padding_column:
        scores_a, scores_b = scores_a[:, 1:], scores_b[:, 1:]
    log_a = F.log_softmax(scores_a / temperature, dim=-1)
    log_b = F.log_softmax(scores_b / temperature, dim=-1)
    a_from_b = F.kl_div(log_a, log_b.detach(), log_target=True, reduction="batchmean")
    b_from_a = F.kl_div(log_b, log_a.detach(), log_target=True, reduction="batchmean")
    return (a_from_b + b_from_a) / 2 * temperature**2


RANKING_LOSSES = ("CE", "InfoNCE", "BPR")


class SampledCandidates:
    """The items a sampled loss scores: a batch's targets [N] and ``n_negatives`` uniform negatives shared by the
    batch, so a model scores ``items`` [U] (unique ids, U <= N + K) instead of every item.

    ``target_columns`` [N] and ``negative_columns`` [K] are their columns among ``items``; ``clash`` [N K] marks a
    negative equal to the position's target (left out of the loss).
    """

    def __init__(self, targets, n_items, n_negatives, negatives=None):
        if negatives is None:
            negatives = torch.randint(1, n_items, (n_negatives,), device=targets.device)  # [K]
        self.negatives = negatives
        self.items, inverse = torch.unique(torch.cat([targets, negatives]), return_inverse=True)  # [U], [N+K]
        self.target_columns, self.negative_columns = inverse[: targets.size(0)], inverse[targets.size(0) :]
        self.clash = negatives.unsqueeze(0) == targets.unsqueeze(1)  # [N K]

    def split(self, scores):
        """The target's and the negatives' columns of candidate scores [N U]: ([N 1], [N K])."""
        return scores.gather(1, self.target_columns.unsqueeze(1)), scores[:, self.negative_columns]

    def logits(self, scores):
        """Sampled-softmax logits [N 1+K] from candidate scores [N U]: the target first, then the negatives (a
        negative equal to the target scores -inf)."""
        positive, negative = self.split(scores)
        return torch.cat([positive, negative.masked_fill(self.clash, float("-inf"))], dim=1)


def ranking_loss(scores, targets, loss_type, candidates=None):
    """Next-item loss of score rows ``scores``, ``targets`` [N] >= 1.

    ``CE``: softmax over all items, ``scores`` [N n] (column 0 = padding, never a candidate). ``InfoNCE`` (softmax
    over the target and the negatives) or ``BPR`` (mean ``-log sigmoid(pos - neg)``): ``scores`` [N U] of the
    :class:`SampledCandidates` ``candidates``; negatives equal to the target are left out.
    """
    if loss_type == "CE":
        return F.cross_entropy(scores[:, 1:], targets - 1)
    if loss_type not in RANKING_LOSSES:
        raise ValueError(f"ranking_loss_type must be one of {', '.join(RANKING_LOSSES)}, got {loss_type!r}")
    if loss_type == "InfoNCE":
        return F.cross_entropy(candidates.logits(scores), torch.zeros_like(targets))
    positive, negative = candidates.split(scores)  # [N 1], [N K]
    valid = (~candidates.clash).float()
    loss = -F.logsigmoid(positive - negative)  # [N K]
    return (loss * valid).sum() / valid.sum().clamp(min=1)
