"""The preference retriever: scores every item by a mixture of experts over the user's preference and the items.

Two designs (``moe_design``):

- ``experts`` (the prototype's): one expert per source of evidence, each a
  :class:`~recbole_ur4rec.model.layers.moe.ModalityExperts`: ``user_preference`` matches the user's preference-text
  embedding against the item descriptions, ``item_description`` the sequence state against the item descriptions,
  ``item_id`` the sequence state against learned item-ID keys (items with training interactions only) and
  ``image`` the sequence state against the item images (when there are images). A router on the joint query (the
  sequence state, the user's preference text and the optional memory) mixes their scores per position.
- ``modality``: one expert per item modality (text, image), all reading the joint query; the user's preference text
  enters through the query only.

The sequence side is the projected sequence state plus, optionally, the mean of the user's recent states (memory);
users without text get a learned vector. An item is scored by the experts that have its evidence (its text, image
or training interactions): the rows of the others are never read.
"""
import torch
from torch import nn
from torch.nn import functional as F

from recbole_ur4rec.common import distributed
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


DESIGNS = ("experts", "modality")
EXPERTS = ("user_preference", "item_description", "item_id", "image")
EXPERT_EVIDENCE = {"user_preference": "text", "item_description": "text", "item_id": "id", "image": "image"}


class PreferenceRetriever(nn.Module):
    """Multi-modal, mixture-of-experts preference retriever.

    Args:
        hidden_size (int): size of the sequence states.
        user_text (AlignedFeatures): user preference-text store (features + mask over user ids).
        item_modalities (dict): modality name (``text``, ``image``) -> AlignedFeatures over item ids.
        dim (int): retriever size ``D``; n_sub, n_heads, n_proxies: sub-experts per expert, proxy heads, proxies per head.
        temperature (float): divides the cosine scores.
        memory_size (int): recent states kept per user; 0 disables the memory.
        dropout (float): dropout on the frozen features before their projections.
        design (str): ``experts`` or ``modality`` (module docstring).
        experts (list of str): ``design: experts``: the experts among EXPERTS (``image`` only where there are images).
        warm_items (torch.Tensor): ``item_id`` expert: bool [n], the items with training interactions.
    """

    def __init__(self, hidden_size, user_text, item_modalities, dim, n_sub, n_heads, n_proxies, temperature, memory_size,
                 dropout, design="modality", experts=EXPERTS, warm_items=None):
        super().__init__()
        self.temperature, self.design = temperature, design
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
        if design == "modality":
            self.expert_names = list(self.modalities)
            self.evidence = {name: name for name in self.modalities}
            self.experts = nn.ModuleDict(
                {
                    name: ModalityExperts(dim, store.dim, dim, n_sub, n_heads, n_proxies, dropout)
                    for name, store in item_modalities.items()
                }
            )
            self.modality_router = Router(dim, len(self.modalities))
            return
        self.expert_names = [name for name in experts if EXPERT_EVIDENCE[name] != "image" or "image" in item_modalities]
        if not self.expert_names:
            raise ValueError(f"config key 'moe_experts' names no expert this data has (text only, no images): {list(experts)}")
        self.evidence = {name: EXPERT_EVIDENCE[name] for name in self.expert_names}
        if "id" in self.evidence.values():
            self.id_keys = nn.Embedding(item_modalities["text"].features.size(0), dim)
            nn.init.normal_(self.id_keys.weight, std=0.02)
            self.register_buffer("id_mask", warm_items.clone(), persistent=False)
        feature_dim = {name: store.dim for name, store in item_modalities.items()}
        feature_dim["id"] = dim
        self.experts = nn.ModuleDict(
            {
                name: ModalityExperts(dim, feature_dim[self.evidence[name]], dim, n_sub, n_heads, n_proxies, dropout)
                for name in self.expert_names
            }
        )
        self.sequence_norm, self.user_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.expert_router = Router(dim, len(self.expert_names))

    def user_view(self, users):
        """Projected preference text of ``users`` [B] -> [B D]; users without text get ``missing_user``."""
        has_text = self.user_mask[users].unsqueeze(-1)  # [B 1]
        return torch.where(has_text, self.user_proj(self.user_features[users]), self.missing_user)

    def _evidence(self, name):
        """Features [n d] and mask [n] of an evidence source: ``text``, ``image`` or ``id``."""
        if name == "id":
            return self.id_keys.weight, self.id_mask
        return getattr(self, f"{name}_features"), getattr(self, f"{name}_mask")

    def item_mask(self):
        """Which items each expert scores: [E n] bool."""
        return torch.stack([self._evidence(self.evidence[name])[1] for name in self.expert_names])

    def forward(self, states, users, items=None):
        """Retriever scores of all items, or of the candidate ``items`` [K] only (then every ``n`` below reads ``K``),
        for sequence states ``states`` [B L H] (or [B H]) of ``users`` [B].

        Returns:
            dict: ``scores`` [.. n] (cosine mixtures / temperature), ``query`` [.. D] (the joint query),
            ``user_view`` [B D], ``expert_weights`` [.. E], ``sub_weights`` {expert: [.. S]}, ``expert_queries``
            [.. E*S D] (every sub-expert of every expert), ``keys`` {expert: [S n D]}.
        """
        extra = (1,) * (states.dim() - 2)  # broadcast user-level vectors over positions
        user_view = self.user_view(users)  # [B D]
        sequence = self.state_proj(states)  # [.. D]
        if self.memory is not None:
            memory = self.memory_proj(self.memory.read(users))  # [B D]
            sequence = sequence + memory.view(memory.size(0), *extra, -1)
        user = user_view.view(user_view.size(0), *extra, -1)  # [B 1.. D]
        query = self.query_norm(sequence + user)  # [.. D]
        if self.design == "modality":
            router, expert_query = self.modality_router, {name: query for name in self.expert_names}
        else:
            sequence_query, user_query = self.sequence_norm(sequence), self.user_norm(user).expand_as(query)
            router = self.expert_router
            expert_query = {name: user_query if name == "user_preference" else sequence_query for name in self.expert_names}

        expert_weights = router(query)  # [.. E]
        item_mask = self.item_mask().float()  # [E n]
        if items is not None:
            item_mask = item_mask[:, items]  # [E K]
        # The mixture sum_e w_e mask_e[i] sum_s w_es <q_es, k_es[i]> as one product of the weighted queries
        # [.. E*S*D] with the masked keys [n E*S*D]: no [.. n] score matrix per expert.
        weighted_queries, masked_keys, sub_weights, expert_queries, keys = [], [], {}, [], {}
        for e, name in enumerate(self.expert_names):
            features = self._evidence(self.evidence[name])[0]  # [n d]
            if items is not None:
                features = features[items]  # [K d]
            sub_weights[name], queries, keys[name] = self.experts[name](expert_query[name], features)  # [.. S], [.. S D], [S n D]
            expert_queries.append(queries)
            weight = expert_weights[..., e : e + 1] * sub_weights[name]  # [.. S]
            weighted_queries.append((weight.unsqueeze(-1) * queries).flatten(-2))  # [.. S*D]
            masked_keys.append((keys[name] * item_mask[e].view(1, -1, 1)).transpose(0, 1).flatten(1))  # [n S*D]
        numerator = torch.cat(weighted_queries, dim=-1) @ torch.cat(masked_keys, dim=-1).t()  # [.. n]
        # each item is scored by the experts that have its evidence; an item with none scores 0
        denominator = expert_weights @ item_mask  # [.. n]
        scores = numerator / (denominator.clamp(min=1e-6) * self.temperature)  # [.. n]
        return {
            "scores": scores,
            "query": query,
            "user_view": user_view,
            "expert_weights": expert_weights,
            "sub_weights": sub_weights,
            "expert_queries": torch.cat(expert_queries, dim=-2),  # [.. E*S D]
            "keys": keys,
        }

    def content_keys(self, keys):
        """(text keys, image keys) [S n D] of the experts that read the item descriptions and the images, or None
        when one of them is missing (the modality consistency of text and image keys)."""
        text = next((keys[name] for name in self.expert_names if self.evidence[name] == "text" and name != "user_preference"), None)
        image = next((keys[name] for name in self.expert_names if self.evidence[name] == "image"), None)
        return None if text is None or image is None else (text, image)

    def state_view(self, states):
        """Projected sequence states [.. H] -> [.. D], the sequence side of the user-view consistency."""
        return self.state_proj(states)

    def remember(self, users, states):
        """Write the last states [B H] of ``users`` [B] to the memory (no-op without one)."""
        if self.memory is not None:
            self.memory.write(users, states)


