"""Mixture-of-experts blocks of the preference retriever: proxy attention, routers, per-modality experts.

An expert matches a query against one item modality: the query goes through a projection and a multi-head
attention over learnable proxies (preference prototypes), the item features through their own projection;
both are L2-normalised and their dot product divided by a temperature is the expert's score.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F


class ProxyAttention(nn.Module):
    """Multi-head attention of a query over ``n_proxies`` learnable proxies per head, added to the query."""

    def __init__(self, dim, n_heads, n_proxies):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"retriever_dim ({dim}) must be a multiple of moe_heads ({n_heads})")
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.proxies = nn.Parameter(torch.randn(n_heads, n_proxies, self.head_dim) / math.sqrt(self.head_dim))

    def forward(self, x):
        heads = x.view(*x.shape[:-1], self.n_heads, self.head_dim)  # [.. nh dh]
        attention = torch.einsum("...hd,hpd->...hp", heads, self.proxies) / math.sqrt(self.head_dim)
        attended = torch.einsum("...hp,hpd->...hd", attention.softmax(-1), self.proxies)  # [.. nh dh]
        return (heads + attended).reshape(x.shape)  # [.. D]


class Router(nn.Module):
    """Softmax weights over ``n_experts`` from a query; a single expert gets weight 1 without parameters."""

    def __init__(self, dim, n_experts):
        super().__init__()
        self.n_experts = n_experts
        self.linear = nn.Linear(dim, n_experts) if n_experts > 1 else None

    def forward(self, x):
        if self.linear is None:
            return x.new_ones(*x.shape[:-1], 1)  # [.. 1]
        return self.linear(x).softmax(-1)  # [.. E]


def load_balance_loss(weights):
    """``E * sum_e mean(w_e)^2 - 1`` over the rows of ``weights`` [N E]: 0 when experts share the load equally."""
    if weights.size(-1) == 1:
        return weights.new_zeros(())
    importance = weights.reshape(-1, weights.size(-1)).mean(0)  # [E]
    return weights.size(-1) * importance.pow(2).sum() - 1


def expert_diversity_loss(queries):
    """Mean squared cosine between the query vectors of different experts; ``queries`` [N E D] (L2-normalised)."""
    n_experts = queries.size(1)
    if n_experts == 1:
        return queries.new_zeros(())
    similarity = queries @ queries.transpose(1, 2)  # [N E E]
    off_diagonal = ~torch.eye(n_experts, dtype=torch.bool, device=queries.device)
    return similarity[:, off_diagonal].pow(2).mean()


class ModalityExperts(nn.Module):
    """``n_sub`` experts scoring all items from one source of evidence, mixed by a router of their own.

    ``n_sub = 1`` is the flat MoE's single expert per modality; more make the first level of the hierarchical MoE.
    """

    def __init__(self, query_dim, feature_dim, dim, n_sub, n_heads, n_proxies, dropout):
        super().__init__()
        self.query_proj = nn.ModuleList(nn.Linear(query_dim, dim) for _ in range(n_sub))
        self.proxy_attention = nn.ModuleList(ProxyAttention(dim, n_heads, n_proxies) for _ in range(n_sub))
        self.key_proj = nn.ModuleList(
            nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, dim), nn.GELU(), nn.Linear(dim, dim))
            for _ in range(n_sub)
        )
        self.router = Router(query_dim, n_sub)

    def queries(self, query):
        """L2-normalised query of every sub-expert: [.. Q] -> [.. S D]."""
        return torch.stack(
            [F.normalize(attend(proj(query)), dim=-1) for proj, attend in zip(self.query_proj, self.proxy_attention)],
            dim=-2,
        )

    def keys(self, features):
        """L2-normalised item keys of every sub-expert: [n d] -> [S n D]."""
        return torch.stack([F.normalize(proj(features), dim=-1) for proj in self.key_proj])

    def forward(self, query, features):
        """The sub-experts' queries, their router's weights and their item keys. An expert's score of an item is
        ``sum_s weights[s] * <queries[s], keys[s, item]>``; the retriever mixes the experts' scores in one product.

        Returns:
            tuple: weights [.. S], queries [.. S D], keys [S n D].
        """
        return self.router(query), self.queries(query), self.keys(features)
