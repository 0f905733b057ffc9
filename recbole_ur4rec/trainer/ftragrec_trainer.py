"""FTRagRec's training stages (see docs/design.md, section FTRagRec) on :class:`StagedTrainer`.

1. ``pretrain_backbone``: the DuoRec encoder with its own loss; skipped (0 epochs) when the model was warm-started
   from ``duorec_checkpoint``;
2. ``retriever``: the retriever (encoder layers, attention, fusion) with the backbone frozen;
3. ``finetune``: everything, optionally unfreezing retriever, backbone layers, then embeddings one by one
   (``progressive_unfreezing``, ``unfreeze_every``), with differential learning rates (``stage_lr_scale``).

In the retrieval stages the memory is refreshed at the start of an epoch on the ``refresh_every`` schedule (only
re-encoded when the backbone changed), the attention temperature follows ``temperature_anneal``, alpha
(``alpha_end``) and the enhanced loss's weight (``enhanced_rec_weight_start``) follow their schedules over the
retrieval stages' steps, and every evaluation also reports the metrics without retrieval (``dual_evaluation``); the
with-retrieval score stays the validation score.
"""
import torch
from recbole.utils import dict2str, set_color

from recbole_ur4rec.trainer.staged_trainer import StagedTrainer

STAGE_NAMES = ("pretrain_backbone", "retriever", "finetune")
BACKBONE_GROUPS = ("item_embedding", "backbone")
# progressive unfreezing goes from the output side to the input side
UNFREEZE_ORDER = ("retriever", "backbone", "item_embedding")


def refresh_interval(schedule, epoch):
    """Epochs between memory refreshes at retrieval epoch ``epoch``: ``schedule`` is an int, or {from_epoch: every}
    (the entry with the largest ``from_epoch <= epoch`` applies)."""
    if isinstance(schedule, int):
        return schedule
    return schedule[max(start for start in schedule if start <= epoch)]


