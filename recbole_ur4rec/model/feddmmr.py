r"""
FedDMMR
################################################
Reference:
    Wang-Cheng Kang and Julian McAuley. "Self-Attentive Sequential Recommendation." In ICDM 2018 (the backbone).
    Noam Shazeer et al. "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer." In ICLR 2017
    (router and load-balance loss).
    Brendan McMahan et al. "Communication-Efficient Learning of Deep Networks from Decentralized Data." In AISTATS 2017
    (FedAvg, in :class:`~recbole_ur4rec.trainer.FedDMMRTrainer`).

FedDMMR (the prototype described in docs/design.md, section FedDMMR): a SASRec backbone plus a visual expert (CLIP
item features) and a semantic expert (item-text features), each scoring all items from the sequence state, mixed by
a router, and fused with the backbone either by residual enhancement or by a competitive mixture. Trained federated
(one client per user) by :class:`~recbole_ur4rec.trainer.FedDMMRTrainer`, or centrally with ``federated: False``.
"""
import warnings
from logging import getLogger

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn
from torch.nn import functional as F

from recbole_ur4rec.common.checks import check_config_value as _check
from recbole_ur4rec.data.sequence_dataset import target_list_field
from recbole_ur4rec.features import item_image_features, item_text_features, stores_fingerprint
from recbole_ur4rec.federated.functional import MethodCall
from recbole_ur4rec.model.layers import SampledCandidates, SequenceBackbone, load_balance_loss, supervised_count, supervised_positions
from recbole_ur4rec.model.layers.moe import Router
from recbole_ur4rec.model.layers.staged import FeatureFingerprintMixin

FUSIONS = ("residual", "competitive")
FEDDMMR_LOSS_TYPES = ("CE", "SSM")
PARTIAL_AGGREGATION_GROUPS = ("experts", "router", "gate")  # kept local by partial aggregation without local_groups


