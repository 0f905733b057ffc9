r"""
FTRagRec
################################################
Reference:
    Ruihong Qiu, Zi Huang, Hongzhi Yin and Zijian Wang. "Contrastive Learning for Representation Degeneration
    Problem in Sequential Recommendation." In WSDM 2022 (DuoRec, the warm start).
    Urvashi Khandelwal et al. "Generalization through Memorization: Nearest Neighbor Language Models." In ICLR 2020
    (retrieval of similar training contexts and their next tokens).
    Jeremy Howard and Sebastian Ruder. "Universal Language Model Fine-tuning for Text Classification." In ACL 2018
    (progressive unfreezing and differential learning rates, in :class:`~recbole_ur4rec.trainer.FTRagRecTrainer`).

FTRagRec (the prototype described in docs/design.md, section FTRagRec): a DuoRec encoder, warm-started from a
trained DuoRec, whose sequence representation is enhanced with knowledge retrieved from the training prefixes most
similar to it: a FAISS memory (:class:`~recbole_ur4rec.index.retrieval_memory.RetrievalMemory`) returns the top-k
training prefixes and their next items, small retriever encoder layers read them, attention with a temperature
pools them, and the pooled knowledge is mixed into the sequence representation (fixed alpha, alpha from retrieval
quality, or a per-dimension gate). Trained in stages by :class:`~recbole_ur4rec.trainer.FTRagRecTrainer`.
"""
import os
from logging import getLogger

import torch
from torch.nn import functional as F

from recbole_ur4rec.common import distributed
from recbole_ur4rec.common.checkpoint_io import load_module_weights, resolve_checkpoint_path
from recbole_ur4rec.common.checks import check_config_value as _check
from recbole_ur4rec.data.sequence_dataset import training_histories, window_rows
from recbole_ur4rec.index.retrieval_memory import COMPRESSED, INDEX_TYPES, RetrievalMemory, weights_fingerprint
from recbole_ur4rec.model.duorec import DuoRec
from recbole_ur4rec.model.layers.sequence_backbone import WARM_START_MATCH, position_loss, supervised_positions
from recbole_ur4rec.model.layers.fusion import RetrievalFusion
from recbole_ur4rec.model.layers.staged import StagedModelMixin

OBJECTIVES = ("backbone", "retrieval")
FUSIONS = ("fixed", "dynamic", "gate")
ALIGNMENTS = ("kl", "reverse_kl", "js", "none")
ENCODERS = ("transformer", "mlp")
KNOWLEDGE_TARGETS = ("direct", "encoded", "learned")
EVERY_PAST_ENTRY = 2**62  # query position that lets the same user's training entries (all in its past) be retrieved


def alignment_loss(retrieval_logits, recommendation_logits, kind, weights=None):
    r"""Divergence between the retrieval and the recommendation distributions over items, averaged over rows.

    ``kl`` = KL(retrieval || recommendation), ``reverse_kl`` = KL(recommendation || retrieval), ``js`` = Jensen-Shannon
    (the mean KL of both to their average). ``weights`` [Q] (0/1) keeps some rows only; 0 when none is kept.
    """
    log_p = F.log_softmax(retrieval_logits, dim=-1)  # [Q n]
    log_q = F.log_softmax(recommendation_logits, dim=-1)  # [Q n]
    if kind == "kl":
        per_row = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif kind == "reverse_kl":
        per_row = (log_q.exp() * (log_q - log_p)).sum(-1)
    elif kind == "js":
        log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - torch.log(torch.tensor(2.0, device=log_p.device))
        per_row = 0.5 * (log_p.exp() * (log_p - log_m)).sum(-1) + 0.5 * (log_q.exp() * (log_q - log_m)).sum(-1)
    else:
        raise ValueError(f"alignment must be one of {', '.join(ALIGNMENTS)}, got {kind!r}")
    if weights is None:
        return per_row.mean()
    return (per_row * weights).sum() / weights.sum().clamp(min=1)


