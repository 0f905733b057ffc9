"""UR4Rec's four training stages (see docs/design.md, section UR4Rec) on :class:`StagedTrainer`.

1. ``pretrain_backbone``: the SASRec backbone alone (its own ranking loss); with ``backbone_checkpoint``, no training:
   the loaded backbone is validated once, as the stage's result;
2. ``pretrain_retriever``: the retriever (and the fusion) with the backbone frozen;
3. ``joint``: everything on the fused loss, alternating between backbone and retriever steps (``alternation``:
   a fixed number of steps each, or switching when the trained part's loss stops moving);
4. ``end_to_end``: everything at once, optionally unfreezing from the fusion down to the item embeddings.

Auxiliary loss weights follow a curriculum inside each stage: each weight ramps linearly from 0 to its configured
value over a share of the stage's steps (``curriculum_ramps``).
"""
from recbole_ur4rec.trainer.staged_trainer import StagedTrainer

STAGE_NAMES = ("pretrain_backbone", "pretrain_retriever", "joint", "end_to_end")
BACKBONE_GROUPS = ("item_embedding", "backbone")
RETRIEVER_GROUPS = ("retriever", "fusion")
MAPPING_GROUPS = ("cold_mapping",)  # text -> ID embedding map of items without training interactions (empty when off)
# progressive unfreezing goes from the output side to the input side
UNFREEZE_ORDER = ("fusion", "retriever", "backbone", "item_embedding")
RETRIEVER_OBJECTIVES = ("retriever", "fused")


class UR4RecTrainer(StagedTrainer):
    """Pretrain backbone, pretrain retriever, alternating joint fine-tuning, end-to-end (see the module docstring)."""

    def build_stages(self):
        config = self.config
        retriever_objective = config["retriever_pretrain_objective"]
        if retriever_objective not in RETRIEVER_OBJECTIVES:
            raise ValueError(
                f"config key 'retriever_pretrain_objective' must be one of {', '.join(RETRIEVER_OBJECTIVES)}, got {retriever_objective!r}"
            )
        unfreeze_every = self.unfreeze_every()
        self.curriculum_ramps = self._ramps(config["curriculum_ramps"]) if config["curriculum"] else {}

        everything = BACKBONE_GROUPS + RETRIEVER_GROUPS + MAPPING_GROUPS
        specs = {
            "pretrain_backbone": dict(groups=BACKBONE_GROUPS + MAPPING_GROUPS, objective="backbone"),
            "pretrain_retriever": dict(groups=RETRIEVER_GROUPS + MAPPING_GROUPS, objective=retriever_objective),
            "joint": dict(groups=everything, alternate=(BACKBONE_GROUPS + MAPPING_GROUPS, RETRIEVER_GROUPS), objective="fused"),
            "end_to_end": dict(
                groups=everything,
                unfreeze=UNFREEZE_ORDER if config["progressive_unfreezing"] else (),
                unfreeze_every=unfreeze_every,
                objective="fused",
            ),
        }
        stages = self.configured_stages(STAGE_NAMES, specs)
        if self.model.warm_started:  # backbone_checkpoint: the loaded backbone is validated as the stage's result
            self.skip_warm_started(stages, "pretrain_backbone", validate_loaded=True)
        return stages

    def _ramps(self, ramps):
        known = set(self.model.loss_weights)
        if not isinstance(ramps, dict):
            raise ValueError(f"config key 'curriculum_ramps' must map loss names to [start, end] shares of a stage, got {ramps!r}")
        for name, ramp in ramps.items():
            ok = isinstance(ramp, (list, tuple)) and len(ramp) == 2 and all(isinstance(x, (int, float)) for x in ramp)
            if name not in known or not ok or not 0 <= ramp[0] < ramp[1] <= 1:
                raise ValueError(
                    f"config key 'curriculum_ramps' entry {name!r}: {ramp!r}; expected a loss among {', '.join(sorted(known))} "
                    f"mapped to [start, end] with 0 <= start < end <= 1"
                )
        return {name: tuple(ramp) for name, ramp in ramps.items()}

    def loss_weights(self):
        """The weight of every loss term at this step: configured weights times their curriculum ramps."""
        progress = self.stage_progress()
        weights = dict(self.model.loss_weights)
        for name, (start, end) in self.curriculum_ramps.items():
            weights[name] *= min(max((progress - start) / (end - start), 0.0), 1.0)
        return weights

    def _part_losses(self, terms):
        # in the order of the joint stage's parts: backbone, retriever
        return [terms["rank_backbone"].item(), terms["rank_retriever"].item()]

    def _epoch_logs(self, interaction):
        if self.model.objective == "backbone":
            return {}
        was_training = self.model.training
        self.model.eval()
        weights = self.model.routing(interaction)
        self.model.train(was_training)
        return {f"routing/{name}": value for name, value in weights.items()}
