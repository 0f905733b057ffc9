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


def bidirectional_distillation(scores_a, scores_b, temperature):
    """``T^2 * (KL(p_b || p_a) + KL(p_a || p_b)) / 2`` with softmax(scores / T); each side learns from the other's
    detached distribution. Scores are [N n]; the padding column 0 is left out."""
    log_a = F.log_softmax(scores_a[:, 1:] / temperature, dim=-1)
    log_b = F.log_softmax(scores_b[:, 1:] / temperature, dim=-1)
    a_from_b = F.kl_div(log_a, log_b.detach(), log_target=True, reduction="batchmean")
    b_from_a = F.kl_div(log_b, log_a.detach(), log_target=True, reduction="batchmean")
    return (a_from_b + b_from_a) / 2 * temperature**2


RANKING_LOSSES = ("CE", "InfoNCE", "BPR")


def ranking_loss(scores, targets, loss_type, n_negatives):
    """Next-item loss on score rows ``scores`` [N n] (column 0 = padding, never a candidate), ``targets`` [N] >= 1.

    ``CE``: softmax over all items; ``InfoNCE``: softmax over the target and ``n_negatives`` uniform negatives per
    row; ``BPR``: mean ``-log sigmoid(pos - neg)`` over them. Negatives equal to the target are left out.
    """
    if loss_type == "CE":
        return F.cross_entropy(scores[:, 1:], targets - 1)
    n_items = scores.size(1)
    negatives = torch.randint(1, n_items, (targets.size(0), n_negatives), device=scores.device)  # [N K]
    valid = negatives != targets.unsqueeze(1)  # [N K]
    positive = scores.gather(1, targets.unsqueeze(1))  # [N 1]
    negative = scores.gather(1, negatives)  # [N K]
    if loss_type == "InfoNCE":
        logits = torch.cat([positive, negative.masked_fill(~valid, float("-inf"))], dim=1)  # [N K+1]
        return F.cross_entropy(logits, torch.zeros_like(targets))
    if loss_type == "BPR":
        loss = -F.logsigmoid(positive - negative)  # [N K]
        return (loss * valid).sum() / valid.sum().clamp(min=1)
    raise ValueError(f"ranking_loss_type must be one of {', '.join(RANKING_LOSSES)}, got {loss_type!r}")