class FTRagRec(StagedModelMixin, DuoRec):
    r"""DuoRec encoder + retrieval of similar training prefixes from a FAISS memory, fused into the representation.

    ``set_objective('backbone')`` trains and predicts with the DuoRec encoder alone (its own loss, contrastive terms
    included); ``'retrieval'`` trains ``loss = rec + enhanced_rec_weight * enhanced + alignment_weight * alignment``
    and predicts with the retrieval-enhanced representation (unless ``use_retrieval`` is False, which the trainer's
    dual evaluation uses for the backbone-only scores).

    NOTE:
        Deviations from the prototype (see docs/design.md, section FTRagRec):

        - The memory holds one entry per training position (prefix -> next item) of the training split,
          encoded in the windows of the whole-sequence training rows; validation and test items never enter it.
        - Leakage: the memory never returns an entry of the query's own user at or after the query's position.
          Training rows do not carry their window offset, so during training the query's user is excluded
          entirely (stricter). At evaluation the user's history is past all of its training entries; they are
          still excluded unless ``retrieve_own_history`` is True, because their targets are items the user has
          already consumed, which full ranking does not mask.
        - Each neighbour is read as [its prefix representation, its target item embedding]; the pooled knowledge is
          the attention-weighted sum of the encoded neighbours plus their target embeddings (a direct path, so
          that the knowledge scores the neighbours' next items from the start); the retrieval distribution of the
          alignment loss is the softmax of the knowledge's scores over all items.
        - During training, retrieval runs on at most ``retrieval_max_positions`` random supervised positions per
          batch (the plain loss keeps every position), which bounds the FAISS cost per step.
        - Large memories (``index_type: ivfsq8``, chosen by ``auto`` from ``compressed_min_size`` entries) keep 8-bit
          codes instead of float keys; with ``rerank`` > 0 (default) a shortlist from the codes is re-ranked by
          exact similarity, and the neighbours' keys are read, from float32 keys in a file on disk (``memory_dir``);
          with ``rerank: 0`` the keys are decoded from the codes (approximately).
        - The memory is saved in checkpoints (keys or, for ivfsq8, norms; targets, users, positions; for IVF
          types, the serialised index) with fingerprints of the backbone weights it was encoded with and of those
          saved beside it (between two refreshes the memory lags behind the weights, as it did when that checkpoint
          was validated); loaded with weights that match neither, it is rebuilt from them before its next use.
    """

    OBJECTIVES = OBJECTIVES

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self._check_retrieval_config(config)
        self.retrieval_topk = config["retrieval_topk"]
        self.similarity_threshold = config["similarity_threshold"]
        self.retrieval_max_positions = config["retrieval_max_positions"]
        self.retrieve_own_history = config["retrieve_own_history"]
        # "backbone": DuoRec's own loss (objective backbone); the others: the retrieval objective
        self.loss_weights = {
            "backbone": 1.0,
            "rec": 1.0,
            "enhanced": float(config["enhanced_rec_weight"]),
            "alignment": float(config["alignment_weight"]),
        }
        self.alignment = config["alignment"]
        self.alignment_quality_threshold = config["alignment_quality_threshold"]
        self.enhanced_quality_threshold = config["enhanced_quality_threshold"]
        # schedules over the retrieval stages (the trainer sets schedule_progress, in [0, 1], before every step)
        self.alpha_end, self.enhanced_rec_weight_start = config["alpha_end"], config["enhanced_rec_weight_start"]
        self.schedule_progress = 0.0
        self.temperature = float(config["retriever_temperature"])
        self.memory_batch_size = config["eval_batch_size"]
        self.objective, self.use_retrieval = "retrieval", True

        self.fusion = RetrievalFusion(
            hidden_size=config["hidden_size"],
            n_heads=config["n_heads"],
            inner_size=config["inner_size"],
            n_layers=config["retriever_layers"],
            encoder=config["retriever_encoder"],
            dropout=config["retriever_dropout"],
            fusion=config["fusion"],
            alpha=float(config["alpha"]),
            layer_norm_eps=config["layer_norm_eps"],
            knowledge_targets=config["knowledge_targets"],
        )
        self.memory = RetrievalMemory(
            index_type=config["index_type"],
            nlist=config["nlist"],
            nprobe=config["nprobe"],
            ivf_min_size=config["ivf_min_size"],
            normalize=config["normalize_keys"],
            seed=config["seed"] or 0,
            kmeans_iterations=config["ivf_kmeans_iterations"],
            compressed_min_size=config["compressed_min_size"],
            compressed_nprobe=config["compressed_nprobe"],
            rerank=config["rerank"],
            exact_keys_dir=config["memory_dir"] or config["checkpoint_dir"],
        )
        self._memory_rows = self._prefix_rows(getattr(dataset, "training_split", dataset))
        self._memory_checked = False  # False until the memory is known to match the backbone's weights
        self.memory_restored = False  # the last load_other_parameter reused the saved memory
        self._device_memory = None  # (keys, targets) on the model's device
        self.warm_started = None
        if config["duorec_checkpoint"]:
            self.warm_start(resolve_checkpoint_path(config["duorec_checkpoint"], config["seed"], "duorec_checkpoint"), config["dataset"])

    def _check_retrieval_config(self, config):
        _check(config, "retrieval_topk", int, low=1)
        _check(config, "retrieval_max_positions", int, low=1)
        _check(config, "retriever_layers", int, low=1)
        _check(config, "nprobe", int, low=1)
        _check(config, "rerank", int, low=0)
        _check(config, "ivf_kmeans_iterations", int, low=1)
        _check(config, "nlist", int, low=1, optional=True)
        _check(config, "ivf_min_size", int, low=1)
        _check(config, "compressed_min_size", int, low=1)
        _check(config, "compressed_nprobe", int, low=1)
        _check(config, "similarity_threshold", (int, float), optional=True)
        _check(config, "alignment_quality_threshold", (int, float), optional=True)
        _check(config, "enhanced_quality_threshold", (int, float), optional=True)
        _check(config, "knowledge_targets", None, choices=KNOWLEDGE_TARGETS)
        _check(config, "enhanced_rec_weight_start", (int, float), low=0, optional=True)
        end = _check(config, "alpha_end", (int, float), low=0, high=1, optional=True)
        if end is not None and config["fusion"] == "gate" and not 0 < end < 1:
            raise ValueError(f"config key 'alpha_end' must be in (0, 1) with fusion: gate, got {end!r}")
        _check(config, "retriever_dropout", (int, float), low=0, high=0.99)
        _check(config, "retriever_temperature", (int, float), low=0, low_open=True)
        _check(config, "enhanced_rec_weight", (int, float), low=0)
        _check(config, "alignment_weight", (int, float), low=0)
        _check(config, "fusion", None, choices=FUSIONS)
        _check(config, "alignment", None, choices=ALIGNMENTS)
        _check(config, "retriever_encoder", None, choices=ENCODERS)
        _check(config, "index_type", None, choices=INDEX_TYPES)
        for key in ("normalize_keys", "retrieve_own_history"):
            _check(config, key, None, choices=(True, False))
        alpha = _check(config, "alpha", (int, float), low=0, high=1)
        if config["fusion"] == "gate" and not 0 < alpha < 1:
            raise ValueError(f"config key 'alpha' must be in (0, 1) with fusion: gate (the gate's initial value), got {alpha!r}")
        path = config["duorec_checkpoint"]
        if path is not None and not isinstance(path, str):
            raise ValueError(f"config key 'duorec_checkpoint' must be a path to a DuoRec checkpoint or ~, got {path!r}")

    # ---- warm start --------------------------------------------------------------------------------------------
    def warm_start(self, path, dataset_name=None):
        """Load the ``backbone.*`` tensors of a plugin checkpoint (a trained DuoRec) into this model's backbone.

        Raises:
            CheckpointError: the file is missing or corrupt, was trained on another dataset, or its backbone
                tensors do not match this backbone's names and shapes (all of them are named).
        """
        load_module_weights(
            self.backbone, path, "duorec_checkpoint", dataset_name,
            advice=f"Train the DuoRec on {WARM_START_MATCH}",
        )
        self.warm_started = str(path)
        self._memory_checked = False

    # ---- memory ------------------------------------------------------------------------------------------------
    def _prefix_rows(self, train_split):
        """Windows of the training histories (as the training rows) and the history position of their first column."""
        user_ids, histories = training_histories(train_split)
        return window_rows(user_ids, histories, self.max_seq_length)

    def backbone_fingerprint(self):
        return weights_fingerprint(self.backbone.state_dict())

    @torch.no_grad()
    def refresh_memory(self, force=False):
        """Re-encode the training prefixes with the current backbone and rebuild the index, batch by batch (an
        ``ivfsq8`` memory never holds all float keys; it reads the rows in a seeded random order, so that the keys
        it trains on are a sample of all).

        In a distributed run rank 0 encodes and indexes, and every other rank receives the same memory (keys and
        index bytes), so that all ranks retrieve the same neighbours; every rank calls it at the same points.

        Returns:
            bool: whether it was rebuilt (not when the backbone is unchanged since the last build, unless ``force``).
        """
        fingerprint = self.backbone_fingerprint()
        if self.memory.built and self.memory.fingerprint == fingerprint and not force:
            self._memory_checked = True
            return False
        if distributed.rank() == 0:
            self._encode_memory(fingerprint)
        if distributed.is_distributed():
            state = distributed.broadcast_plain(self.memory.state_dict() if distributed.rank() == 0 else None)
            if distributed.rank() != 0:
                self.memory.load_state_dict(state, self.backbone.item_embedding.weight.size(1))
        self._device_memory, self._memory_checked = None, True
        return True

    def _encode_memory(self, fingerprint):
        device = self.backbone.item_embedding.weight.device
        user, item_seq, targets, length, starts = self._memory_rows
        n = int(length.sum())  # one entry per supervised position
        order = torch.arange(user.size(0))
        if self.memory.resolved_type(n) == COMPRESSED:
            order = torch.randperm(user.size(0), generator=torch.Generator().manual_seed(self.memory.seed))

        def entries():
            for lo in range(0, user.size(0), self.memory_batch_size):
                rows = order[lo : lo + self.memory_batch_size]
                hidden = self.backbone(item_seq[rows].to(device), length[rows].to(device)).cpu()  # [b L H]
                row_targets = targets[rows, : hidden.size(1)]  # [b L]
                mask = row_targets > 0
                column = torch.arange(hidden.size(1)).unsqueeze(0)
                yield (
                    hidden[mask],
                    row_targets[mask],
                    user[rows].unsqueeze(1).expand_as(mask)[mask],
                    (starts[rows].unsqueeze(1) + column).expand_as(mask)[mask],
                )

        was_training = self.training
        self.eval()
        try:
            self.memory.build_stream(entries(), n, fingerprint)
        finally:
            self.train(was_training)

    def ensure_memory(self):
        """Build the memory if it is missing, or does not match weights loaded since it was built."""
        if not self.memory.built or not self._memory_checked:
            self.refresh_memory()

    def load_state_dict(self, state_dict, *args, **kwargs):
        result = super().load_state_dict(state_dict, *args, **kwargs)
        self._memory_checked = False  # new weights: the memory is checked against them before its next use
        return result

    def other_parameter(self):
        memory = self.memory.state_dict()
        if memory is not None:  # the weights saved beside it: a memory between two refreshes lags behind them
            memory["saved_with"] = self.backbone_fingerprint()
        return {"objective": self.objective, "memory": memory, "schedule_progress": self.schedule_progress,
                "feature_fingerprint": self.feature_fingerprint}

    def load_other_parameter(self, para):
        """Restore the objective and the saved memory, if it was saved with (or encoded by) the current weights;
        otherwise the memory is dropped and rebuilt from the current weights before its next use."""
        self.memory_restored = False
        if not para:
            return
        self.check_feature_fingerprint(para)
        self.set_objective(para.get("objective", self.objective))
        self.set_schedule_progress(para.get("schedule_progress", 0.0))
        saved = para.get("memory")
        if saved is not None and self.backbone_fingerprint() in (saved["fingerprint"], saved.get("saved_with")):
            try:
                self.memory.load_state_dict(saved, self.backbone.item_embedding.weight.size(1))
            except ValueError as error:  # e.g. its exact keys file is gone: the same memory is encoded again
                getLogger().warning(f"the saved retrieval memory is rebuilt from the loaded weights: {error}")
                self._memory_checked = False
                return
            self._device_memory, self._memory_checked, self.memory_restored = None, True, True
        else:
            self._memory_checked = False

    # ---- retrieval ---------------------------------------------------------------------------------------------
    def parameter_groups(self):
        """Named parameter groups the trainer freezes, unfreezes, clips and scales separately."""
        return {**self.backbone.parameter_groups(), "retriever": list(self.fusion.parameters())}

    def retrieve(self, states, users, positions):
        """Enhanced representations of ``states`` [Q H] (queries of ``users`` [Q] at ``positions`` [Q]); see
        :meth:`RetrievalFusion.forward` for the returned dict."""
        self.ensure_memory()
        index, similarity, mask = self.memory.search(
            states.detach(), users, positions, self.retrieval_topk, self.similarity_threshold
        )  # [Q k] each
        if self._device_memory is None:  # float keys (flat, ivf; None for ivfsq8) and targets on the model's device
            keys = self.memory.keys
            self._device_memory = (
                None if keys is None else keys.to(states.device),
                self.memory.targets.to(states.device, torch.int64),
            )
        keys, targets = self._device_memory
        # ivfsq8 keeps no float keys: the neighbours' keys are decoded from its 8-bit codes, so they are approximate
        neighbour_keys = keys[index] if keys is not None else self.memory.neighbour_keys(index).to(states.device)  # [Q k H]
        target_emb = self.backbone.output_items()[targets[index]]  # [Q k H]
        return self.fusion(states, neighbour_keys, target_emb, similarity, mask, self.temperature)

    def set_schedule_progress(self, progress):
        """Move the schedules to ``progress`` in [0, 1] of the retrieval stages' steps: alpha goes linearly from
        ``alpha`` to ``alpha_end`` (the fixed weight, the dynamic weight's maximum, or the gate's logit shift), the
        enhanced loss's weight from ``enhanced_rec_weight_start`` to ``enhanced_rec_weight``."""
        self.schedule_progress = float(progress)
        if self.alpha_end is not None:
            self.fusion.alpha = self.fusion.start_alpha + (self.alpha_end - self.fusion.start_alpha) * self.schedule_progress

    def current_loss_weights(self):
        """``loss_weights`` with the enhanced loss's weight at the current point of its ramp."""
        if self.enhanced_rec_weight_start is None:
            return self.loss_weights
        start, end = float(self.enhanced_rec_weight_start), self.loss_weights["enhanced"]
        return {**self.loss_weights, "enhanced": start + (end - start) * self.schedule_progress}

    def loss_terms(self, interaction):
        """Unweighted loss terms of the current objective (weights: ``current_loss_weights``); the mean retrieval
        ``quality`` and ``fusion_weight`` of the batch go to ``loss_diagnostics``."""
        if self.objective == "backbone":
            self._loss_diagnostics = {}
            return {"backbone": DuoRec.calculate_loss(self, interaction)}
        hidden = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])  # [B L H]
        states, targets, users = supervised_positions(self, interaction, hidden)  # [N H], [N], [N]
        item_weight = self.backbone.output_items()
        terms = {"rec": position_loss(states, targets, item_weight, self.loss_type, self.neg_sample_num)}
        chosen = torch.randperm(states.size(0), device=states.device)[: self.retrieval_max_positions]  # [M]
        states, targets, users = states[chosen], targets[chosen], users[chosen]
        # the user is excluded entirely: a training row does not say where its window starts in the history
        out = self.retrieve(states, users, torch.zeros_like(users))
        if self.enhanced_quality_threshold is None:
            terms["enhanced"] = position_loss(out["enhanced"], targets, item_weight, self.loss_type, self.neg_sample_num)
        else:  # only queries whose neighbours are similar enough train the enhanced representation
            keep = out["has"] & (out["quality"] >= self.enhanced_quality_threshold)  # [M]
            terms["enhanced"] = (
                position_loss(out["enhanced"][keep], targets[keep], item_weight, self.loss_type, self.neg_sample_num)
                if keep.any() else states.new_zeros(())
            )
        if self.alignment != "none":
            weights = None
            if self.alignment_quality_threshold is not None:
                weights = (out["has"] & (out["quality"] >= self.alignment_quality_threshold)).float()
            terms["alignment"] = alignment_loss(
                out["knowledge"] @ item_weight[1:].t(), states @ item_weight[1:].t(), self.alignment, weights
            )
        quality = out["quality"][out["has"]].mean().item() if out["has"].any() else 0.0
        self._loss_diagnostics = {"quality": quality, "fusion_weight": out["weight"].detach().mean().item()}
        return terms

    def _last_hidden(self, interaction):
        last = super()._last_hidden(interaction)  # [B H]
        if self.objective == "backbone" or not self.use_retrieval:
            return last
        users = interaction[self.USER_ID]
        position = EVERY_PAST_ENTRY if self.retrieve_own_history else 0
        return self.retrieve(last, users, torch.full_like(users, position))["enhanced"]  # [B H]
