r"""
UR4Rec
################################################
Reference:
    Wang-Cheng Kang and Julian McAuley. "Self-Attentive Sequential Recommendation." In ICDM 2018 (the backbone).
    Noam Shazeer et al. "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer." In ICLR 2017.
    Kaiming He et al. "Momentum Contrast for Unsupervised Visual Representation Learning." In CVPR 2020 (memory bank).
    Geoffrey Hinton et al. "Distilling the Knowledge in a Neural Network." arXiv:1503.02531, 2015.
    Jeremy Howard and Sebastian Ruder. "Universal Language Model Fine-tuning for Text Classification." In ACL 2018
    (progressive unfreezing, in :class:`~recbole_ur4rec.trainer.UR4RecTrainer`).
    Ziwei Zhu et al. "Recommendation for New Users and New Items via Randomized Training and Mixture-of-Experts
    Transformation." In SIGIR 2020 (Heater; ``cold_mapping_loss: mse``).
    Maksims Volkovs, Guangwei Yu and Tomi Poutanen. "DropoutNet: Addressing Cold Start in Recommender Systems."
    In NeurIPS 2017 (``cold_mapping_loss: ranking``).

UR4Rec (the prototype described in docs/design.md, section UR4Rec): a SASRec backbone plus a preference retriever
that scores every item by matching the user's preference text and sequence state against frozen item-description
(and optionally CLIP image) embeddings through a mixture of experts, fused with the backbone's scores.
Trained in stages by :class:`~recbole_ur4rec.trainer.UR4RecTrainer`.
"""
import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from recbole_ur4rec.common import distributed
from recbole_ur4rec.common.checkpoint_io import load_module_weights, load_checkpoint, resolve_checkpoint_path
from recbole_ur4rec.common.checks import check_config_value as _check
from recbole_ur4rec.data.sequence_dataset import target_list_field
from recbole_ur4rec.evaluation.slices import items_with_training_interactions
from recbole_ur4rec.features import load_features, stores_fingerprint
from recbole_ur4rec.model.layers import (
    ITEM_TEXT_MODES,
    RANKING_LOSSES,
    MemoryBank,
    PreferenceRetriever,
    SampledCandidates,
    ScoreFusion,
    WARM_START_MATCH,
    SequenceBackbone,
    bidirectional_distillation,
    expert_diversity_loss,
    load_balance_loss,
    ranking_loss,
    supervised_count,
    supervised_positions,
    view_info_nce,
)
from recbole_ur4rec.model.layers.retriever import DESIGNS, EXPERTS
from recbole_ur4rec.model.layers.staged import FeatureFingerprintMixin, StagedModelMixin

OBJECTIVES = ("backbone", "retriever", "fused")
MOE_TYPES = ("flat", "hierarchical")
CONTRASTIVE_TYPES = ("in_batch", "memory_bank")
# every loss term and the config key of its weight
LOSS_WEIGHT_KEYS = {
    "rank": "ranking_weight",
    "rank_backbone": "part_loss_weight",
    "rank_retriever": "part_loss_weight",
    "consistency": "consistency_weight",
    "contrastive": "contrastive_weight",
    "diversity": "diversity_weight",
    "load_balance": "load_balance_weight",
    "distillation": "distillation_weight",
    "cold_mapping": "cold_mapping_weight",
}


