"""The preference retriever: scores every item by matching a user's preference against item modality features.

The query of a position is the sum of projections of its sequence state, of the user's preference-text
embedding (a learned vector for users without text) and, optionally, of the mean of the user's recent states
(memory). Each item modality (text, image) has a :class:`~recbole_ur4rec.model.layers.moe.ModalityExperts`;
a cross-modal router mixes their scores, and an item without a modality is scored by the others only: its
row of that modality is never read.
"""
import torch
from torch import nn
from torch.nn import functional as F

from recbole_ur4rec.model.layers.moe import ModalityExperts, Router


class UserMemory(nn.Module):
    """The last ``size`` sequence states of every user (a ring buffer, saved with the model), read as their mean."""

    def __init__(self, n_users, size, hidden_size):
        super().__init__()
        self.register_buffer("states", torch.zeros(n_users, size, hidden_size))
        self.register_buffer("count", torch.zeros(n_users, dtype=torch.long))

    def read(self, users):
        """Mean of the stored states of ``users`` [B] -> [B H]; zeros for users with none."""
        filled = (torch.arange(self.states.size(1), device=users.device) < self.count[users].unsqueeze(1)).float()
        total = (self.states[users] * filled.unsqueeze(-1)).sum(1)  # [B H]
        return total / filled.sum(1, keepdim=True).clamp(min=1)

    @torch.no_grad()
    def write(self, users, states):
        """Store ``states`` [B H] (detached) as the newest memory of ``users`` [B]."""
        slot = self.count[users] % self.states.size(1)
        self.states[users, slot] = states.detach()
        self.count[users] += 1


class PreferenceRetriever(nn.Module):
    """Multi-modal, mixture-of-experts preference retriever.

    Args:
        hidden_size (int): size of the sequence states.
        user_text (AlignedFeatures): user preference-text store (features + mask over user ids).
        item_modalities (dict): modality name -> AlignedFeatures over item ids.
        dim (int): retriever size ``D``; n_sub, n_heads, n_proxies: experts per modality, proxy heads, proxies per head.
        temperature (float): divides the cosine scores.
        memory_size (int): recent states kept per user; 0 disables the memory.
        dropout (float): dropout on the frozen features before their projections.
    """

    def __init__(self, hidden_size, user_text, item_modalities, dim, n_sub, n_heads, n_proxies, temperature, memory_size, dropout):
        super().__init__()
        self.temperature = temperature
        self.modalities = list(item_modalities)
        # frozen features: recomputable from the feature cache, so not part of the state dict (see UR4Rec's NOTE)
        self.register_buffer("user_features", user_text.features, persistent=False)
        self.register_buffer("user_mask", user_text.mask, persistent=False)
        for name, store in item_modalities.items():
            self.register_buffer(f"{name}_features", store.features, persistent=False)
            self.register_buffer(f"{name}_mask", store.mask, persistent=False)
        self.state_proj = nn.Linear(hidden_size, dim)
        self.user_proj = nn.Sequential(nn.Dropout(dropout), nn.Linear(user_text.dim, dim))
        self.missing_user = nn.Parameter(torch.zeros(dim))
        self.memory = UserMemory(user_text.features.size(0), memory_size, hidden_size) if memory_size else None
        self.memory_proj = nn.Linear(hidden_size, dim) if memory_size else None
        self.query_norm = nn.LayerNorm(dim)
        self.experts = nn.ModuleDict(
            {
                name: ModalityExperts(dim, store.dim, dim, n_sub, n_heads, n_proxies, dropout)
                for name, store in item_modalities.items()
            }
        )
        self.modality_router = Router(dim, len(self.modalities))

    def user_view(self, users):
        """Projected preference text of ``users`` [B] -> [B D]; users without text get ``missing_user``."""
        has_text = self.user_mask[users].unsqueeze(-1)  # [B 1]
        return torch.where(has_text, self.user_proj(self.user_features[users]), self.missing_user)

    def item_mask(self):
        """Which items have each modality: [M n] bool."""
        return torch.stack([getattr(self, f"{name}_mask") for name in self.modalities])

    def forward(self, states, users, items=None):
        """Retriever scores of all items, or of the candidate ``items`` [K] only (then every ``n`` below reads ``K``),
        for sequence states ``states`` [B L H] (or [B H]) of ``users`` [B].

        Returns:
            dict: ``scores`` [.. n] (cosine mixtures / temperature), ``query`` [.. D], ``user_view`` [B D],
            ``modality_weights`` [.. M], ``sub_weights`` {modality: [.. S]}, ``expert_queries`` [.. E D] (every
            sub-expert of every modality), ``keys`` {modality: [S n D]}.
        """
        extra = (1,) * (states.dim() - 2)  # broadcast user-level vectors over positions
        user_view = self.user_view(users)  # [B D]
        query = self.state_proj(states) + user_view.view(user_view.size(0), *extra, -1)  # [.. D]
        if self.memory is not None:
            memory = self.memory_proj(self.memory.read(users))  # [B D]
            query = query + memory.view(memory.size(0), *extra, -1)
        query = self.query_norm(query)  # [.. D]

        modality_weights = self.modality_router(query)  # [.. M]
        item_mask = self.item_mask().float()  # [M n]
        if items is not None:
            item_mask = item_mask[:, items]  # [M K]
        numerator, sub_weights, expert_queries, keys = 0, {}, [], {}
        for m, name in enumerate(self.modalities):
            features = getattr(self, f"{name}_features")  # [n d]
            if items is not None:
                features = features[items]  # [K d]
            scores, sub_weights[name], queries, keys[name] = self.experts[name](query, features)  # [.. n]
            expert_queries.append(queries)
            numerator = numerator + modality_weights[..., m : m + 1] * item_mask[m] * scores
        # each item is scored by the modalities it has; an item with none scores 0
        denominator = modality_weights @ item_mask  # [.. n]
        scores = numerator / denominator.clamp(min=1e-6) / self.temperature  # [.. n]
        return {
            "scores": scores,
            "query": query,
            "user_view": user_view,
            "modality_weights": modality_weights,
            "sub_weights": sub_weights,
            "expert_queries": torch.cat(expert_queries, dim=-2),  # [.. E D]
            "keys": keys,
        }

    def state_view(self, states):
        """Projected sequence states [.. H] -> [.. D], the sequence side of the user-view consistency."""
        return self.state_proj(states)

    def remember(self, users, states):
        """Write the last states [B H] of ``users`` [B] to the memory (no-op without one)."""
        if self.memory is not None:
            self.memory.write(users, states)


