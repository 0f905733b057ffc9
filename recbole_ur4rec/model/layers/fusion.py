"""Fusion of backbone and retriever scores, and the losses between two score distributions."""
import math

import torch
from torch import nn
from torch.nn import functional as F

FUSION_TYPES = ("fixed", "gate", "residual")


class ScoreFusion(nn.Module):
    """Mix backbone scores ``b`` and retriever scores ``r`` (both [.. n]).

    - ``fixed``: ``(1 - w) * b + w * r`` with ``w = fusion_weight``;
    - ``gate``: the same with ``w = sigmoid(linear([h; q]))`` per position, from the backbone state ``h`` and the
      retriever query ``q``, initialised so that ``w`` starts near ``fusion_weight``;
    - ``residual``: ``b + g * r`` with a learned scalar ``g`` starting at ``fusion_weight``.
    """

    def __init__(self, fusion_type, fusion_weight, context_dim):
        super().__init__()
        if fusion_type not in FUSION_TYPES:
            raise ValueError(f"fusion_type must be one of {', '.join(FUSION_TYPES)}, got {fusion_type!r}")
        self.fusion_type = fusion_type
        self.fusion_weight = fusion_weight
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

    def forward(self, backbone_scores, retriever_scores, context):
        w = self.weight(context)
        if self.fusion_type == "residual":
            return backbone_scores + w * retriever_scores, w
        return (1 - w) * backbone_scores + w * retriever_scores, w  # [.. n]


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
    positive = scores.gather(1, candidates.target_columns.unsqueeze(1))  # [N 1]
    negative = scores[:, candidates.negative_columns]  # [N K]
    if loss_type == "InfoNCE":
        logits = torch.cat([positive, negative.masked_fill(candidates.clash, float("-inf"))], dim=1)  # [N K+1]
        return F.cross_entropy(logits, torch.zeros_like(targets))
    valid = (~candidates.clash).float()
    loss = -F.logsigmoid(positive - negative)  # [N K]
    return (loss * valid).sum() / valid.sum().clamp(min=1)