class UR4Rec(StagedModelMixin, FeatureFingerprintMixin, SequentialRecommender):
    r"""SASRec backbone + multi-modal mixture-of-experts preference retriever, fused; ``set_objective`` picks what
    :meth:`calculate_loss` trains and predicts with (backbone, retriever or fused scores; set per stage).

    NOTE:
        Deviations from the prototype (see docs/design.md, section UR4Rec):

        - Every position of whole-sequence rows is trained (``loss_position: all``); ``InfoNCE`` and ``BPR`` score
          only the targets and ``ranking_negatives`` negatives shared by the batch.
        - Text and CLIP embeddings are frozen buffers rebuilt from the feature cache; a checkpoint records their
          fingerprint and refuses to load on other features.
        - The preference text comes from the training split; ``user_text_recent_items: 0`` keeps the last training
          targets out of it. The memory bank is MoCo's queue without the momentum encoder.
        - Items without a training interaction are scored by the backbone through a linear map from their text
          embedding (``cold_item_mapping``), trained as Heater (``cold_mapping_loss: mse``) or DropoutNet (``ranking``).
    """

    input_type = InputType.POINTWISE  # negatives are sampled inside the model, not by RecBole
    OBJECTIVES = OBJECTIVES
    FEATURE_HINT = "item_text_template, user text and image settings, and the text encoder"

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self._check_config(config)
        self.loss_position = config["loss_position"]
        self.TARGET_SEQ = target_list_field(config)
        self.ranking_loss_type = config["ranking_loss_type"]
        self.ranking_negatives = config["ranking_negatives"]
        self.contrastive_temperature = config["contrastive_temperature"]
        self.distillation_temperature = config["distillation_temperature"]
        self.loss_weights = {name: float(config[key]) for name, key in LOSS_WEIGHT_KEYS.items()}
        self.objective = "fused"

        self.backbone = SequenceBackbone.from_config(config, self.n_items, self.max_seq_length)
        # user text must come from RecBole's training split, not from the whole-sequence rows built from it
        stores = load_features(config, getattr(dataset, "training_split", dataset))
        item_modalities = {"text": stores["item_text"]}
        if config["use_image"]:
            if "item_image" not in stores:
                raise ValueError(
                    "config key 'use_image' is True but no image features are configured: "
                    "set image_feature_file (precomputed CLIP features) or poster_dir (posters to encode)"
                )
            item_modalities["image"] = stores["item_image"]
        self.feature_fingerprint = stores_fingerprint({"user_text": stores["user_text"], **item_modalities})
        self.other_parameter_name = ["objective", "feature_fingerprint"]
        dim = config["retriever_dim"]
        warm = items_with_training_interactions(getattr(dataset, "training_split", dataset))  # [n]
        text = stores["item_text"]
        self.backbone.use_item_text(text.features, text.mask, warm, config["item_text_embedding"])
        self.retriever = PreferenceRetriever(
            hidden_size=config["hidden_size"],
            user_text=stores["user_text"],
            item_modalities=item_modalities,
            dim=dim,
            n_sub=config["num_sub_experts"] if config["moe_type"] == "hierarchical" else 1,
            n_heads=config["moe_heads"],
            n_proxies=config["moe_proxies"],
            temperature=config["retriever_temperature"],
            memory_size=config["memory_size"],
            dropout=config["retriever_dropout"],
            design=config["moe_design"],
            experts=config["moe_experts"],
            warm_items=warm,
        )
        self.fusion = ScoreFusion(
            config["fusion_type"], config["fusion_weight"], config["hidden_size"] + dim, config["fusion_calibration"]
        )
        use_bank = config["contrastive_type"] == "memory_bank"
        self.memory_bank = MemoryBank(config["memory_bank_size"], dim) if use_bank else None
        self.cold_mapping, self.cold_mapping_loss, self.cold_mapping_share = None, config["cold_mapping_loss"], config["cold_mapping_share"]
        if config["cold_item_mapping"]:
            self.cold_mapping = torch.nn.Linear(text.features.size(1), config["hidden_size"])
            unseen = ~warm
            unseen[0] = False  # padding
            self.register_buffer("mapped_items", unseen & text.mask, persistent=False)  # [n] scored by the map
        self.warm_started = None  # the backbone_checkpoint loaded, if any
        if config["backbone_checkpoint"]:
            self._warm_start(resolve_checkpoint_path(config["backbone_checkpoint"], config["seed"], "backbone_checkpoint"), config["dataset"])

    def _warm_start(self, path, dataset_name):
        """Load the backbone of the checkpoint ``path``, and its cold-item map when it has one (a UR4Rec run's)."""
        state = load_checkpoint(path)
        advice = f"Train it on {WARM_START_MATCH}"
        load_module_weights(self.backbone, path, "backbone_checkpoint", dataset_name, advice=advice, state=state)
        if self.cold_mapping is not None and any(name.startswith("cold_mapping.") for name in state.get("state_dict", {})):
            load_module_weights(self.cold_mapping, path, "backbone_checkpoint", dataset_name, "cold_mapping.", advice, state)
        self.warm_started = path

    def _check_config(self, config):
        # the backbone's keys, loss_position and train_neg_sample_args: SequenceBackbone.from_config
        for key in ("retriever_dim", "moe_heads", "moe_proxies", "num_sub_experts", "ranking_negatives", "memory_bank_size"):
            _check(config, key, int, low=1)
        _check(config, "memory_size", int, low=0)
        _check(config, "retriever_dropout", (int, float), low=0, high=1, high_open=True)
        for key in ("retriever_temperature", "contrastive_temperature", "distillation_temperature"):
            _check(config, key, (int, float), low=0, low_open=True)
        for key in sorted(set(LOSS_WEIGHT_KEYS.values())):
            _check(config, key, (int, float), low=0)
        _check(config, "fusion_weight", (int, float), low=0)
        _check(config, "ranking_loss_type", None, choices=RANKING_LOSSES)
        _check(config, "moe_type", None, choices=MOE_TYPES)
        _check(config, "moe_design", None, choices=DESIGNS)
        experts = config["moe_experts"]
        if not isinstance(experts, list) or not experts or any(name not in EXPERTS for name in experts) or len(set(experts)) < len(experts):
            raise ValueError(f"config key 'moe_experts' must be a non-empty list of distinct experts among {', '.join(EXPERTS)}, got {experts!r}")
        _check(config, "contrastive_type", None, choices=CONTRASTIVE_TYPES)
        _check(config, "use_image", None, choices=(True, False))
        _check(config, "cold_item_mapping", None, choices=(True, False))
        _check(config, "item_text_embedding", None, choices=ITEM_TEXT_MODES)
        if config["item_text_embedding"] == "tied" and config["cold_item_mapping"]:
            raise ValueError(
                "config keys 'item_text_embedding' = tied and 'cold_item_mapping' = True both score new items by their "
                "text: with tied item text set cold_item_mapping: False"
            )
        _check(config, "cold_mapping_loss", None, choices=("mse", "ranking"))
        _check(config, "cold_mapping_share", (int, float), low=0, high=1, low_open=True)
        path = config["backbone_checkpoint"]
        if path is not None and not isinstance(path, str):
            raise ValueError(f"config key 'backbone_checkpoint' must be a path to a plugin checkpoint or ~, got {path!r}")

    def parameter_groups(self):
        """Named parameter groups the trainer freezes, unfreezes and clips separately."""
        groups = {
            **self.backbone.parameter_groups(),
            "retriever": list(self.retriever.parameters()),
            "fusion": list(self.fusion.parameters()),
        }
        groups["cold_mapping"] = [] if self.cold_mapping is None else list(self.cold_mapping.parameters())
        return groups

    def _scoring_items(self):
        """The item embeddings the backbone scores with [n H]: at evaluation, items without a training interaction
        take their mapped text embedding (``cold_item_mapping``)."""
        weight = self.backbone.output_items()
        if self.cold_mapping is None or self.training or not bool(self.mapped_items.any()):
            return weight
        mapped = self.cold_mapping(self.retriever.text_features[self.mapped_items])  # [m H]
        return weight.index_put((self.mapped_items.nonzero().squeeze(1),), mapped)

    def _cold_mapping_term(self, targets, states, backbone_scores):
        """The text map's loss (``cold_mapping_loss``): ``mse`` of the mapped text of the batch's (warm) target items
        to their detached ID embeddings; ``ranking``: a random ``cold_mapping_share`` of the items with text are
        taken as new (scored through the map, every other item through its ID embedding) and the cross-entropy of
        every row is minimised (``states`` [N H] and ``backbone_scores`` [N n|U] detached). Every row counts, so
        mapped items learn to lose where they are not the target; drawn at random, not from the batch's targets,
        they do not stand for likely next items."""
        if self.cold_mapping is None:
            return None
        zero = self.backbone.item_embedding.weight.new_zeros(())
        if self.cold_mapping_loss == "mse":
            items = torch.unique(targets)
            items = items[self.retriever.text_mask[items]]
            if not len(items):
                return zero
            mapped = self.cold_mapping(self.retriever.text_features[items])  # [m H]
            return torch.nn.functional.mse_loss(mapped, self.backbone.item_embedding.weight[items].detach())
        simulated = self.retriever.text_mask & (torch.rand(self.n_items, device=targets.device) < self.cold_mapping_share)  # [n]
        items = simulated.nonzero().squeeze(1)  # [m]
        if not len(items):
            return zero
        if backbone_scores.size(1) != self.n_items:  # sampled candidates: every item by its ID embedding first
            backbone_scores = states @ self.backbone.item_embedding.weight.t()
        through_map = states.detach() @ self.cold_mapping(self.retriever.text_features[items]).t()  # [N m]
        scores = backbone_scores.detach().index_copy(1, items, through_map)  # [N n]
        return torch.nn.functional.cross_entropy(scores, targets)  # every row: mapped items are negatives too

    def forward(self, item_seq, item_seq_len):
        return self.backbone(item_seq, item_seq_len)  # [B L H]

    def _rank(self, scores, targets, candidates):
        return ranking_loss(scores, targets, self.ranking_loss_type, candidates)

    loss_units = supervised_count  # what the loss averages over (a distributed run's gradient weights)

    def loss_terms(self, interaction):
        """Unweighted loss terms of the current objective (a dict of scalar tensors); see ``LOSS_WEIGHT_KEYS``.

        CE scores every item at every position; InfoNCE and BPR score only the batch's targets and its
        ``ranking_negatives`` shared negatives (:class:`SampledCandidates`), so their cost grows with the batch.
        """
        item_seq_len = interaction[self.ITEM_SEQ_LEN]  # [B]
        hidden = self.forward(interaction[self.ITEM_SEQ], item_seq_len)  # [B L H]
        states, targets, users = supervised_positions(self, interaction, hidden)  # [N H], [N], [N]
        candidates, items = None, None
        if self.ranking_loss_type != "CE":
            candidates = SampledCandidates(targets, self.n_items, self.ranking_negatives)
            items = candidates.items  # [U]
        item_weight = self.backbone.output_items()
        backbone_scores = states @ (item_weight if items is None else item_weight[items]).t()  # [N n|U]
        mapping = self._cold_mapping_term(targets, states, backbone_scores)
        mapping = {} if mapping is None else {"cold_mapping": mapping}
        if self.objective == "backbone":
            return {"rank": self._rank(backbone_scores, targets, candidates), **mapping}

        retrieved = self.retriever(states, users, items)
        retriever_scores = retrieved["scores"]  # [N n|U]
        row_users = interaction[self.USER_ID]  # [B]
        last = self.backbone.gather_last(hidden, item_seq_len)  # [B H]
        target_columns = targets if candidates is None else candidates.target_columns  # [N]: targets' key columns
        terms = self._auxiliary_terms(retrieved, last, row_users, targets, target_columns)
        if self.objective == "retriever":
            terms["rank"] = self._rank(retriever_scores, targets, candidates)
        else:
            context = torch.cat([states, retrieved["query"]], dim=-1)  # [N H+D]
            fused, _ = self.fusion(backbone_scores, retriever_scores, context)  # [N n|U]
            terms["rank"] = self._rank(fused, targets, candidates)
            terms["rank_backbone"] = self._rank(backbone_scores, targets, candidates)
            terms["rank_retriever"] = self._rank(retriever_scores, targets, candidates)
            terms["distillation"] = bidirectional_distillation(
                backbone_scores, retriever_scores, self.distillation_temperature, padding_column=candidates is None
            )
        if self.training:
            self.retriever.remember(row_users, last)
        return {**terms, **mapping}

    def _auxiliary_terms(self, retrieved, last, users, targets, target_columns):
        """Consistency, contrastive, diversity and load-balance terms; ``target_columns`` [N]: the targets' columns
        in ``retrieved['keys']``."""
        state_view = self.retriever.state_view(last)  # [B D]
        user_view = self.retriever.user_view(users)  # [B D]
        has_text = self.retriever.user_mask[users]  # [B]
        zero = last.new_zeros(())
        consistency, contrastive = zero, zero
        across_ranks = self.training and distributed.is_distributed()  # means and negatives over the whole batch
        if across_ranks or has_text.any():
            distance = 1 - torch.cosine_similarity(state_view[has_text], user_view[has_text], dim=-1)  # [B']
            consistency = distributed.batch_mean(distance) if across_ranks else distance.mean()
        if across_ranks or has_text.sum() > 1:
            queue = self.memory_bank.negatives() if self.memory_bank is not None else None
            contrastive = view_info_nce(
                state_view[has_text],
                user_view[has_text],
                queue,
                self.contrastive_temperature,
                groups=users[has_text],
                across_ranks=across_ranks,
            )
            if self.memory_bank is not None and self.training:
                self.memory_bank.push(user_view[has_text])
        content = self.retriever.content_keys(retrieved["keys"])
        if content is not None:  # text and image keys of the target items that have both
            both = self.retriever.text_mask[targets] & self.retriever.image_mask[targets]  # [N]
            if both.any():
                columns = target_columns[both]
                text, image = content[0][0, columns], content[1][0, columns]  # [N' D]
                consistency = consistency + (1 - torch.cosine_similarity(text, image, dim=-1)).mean()
        routers = [retrieved["expert_weights"], *retrieved["sub_weights"].values()]
        return {
            "consistency": consistency,
            "contrastive": contrastive,
            "diversity": expert_diversity_loss(retrieved["expert_queries"]),
            "load_balance": sum(load_balance_loss(weights) for weights in routers) / len(routers),
        }

    def _scores(self, interaction):
        """Scores of all items at each row's last position, by the current objective: [B n]."""
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        last = self.backbone.gather_last(self.forward(interaction[self.ITEM_SEQ], item_seq_len), item_seq_len)  # [B H]
        backbone_scores = last @ self._scoring_items().t()  # [B n]
        if self.objective == "backbone":
            return backbone_scores
        retrieved = self.retriever(last, interaction[self.USER_ID])
        if self.objective == "retriever":
            return retrieved["scores"]
        context = torch.cat([last, retrieved["query"]], dim=-1)  # [B H+D]
        return self.fusion(backbone_scores, retrieved["scores"], context)[0]  # [B n]

    def predict(self, interaction):
        scores = self._scores(interaction)  # [B n]
        return scores.gather(1, interaction[self.ITEM_ID].unsqueeze(1)).squeeze(1)  # [B]

    def full_sort_predict(self, interaction):
        return self._scores(interaction)  # [B n]

    def _retrieve_last(self, interaction):
        """The last sequence states [B H] of ``interaction`` and the retriever's output there."""
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        last = self.backbone.gather_last(self.forward(interaction[self.ITEM_SEQ], item_seq_len), item_seq_len)
        return last, self.retriever(last, interaction[self.USER_ID])

    @torch.no_grad()
    def router_weights(self, interaction):
        """The router's expert weights at the last position of every row of ``interaction``: [B E], columns in the
        order of ``retriever.expert_names``."""
        return self._retrieve_last(interaction)[1]["expert_weights"]

    @torch.no_grad()
    def routing(self, interaction):
        """Mean fusion weight, expert and sub-expert weights at the last positions of ``interaction`` (for logs)."""
        last, retrieved = self._retrieve_last(interaction)
        weights = {"fusion": self.fusion.weight(torch.cat([last, retrieved["query"]], dim=-1)).mean().item()}
        for e, name in enumerate(self.retriever.expert_names):
            weights[f"router/{name}"] = retrieved["expert_weights"][:, e].mean().item()
            for s, value in enumerate(retrieved["sub_weights"][name].mean(0).tolist()):
                weights[f"sub_expert/{name}/{s}"] = value
        return weights