class ItemExpert(nn.Module):
    """Scores every item from a sequence state against frozen item features of one modality.

    score(state, item) = cos(W_q state, MLP(feature_item)) / temperature; items without the modality (``mask``
    False) score exactly 0, so the expert adds nothing to them.
    """

    def __init__(self, hidden_size, features, mask, dim, temperature, dropout):
        super().__init__()
        self.register_buffer("features", features.float(), persistent=False)  # [n d], rebuilt from the cache
        self.register_buffer("mask", mask.bool(), persistent=False)  # [n]
        self.temperature = temperature
        self.query = nn.Linear(hidden_size, dim)
        self.key = nn.Sequential(nn.Dropout(dropout), nn.Linear(features.size(1), dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, states, items=None):
        """Scores of every item, or of the candidate ``items`` [K] only: [.. n] or [.. K]."""
        features, mask = (self.features, self.mask) if items is None else (self.features[items], self.mask[items])
        keys = F.normalize(self.key(features), dim=-1)  # [n D] or [K D]
        scores = F.normalize(self.query(states), dim=-1) @ keys.t() / self.temperature  # [.. n] or [.. K]
        return scores.masked_fill(~mask, 0.0)


class FedDMMR(FeatureFingerprintMixin, SequentialRecommender):
    r"""SASRec backbone + visual and semantic item experts with a router; residual or competitive fusion.

    - ``residual``: ``score = backbone + g * (w_vis * visual + w_sem * semantic)``, ``g`` a learnable scalar
      initialised from ``gating_init``, ``(w_vis, w_sem)`` the router's softmax over the available experts;
    - ``competitive``: ``score = w_seq * backbone + w_vis * visual + w_sem * semantic``, the router's softmax over
      the backbone and the available experts.

    The router reads the sequence state at each position; ``load_balance_weight`` weighs its load-balance loss.
    A modality that is not configured has no expert; with none, the scores are exactly the backbone's.

    NOTE:
        Deviations from the prototype (see docs/design.md, section FedDMMR):

        - The backbone is :class:`~recbole_ur4rec.model.layers.SequenceBackbone` with a loss at every position of
          whole-sequence rows (``loss_position: all``): ``CE`` (full softmax of the fused scores, padding left out) or
          ``SSM`` (sampled softmax against ``neg_sample_num`` uniform negatives shared by the batch: the experts then
          encode only the batch's targets and negatives, so a client step costs O(batch), not O(items)).
        - Experts are cosine scorers (query projection of the state, MLP of the frozen item features, divided by
          ``expert_temperature``); an item that lacks a modality gets 0 from that expert (no renormalisation of the
          router weights per item).
        - Parameters of the groups in ``local_groups`` (``router``, ``gate``, ...; see ``parameter_groups``) have a
          per-user copy in buffers ``local__<name>`` ([n_users, ...]); once the trainer sets ``local_active``, every
          prediction for user ``u`` uses the global weights with user ``u``'s copies of those parameters. With
          ``partial_aggregation_warmup_rounds`` > 0 and no ``local_groups``, the groups of PARTIAL_AGGREGATION_GROUPS
          that have parameters (the experts, the router and the gate: how each user weighs the modalities) are local.
    """

    input_type = InputType.POINTWISE  # no negatives from RecBole's sampler
    FEATURE_HINT = "use_text, use_image and the feature settings"

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self._check_config(config)
        self.loss_position = config["loss_position"]
        self.TARGET_SEQ = target_list_field(config)
        self.fusion = config["fusion"]
        self.loss_type = config["loss_type"]
        self.neg_sample_num = config["neg_sample_num"]
        self.load_balance_weight = float(config["load_balance_weight"])
        self.n_users = dataset.num(self.USER_ID)

        self.backbone = SequenceBackbone.from_config(config, self.n_items, self.max_seq_length)
        stores = self._feature_stores(config, getattr(dataset, "training_split", dataset))
        self.modalities = list(stores)  # subset of ["visual", "semantic"], in that order
        self.feature_fingerprint = stores_fingerprint(stores) if stores else ""
        self.other_parameter_name = ["feature_fingerprint"]
        self.experts = nn.ModuleDict(
            {
                name: ItemExpert(
                    config["hidden_size"], store.features, store.mask, config["expert_dim"],
                    config["expert_temperature"], config["expert_dropout"],
                )
                for name, store in stores.items()
            }
        )
        n_routed = len(self.modalities) + (1 if self.fusion == "competitive" else 0)
        self.router = Router(config["hidden_size"], max(n_routed, 1))
        self.gate = nn.Parameter(torch.tensor(float(config["gating_init"])))

        groups = self.parameter_groups()
        self.local_groups = list(config["local_groups"] or [])
        if not self.local_groups and config["partial_aggregation_warmup_rounds"] > 0:
            # partial aggregation without named groups: the multimodal part of the model becomes personal
            self.local_groups = [g for g in PARTIAL_AGGREGATION_GROUPS if groups[g]]
            getLogger().info(
                f"partial_aggregation_warmup_rounds is {config['partial_aggregation_warmup_rounds']} and local_groups is "
                f"empty: {', '.join(self.local_groups)} stay on the clients after the warm-up"
            )
        unknown = [g for g in self.local_groups if g not in groups]
        if unknown:
            raise ValueError(f"config key 'local_groups' names unknown groups {unknown}; the groups are {', '.join(groups)}")
        name_of = {id(p): n for n, p in self.named_parameters()}
        self.local_names = [name_of[id(p)] for g in self.local_groups for p in groups[g]]
        self.register_buffer("local_active", torch.tensor(False))
        for name in self.local_names if self.n_users else []:  # per-user copies, filled by the trainer when partial
            param = self.get_parameter(name)  # aggregation starts (none on a federated server: they stay on the nodes)
            self.register_buffer(self.local_buffer(name), param.detach().unsqueeze(0).repeat(self.n_users, *[1] * param.dim()))

    @staticmethod
    def local_buffer(name):
        return "local__" + name.replace(".", "__")

    def _check_config(self, config):
        # the backbone's keys, loss_position and train_neg_sample_args: SequenceBackbone.from_config
        _check(config, "expert_dim", int, low=1)
        _check(config, "expert_dropout", (int, float), low=0, high=1, high_open=True)
        _check(config, "expert_temperature", (int, float), low=0, low_open=True)
        _check(config, "load_balance_weight", (int, float), low=0)
        _check(config, "gating_init", (int, float))
        _check(config, "fusion", None, choices=FUSIONS)
        _check(config, "use_text", None, choices=(True, False))
        _check(config, "use_image", None, choices=(True, False))
        _check(config, "loss_type", None, choices=FEDDMMR_LOSS_TYPES)
        if config["loss_type"] == "SSM":
            _check(config, "neg_sample_num", int, low=1)
        _check(config, "partial_aggregation_warmup_rounds", int, 0)
        local = config["local_groups"]
        if local is not None and (not isinstance(local, list) or not all(isinstance(g, str) for g in local)):
            raise ValueError(f"config key 'local_groups' must be a list of parameter group names, got {local!r}")

    @staticmethod
    def _feature_stores(config, train_dataset):
        """{'visual': item image store, 'semantic': item text store}, as configured (``use_image``, ``use_text``)."""
        stores = {}
        if config["use_image"]:
            image = item_image_features(config, train_dataset)
            if image is None:
                raise ValueError(
                    "config key 'use_image' is True but no image features are configured: "
                    "set image_feature_file (precomputed CLIP features) or poster_dir (posters to encode)"
                )
            stores["visual"] = image
        if config["use_text"]:
            stores["semantic"] = item_text_features(config, train_dataset)
        return stores

    def parameter_groups(self):
        """Named parameter groups (``local_groups`` chooses among them; every parameter is in exactly one)."""
        return {
            **self.backbone.parameter_groups(),
            "experts": list(self.experts.parameters()),
            "router": list(self.router.parameters()),
            "gate": [self.gate],
        }

    # ---- scoring -------------------------------------------------------------------------------------------------
    def forward(self, item_seq, item_seq_len):
        return self.backbone(item_seq, item_seq_len)  # [B L H]

    def fuse(self, states, items=None):
        """Scores from sequence states [.. H] of all items, or of the candidates ``items`` [K] only:
        (fused [.. n|K], router weights [.. E], backbone [.. n|K])."""
        item_weight = self.backbone.item_embedding.weight
        backbone = states @ (item_weight if items is None else item_weight[items]).t()  # [.. n|K]
        weights = self.router(states)  # [.. E]
        if not self.modalities:
            return backbone, weights, backbone
        experts = [self.experts[name](states, items) for name in self.modalities]  # each [.. n|K]
        if self.fusion == "competitive":
            experts = [backbone] + experts
        mixture = sum(weights[..., e : e + 1] * scores for e, scores in enumerate(experts))  # [.. n]
        if self.fusion == "residual":
            mixture = backbone + self.gate * mixture
        return mixture, weights, backbone

    def sampled_logits(self, states, targets, candidates):
        """SSM logits [N 1+K] of positions ``states`` [N H]: the target's fused score, then those of the batch's shared
        negatives (a :class:`SampledCandidates`; a negative equal to the target scores -inf); and the router
        weights [N E]. Only the candidates are scored."""
        scores, weights, _ = self.fuse(states, candidates.items)  # [N U]
        return candidates.logits(scores), weights

    def _loss(self, states, targets):
        """The loss (``loss_type``) of supervised positions ``states`` [N H] with ``targets`` [N] + the weighted
        load-balance loss."""
        if self.loss_type == "SSM":
            candidates = SampledCandidates(targets, self.n_items, self.neg_sample_num)
            logits, weights = self.sampled_logits(states, targets, candidates)
            loss = F.cross_entropy(logits, torch.zeros_like(targets))
        else:
            scores, weights, _ = self.fuse(states)  # [N n]
            loss = F.cross_entropy(scores[:, 1:], targets - 1)  # padding left out
        if self.load_balance_weight and self.modalities:
            loss = loss + self.load_balance_weight * load_balance_loss(weights)
        return loss

    loss_units = supervised_count  # what the loss averages over (a distributed run's gradient weights)

    def calculate_loss(self, interaction):
        hidden = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])  # [B L H]
        states, targets, _ = supervised_positions(self, interaction, hidden)  # [N H], [N]
        return self._loss(states, targets)

    def dense_loss(self, item_seq, targets):
        """The loss of whole-sequence rows without data-dependent shapes (for ``torch.func.vmap`` over clients).

        ``item_seq`` and ``targets`` are [R L] (targets 0 at padding; rows of padding only are allowed); the mean
        is over the real positions, as :meth:`calculate_loss` with ``loss_position: all`` computes it. CE only
        (SSM's candidate set has a data-dependent shape): the batched engine, its caller, refuses SSM when it is built.
        """
        width = torch.full((1,), item_seq.size(1), dtype=torch.long, device=item_seq.device)  # not batched
        states = self.backbone(item_seq, width)  # [R L H]
        scores, weights, _ = self.fuse(states)  # [R L n]
        mask = (targets > 0).float()  # [R L]
        ce = F.cross_entropy(scores[..., 1:].flatten(0, 1), (targets - 1).clamp(min=0).flatten(), reduction="none")
        loss = (ce * mask.flatten()).sum() / mask.sum().clamp(min=1)
        if self.load_balance_weight and self.modalities:
            importance = (weights * mask.unsqueeze(-1)).sum((0, 1)) / mask.sum().clamp(min=1)  # [E]
            if weights.size(-1) > 1:
                loss = loss + self.load_balance_weight * (weights.size(-1) * importance.pow(2).sum() - 1)
        return loss

    def _last_scores(self, interaction):
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        item_seq = interaction[self.ITEM_SEQ][:, : int(item_seq_len.max())]
        if self.local_names and bool(self.local_active):
            return self._personal_scores(item_seq, item_seq_len, interaction[self.USER_ID])
        last = self.backbone.gather_last(self.forward(item_seq, item_seq_len), item_seq_len)  # [B H]
        return self.fuse(last)[0]  # [B n]

    def _personal_scores(self, item_seq, item_seq_len, users):
        """Scores with each user's own copy of the local parameters: vmap over the rows of the batch."""
        rows = {name: getattr(self, self.local_buffer(name))[users] for name in self.local_names}  # each [B ..]

        def one(params, seq, length):
            return torch.func.functional_call(MethodCall(self), params, ("_row_scores", seq, length), strict=False)

        with warnings.catch_warnings():  # attention has no vmap batching rule on CPU: torch loops over rows there
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            return torch.func.vmap(one)({"model." + k: v for k, v in rows.items()}, item_seq, item_seq_len)  # [B n]

    def _row_scores(self, seq, length):
        """Scores of all items for one row ``seq`` [L] with ``length`` valid items: [n] (vmap-friendly)."""
        width = torch.full((1,), seq.size(0), dtype=torch.long, device=seq.device)  # not batched
        hidden = self.backbone(seq.unsqueeze(0), width)  # [1 L H]
        return self.fuse(self.backbone.gather_last(hidden, length.view(1)))[0].squeeze(0)  # [n]

    def predict(self, interaction):
        scores = self._last_scores(interaction)  # [B n]
        return scores.gather(1, interaction[self.ITEM_ID].unsqueeze(1)).squeeze(1)  # [B]

    def full_sort_predict(self, interaction):
        return self._last_scores(interaction)  # [B n]

    @torch.no_grad()
    def routing(self, interaction):
        """Mean router weights and the gate at the last positions of ``interaction`` (for logs)."""
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        last = self.backbone.gather_last(self.forward(interaction[self.ITEM_SEQ], item_seq_len), item_seq_len)
        weights = self.router(last).mean(0).tolist()
        names = (["sequence"] if self.fusion == "competitive" else []) + self.modalities
        return {"gate": float(self.gate), **{f"w_{name}": w for name, w in zip(names, weights)}}