def view_info_nce(anchors, positives, queue=None, temperature=0.1, groups=None):
    """InfoNCE of ``anchors`` [B D] against ``positives`` [B D]: in-batch negatives plus an optional ``queue`` [K D].

    Both sides are L2-normalised here; the queue is expected normalised already. ``groups`` [B] (e.g. user ids):
    other rows of the same group are not negatives (two windows of one user share its positive).
    """
    anchors, positives = F.normalize(anchors, dim=-1), F.normalize(positives, dim=-1)
    logits = anchors @ positives.t()  # [B B]
    labels = torch.arange(anchors.size(0), device=anchors.device)
    if groups is not None:
        same = (groups.unsqueeze(0) == groups.unsqueeze(1)) & (labels.unsqueeze(0) != labels.unsqueeze(1))  # [B B]
        logits = logits.masked_fill(same, float("-inf"))
    if queue is not None:
        logits = torch.cat([logits, anchors @ queue.t()], dim=1)  # [B B+K]
    return F.cross_entropy(logits / temperature, labels)


class MemoryBank(nn.Module):
    """MoCo-style FIFO queue of past (detached, normalised) positives; its first ``filled`` rows are valid."""

    def __init__(self, size, dim):
        super().__init__()
        self.register_buffer("queue", torch.zeros(size, dim))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def negatives(self):
        return self.queue[: int(self.filled)].clone()  # [K D], a copy: push() writes the queue in place

    @torch.no_grad()
    def push(self, keys):
        keys = F.normalize(keys.detach(), dim=-1)[-self.queue.size(0) :]  # [B D]
        index = (self.pointer + torch.arange(keys.size(0), device=keys.device)) % self.queue.size(0)
        self.queue[index] = keys
        self.pointer.copy_((self.pointer + keys.size(0)) % self.queue.size(0))
        self.filled.copy_(torch.clamp(self.filled + keys.size(0), max=self.queue.size(0)))