def view_info_nce(anchors, positives, queue=None, temperature=0.1, groups=None, across_ranks=False):
    """InfoNCE of ``anchors`` [B D] against ``positives`` [B D]: in-batch negatives plus an optional ``queue`` [K D].

    Both sides are L2-normalised here; the queue is expected normalised already. ``groups`` [B] (e.g. user ids):
    other rows of the same group are not negatives (two windows of one user share its positive). ``across_ranks``:
    in a distributed run the negatives are the positives of every rank's rows (the whole batch, as in one process);
    every rank must then call this, with or without rows.
    """
    anchors, positives = F.normalize(anchors, dim=-1), F.normalize(positives, dim=-1)
    start, across_ranks = 0, across_ranks and distributed.is_distributed()
    if across_ranks:
        positives, start = distributed.gather_rows(positives)  # [B' D]
        groups = distributed.gather_rows(groups)[0] if groups is not None else None
    logits = anchors @ positives.t()  # [B B']
    labels = start + torch.arange(anchors.size(0), device=anchors.device)  # [B] each anchor's positive
    if groups is not None:
        rows = groups[start : start + anchors.size(0)]  # [B] the anchors' groups
        columns = torch.arange(positives.size(0), device=anchors.device)
        same = (rows.unsqueeze(1) == groups.unsqueeze(0)) & (labels.unsqueeze(1) != columns.unsqueeze(0))  # [B B']
        logits = logits.masked_fill(same, float("-inf"))
    if queue is not None:
        logits = torch.cat([logits, anchors @ queue.t()], dim=1)  # [B B'+K]
    if not across_ranks:
        return F.cross_entropy(logits / temperature, labels)
    # the whole batch's mean; the gathered rows stay in the graph on a rank without rows (its backward is collective)
    return distributed.batch_mean(F.cross_entropy(logits / temperature, labels, reduction="none")) + positives.sum() * 0


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