class FTRagRecTrainer(StagedTrainer):
    """Pretrain backbone (unless warm-started), train the retriever, fine-tune (see the module docstring)."""

    def __init__(self, config, model):
        self.refresh_schedule = self._refresh_schedule(config["refresh_every"])
        anneal = config["temperature_anneal"]
        ok = anneal is None or (
            isinstance(anneal, (list, tuple)) and len(anneal) == 2 and all(isinstance(t, (int, float)) and t > 0 for t in anneal)
        )
        if not ok:
            raise ValueError(f"config key 'temperature_anneal' must be [start, end] temperatures > 0 or ~, got {anneal!r}")
        self.temperature_anneal = anneal
        if config["dual_evaluation"] not in (True, False):
            raise ValueError(f"config key 'dual_evaluation' must be True or False, got {config['dual_evaluation']!r}")
        self.dual_evaluation = config["dual_evaluation"]
        self.retrieval_epoch, self.last_refresh, self.refresh_log = 0, None, []
        self.retrieval_step = 0  # training steps of the retrieval objective so far: the schedules' clock
        self.result_without_retrieval, self.valid_history = None, []
        super().__init__(config, model)

    @staticmethod
    def _refresh_schedule(value):
        def positive_int(x):
            return isinstance(x, int) and not isinstance(x, bool) and x >= 1

        if positive_int(value):
            return value
        if isinstance(value, dict) and value and 0 in value and all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 0 and positive_int(v) for k, v in value.items()
        ):
            return dict(value)
        raise ValueError(
            f"config key 'refresh_every' must be an int >= 1 or {{from_epoch: every}} with ints, starting at epoch 0 "
            f"(e.g. {{0: 1, 10: 3}}), got {value!r}"
        )

    def build_stages(self):
        config = self.config
        unfreeze_every = self.unfreeze_every()
        if config["progressive_unfreezing"] not in (True, False):
            raise ValueError(f"config key 'progressive_unfreezing' must be True or False, got {config['progressive_unfreezing']!r}")
        specs = {
            "pretrain_backbone": dict(groups=BACKBONE_GROUPS, objective="backbone"),
            "retriever": dict(groups=("retriever",), objective="retrieval"),
            "finetune": dict(
                groups=UNFREEZE_ORDER,
                unfreeze=UNFREEZE_ORDER if config["progressive_unfreezing"] else (),
                unfreeze_every=unfreeze_every,
                objective="retrieval",
            ),
        }
        stages = self.configured_stages(STAGE_NAMES, specs)
        if self.model.warm_started:  # the backbone comes from duorec_checkpoint
            self.skip_warm_started(stages, "pretrain_backbone")
        return stages

    # ---- training ----------------------------------------------------------------------------------------------
    def refresh_if_due(self):
        """At the start of a retrieval epoch: refresh the memory when the schedule says so (or build a missing one)."""
        epoch = self.retrieval_epoch
        due = self.last_refresh is None or epoch - self.last_refresh >= refresh_interval(self.refresh_schedule, epoch)
        if due:
            rebuilt = self.model.refresh_memory()
            self.last_refresh = epoch
            self.refresh_log.append(epoch)
            self.logger.info(
                f"retrieval epoch {epoch}: memory refresh ({'re-encoded' if rebuilt else 'backbone unchanged, kept'}, "
                f"{len(self.model.memory)} entries, {self.model.memory.built_type} index)"
            )
        else:
            self.model.ensure_memory()
        self.retrieval_epoch += 1

    def _temperature(self):
        if self.temperature_anneal is None:
            return self.model.temperature
        start, end = self.temperature_anneal
        return start + (end - start) * self.stage_progress()

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if self.model.objective == "retrieval":
            self.refresh_if_due()
        return super()._train_epoch(train_data, epoch_idx, loss_func, show_progress)

    def schedule_progress(self):
        """Share of the retrieval stages' scheduled training steps done, in [0, 1]."""
        total = sum(stage.epochs for stage in self.stages if stage.objective == "retrieval") * self.steps_per_epoch
        return min(self.retrieval_step / max(total, 1), 1.0)

    def _loss_terms(self, interaction):
        if self.model.objective == "retrieval":
            self.model.temperature = self._temperature()
            self.model.set_schedule_progress(self.schedule_progress())
            self.retrieval_step += 1
        return super()._loss_terms(interaction)

    def _epoch_logs(self, interaction):
        if self.model.objective != "retrieval":
            return {}
        weights = self.model.current_loss_weights()
        return {"retrieval/temperature": self.model.temperature, "retrieval/alpha": self.model.fusion.alpha,
                "retrieval/enhanced_rec_weight": weights["enhanced"]}

    # ---- dual evaluation ---------------------------------------------------------------------------------------
    def _prepare_evaluation(self):
        if self.model.objective == "retrieval" and self.model.use_retrieval:
            self.model.ensure_memory()  # here on every rank: a distributed refresh is a collective

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        result = super().evaluate(eval_data, load_best_model, model_file, show_progress)
        self.result_without_retrieval = None
        if self.dual_evaluation and eval_data and self.model.objective == "retrieval":
            rows, self.model.use_retrieval = self.last_evaluated_rows, False
            try:
                self.result_without_retrieval = super().evaluate(eval_data, False, None, show_progress)
            finally:
                self.model.use_retrieval, self.last_evaluated_rows = True, rows  # the rows of the result returned
            self.logger.info(set_color("without retrieval", "blue") + f": {dict2str(self.result_without_retrieval)}")
        return result

    def _valid_epoch(self, valid_data, show_progress=False):
        score, result = super()._valid_epoch(valid_data, show_progress)
        without = self.result_without_retrieval
        self.valid_history.append({"stage": self.stage.name, "with_retrieval": result, "without_retrieval": without})
        if without is not None:
            step = self.epoch_offset + self._epoch_idx
            self.tensorboard.add_scalar(f"valid_without_retrieval/{self.valid_metric}", without[self.valid_metric.lower()], step)
        return score, result

    # ---- resume ------------------------------------------------------------------------------------------------
    def _extra_resume_state(self):
        state = super()._extra_resume_state()
        state["ftragrec"] = {"retrieval_epoch": self.retrieval_epoch, "last_refresh": self.last_refresh, "retrieval_step": self.retrieval_step}
        return state

    def _restore(self, state, resume_file):
        saved = state.get("ftragrec") or {}
        super()._restore(state, resume_file)
        self.retrieval_epoch = saved.get("retrieval_epoch", 0)
        self.last_refresh = saved.get("last_refresh")
        self.retrieval_step = saved.get("retrieval_step", 0)
