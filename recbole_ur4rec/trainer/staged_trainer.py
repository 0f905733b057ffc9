"""Staged training on RecBole's ``fit``: the stage, alternation, unfreezing, LR-schedule and clipping logic of
every staged trainer of the plugin.

A :class:`Stage` trains some named parameter groups of the model (the model's ``parameter_groups()``) for its own
epochs at its own learning rate, with warm-up + cosine decay, per-group gradient clipping, optionally alternating
between parts (fixed schedule or from their loss trends) or unfreezing groups one by one. Each stage is one call of
RecBole's ``fit`` (early stopping on the validation metric), and ends by restoring the stage's best weights. The
best-model file holds the best validation result over all stages; ``-last.pth`` also holds the stage index and
the stage's state, so a run killed mid-stage resumes where it stopped.
"""
import functools
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from recbole.trainer import Trainer
from recbole.utils import early_stopping, set_color
from torch.nn.utils import clip_grad_norm_
from tqdm import tqdm

from recbole_ur4rec.common.checkpoint_io import CheckpointError, run_best
from recbole_ur4rec.model.layers.staged import weighted_loss
from recbole_ur4rec.trainer.safe_checkpoint import SafeCheckpointMixin

ALTERNATION_MODES = ("fixed", "adaptive")


@dataclass
class Stage:
    """One stage of training.

    Attributes:
        name (str): shown in logs and checkpoints.
        epochs (int): most epochs (early stopping may end the stage sooner); 0 skips the stage.
        learning_rate (float): peak learning rate.
        groups (tuple): parameter groups trained; every other group is frozen.
        alternate (tuple): parts (tuples of groups) trained in turn, one per step; empty: all groups every step.
        unfreeze (tuple): progressive unfreezing: these groups become trainable one by one, the first at epoch 0,
            the next ``unfreeze_every`` epochs later; empty: all groups from the start.
        unfreeze_every (int): epochs between two unfreezing steps.
        objective (str): what the subclass trains in this stage (given to ``_begin_stage``).
        lr_scale (dict): group -> factor on ``learning_rate`` (differential learning rates).
        validate_loaded (bool): with 0 epochs, validate the model once as it is (weights loaded from a checkpoint)
            and count that validation as the stage's result, a candidate for the run's best.
    """

    name: str
    epochs: int
    learning_rate: float
    groups: tuple
    alternate: tuple = ()
    unfreeze: tuple = ()
    unfreeze_every: int = 1
    objective: str = ""
    lr_scale: dict = field(default_factory=dict)
    validate_loaded: bool = False


class Alternator:
    """Which part trains at the next step.

    ``fixed`` switches every ``steps`` steps; ``adaptive`` switches once the current part has trained at least
    ``steps`` steps (and two) and its loss has stopped moving: the mean of its last ``steps // 2`` losses differs
    from the mean of the ``steps // 2`` before by less than ``threshold`` (relative).
    """

    def __init__(self, n_parts, mode, steps, threshold):
        if mode not in ALTERNATION_MODES:
            raise ValueError(f"alternation mode must be one of {', '.join(ALTERNATION_MODES)}, got {mode!r}")
        self.n_parts, self.mode, self.steps, self.threshold = n_parts, mode, steps, threshold
        self.current, self.since_switch, self.history, self.switches = 0, 0, [], 0

    def update(self, part_losses):
        """Record the losses of this step ([one per part]); return True when the trained part changes."""
        half = max(1, self.steps // 2)
        self.since_switch += 1
        self.history = (self.history + [float(part_losses[self.current])])[-2 * half :]
        if self.since_switch < self.steps:
            return False
        if self.mode == "adaptive":
            if len(self.history) < 2 * half:
                return False
            recent, before = np.mean(self.history[half:]), np.mean(self.history[:half])
            if abs(recent - before) / (abs(before) + 1e-8) >= self.threshold:
                return False
        self.current, self.since_switch, self.history = (self.current + 1) % self.n_parts, 0, []
        self.switches += 1
        return True

    def state_dict(self):
        return {"current": self.current, "since_switch": self.since_switch, "history": self.history, "switches": self.switches}

    def load_state_dict(self, state):
        self.current, self.since_switch = state["current"], state["since_switch"]
        self.history, self.switches = list(state["history"]), state["switches"]


RECBOLE_DEFAULT_LEARNING_RATE = 0.001  # recbole/properties/overall.yaml


class StagedTrainer(SafeCheckpointMixin, Trainer):
    r"""Base of trainers that train a model in stages; subclasses give the stages and the loss of a batch.

    Subclasses implement :meth:`build_stages`, and may override :meth:`loss_weights`, :meth:`_begin_stage`,
    :meth:`_part_losses` and :meth:`_epoch_logs`; the model follows the loss contract of
    :mod:`recbole_ur4rec.model.layers.staged`. Config keys: ``warmup_ratio`` (share of a stage's steps with a
    linear warm-up), ``min_lr_ratio`` (cosine floor, relative to the peak), ``max_grad_norm`` (number or
    {group: number}; each group's gradient norm is clipped on its own; ~ disables), ``alternation`` (fixed or
    adaptive), ``alternation_steps`` and ``alternation_threshold``, and RecBole's ``stopping_step`` and ``eval_step``
    per stage.
    """

    def __init__(self, config, model):
        super().__init__(config, model)
        self._refuse_unused_learning_rate(config)
        self.groups = model.parameter_groups()
        self._check_groups()
        self.warmup_ratio = self._number("warmup_ratio", 0, 1)
        self.min_lr_ratio = self._number("min_lr_ratio", 0, 1)
        self.max_grad_norm = self._grad_norms(config["max_grad_norm"])
        self.stages = self.build_stages()
        self._check_stages()
        if any(stage.alternate for stage in self.stages):
            self._check_alternation()
        self.stage_index, self.stage_step, self.steps_per_epoch, self.epoch_offset = 0, 0, 1, 0
        self.alternator, self._stage_best_state, self._resumed, self._run_improved = None, None, False, False
        self._validating, self._epoch_idx = True, 0
        self._epochs_before_stage, self._stage_epochs_done = 0, 0  # epochs trained (not scheduled): the run's budget
        self.run_best_score = -np.inf if self.valid_metric_bigger else np.inf
        self.run_best_result, self.run_best_stage = None, None

    # ---- configuration -------------------------------------------------------------------------------------
    def _refuse_unused_learning_rate(self, config):
        """RecBole's ``learning_rate`` trains nothing here (each stage has its own rate): a value the user gave
        that differs from RecBole's default is an error, never silently ignored."""
        given = getattr(config, "external_config_dict", {}).get("learning_rate")
        if given is not None and given != RECBOLE_DEFAULT_LEARNING_RATE:
            raise ValueError(
                f"config key 'learning_rate' ({given!r}) is not used by {config['model']}'s staged training: every stage "
                f"has its own rate, config key 'stage_learning_rate' (now {config['stage_learning_rate']!r}); set that instead"
            )


    def configured_stages(self, known, specs):
        """The stages named by the config key ``stages`` (among ``known``), in order, with their ``stage_epochs``,
        ``stage_learning_rate`` and ``stage_lr_scale``; ``specs`` gives each stage's other :class:`Stage` fields."""
        config = self.config
        names = config["stages"]
        if not isinstance(names, list) or not names or any(n not in known for n in names) or len(set(names)) != len(names):
            raise ValueError(f"config key 'stages' must be a list of distinct stages among {', '.join(known)}, got {names!r}")
        for key in ("stage_epochs", "stage_learning_rate"):
            value = config[key]
            missing = [name for name in names if not isinstance(value, dict) or name not in value]
            if missing:
                raise ValueError(f"config key {key!r} must give a value for every stage in 'stages' (missing: {', '.join(missing)}), got {value!r}")
        lr_scale = config["stage_lr_scale"] or {}
        if not isinstance(lr_scale, dict) or any(name not in known or not isinstance(v, dict) for name, v in lr_scale.items()):
            raise ValueError(f"config key 'stage_lr_scale' must map stage names to {{group: factor}}, got {lr_scale!r}")
        return [
            Stage(
                name=name,
                epochs=config["stage_epochs"][name],
                learning_rate=config["stage_learning_rate"][name],
                lr_scale=dict(lr_scale.get(name, {})),
                **specs[name],
            )
            for name in names
        ]

    @staticmethod
    def skip_warm_started(stages, name, validate_loaded=False):
        """The stage ``name`` of ``stages`` trains 0 epochs (its weights came from a checkpoint); with
        ``validate_loaded`` it validates them once as its result (see :class:`Stage`)."""
        for stage in stages:
            if stage.name == name:
                stage.epochs, stage.validate_loaded = 0, validate_loaded
        return stages

    def unfreeze_every(self):
        """The config key ``unfreeze_every``, checked."""
        value = self.config["unfreeze_every"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config key 'unfreeze_every' must be an int >= 1, got {value!r}")
        return value

    def build_stages(self):
        """The list of :class:`Stage` to run, in order."""
        raise NotImplementedError

    def _number(self, key, low, high):
        value = self.config[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ValueError(f"config key {key!r} must be a number in [{low}, {high}], got {value!r}")
        return float(value)

    def _grad_norms(self, value):
        if value is None:
            return {}
        norms = value if isinstance(value, dict) else {name: value for name in self.groups}
        for name, norm in norms.items():
            if name not in self.groups:
                raise ValueError(f"config key 'max_grad_norm' names group {name!r}; the groups are {', '.join(self.groups)}")
            if isinstance(norm, bool) or not isinstance(norm, (int, float)) or norm <= 0:
                raise ValueError(f"config key 'max_grad_norm' must be a positive number or {{group: number}}, got {value!r}")
        return norms

    def _check_groups(self):
        grouped = [id(p) for params in self.groups.values() for p in params]
        if len(grouped) != len(set(grouped)) or set(grouped) != {id(p) for p in self.model.parameters()}:
            raise ValueError(f"{type(self.model).__name__}.parameter_groups() must put every parameter in exactly one group")

    def _check_stages(self):
        for stage in self.stages:
            named = set(stage.groups) | {g for part in stage.alternate for g in part} | set(stage.unfreeze) | set(stage.lr_scale)
            unknown = named - set(self.groups)
            if unknown:
                raise ValueError(f"stage {stage.name!r} names unknown parameter groups {sorted(unknown)}; the groups are {', '.join(self.groups)}")
            if not any(self.groups[g] for g in stage.groups) and stage.epochs:
                raise ValueError(f"stage {stage.name!r} trains no parameters (groups {list(stage.groups)} are empty)")
            if isinstance(stage.epochs, bool) or not isinstance(stage.epochs, int) or stage.epochs < 0:
                raise ValueError(f"stage {stage.name!r}: epochs must be an int >= 0, got {stage.epochs!r}")
            if isinstance(stage.learning_rate, bool) or not isinstance(stage.learning_rate, (int, float)) or stage.learning_rate <= 0:
                raise ValueError(f"stage {stage.name!r}: learning rate must be a positive number, got {stage.learning_rate!r}")

    def _check_alternation(self):
        if self.config["alternation"] not in ALTERNATION_MODES:
            raise ValueError(f"config key 'alternation' must be one of {', '.join(ALTERNATION_MODES)}, got {self.config['alternation']!r}")
        steps = self.config["alternation_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"config key 'alternation_steps' must be an int >= 1, got {steps!r}")
        self._number("alternation_threshold", 0, math.inf)

    # ---- stages --------------------------------------------------------------------------------------------
    @property
    def stage(self):
        return self.stages[self.stage_index]

    def _begin_stage(self, stage):
        """Prepare the model for ``stage``: its objective (subclasses may do more)."""
        if stage.objective:
            self.model.set_objective(stage.objective)

    def _enter_stage(self, index):
        self.stage_index = index
        stage = self.stage
        self.epoch_offset = sum(s.epochs for s in self.stages[:index])
        if self._epochs_before_stage is not None:
            self._epochs_before_stage += self._stage_epochs_done
        self._stage_epochs_done = 0
        self.epochs, self.start_epoch, self.cur_step, self.stage_step = stage.epochs, 0, 0, 0
        self.eval_step = min(self.config["eval_step"], max(stage.epochs, 1))
        self.best_valid_score = -np.inf if self.valid_metric_bigger else np.inf
        self.best_valid_result, self._stage_best_state = None, None
        self.alternator = None
        if stage.alternate:
            self.alternator = Alternator(
                len(stage.alternate), self.config["alternation"], self.config["alternation_steps"], self.config["alternation_threshold"]
            )
        self._begin_stage(stage)
        self._set_trainable(0)
        param_groups = [
            {"params": self.groups[name], "lr": stage.learning_rate * stage.lr_scale.get(name, 1.0), "group": name}
            for name in stage.groups
            if self.groups[name]
        ]
        self.optimizer = self._build_optimizer(params=param_groups, learning_rate=stage.learning_rate)
        self.logger.info(set_color(f"Stage {index + 1}/{len(self.stages)}: {stage.name}", "yellow") + f" ({stage.epochs} epochs)")

    def active_groups(self, epoch):
        """Groups that train at this step of ``epoch`` (stage-local)."""
        stage = self.stage
        active = set(stage.groups)
        if stage.unfreeze:
            order = [g for g in stage.unfreeze if self.groups[g]]  # a group without parameters takes no step
            unfrozen = order[: 1 + epoch // stage.unfreeze_every]
            active -= set(order) - set(unfrozen)
        if self.alternator is not None:
            inactive = {g for i, part in enumerate(stage.alternate) if i != self.alternator.current for g in part}
            active -= inactive - set(stage.alternate[self.alternator.current])
        return active

    def _set_trainable(self, epoch):
        active = self.active_groups(epoch)
        for name, params in self.groups.items():
            for param in params:
                param.requires_grad_(name in active)
                if name not in active:
                    param.grad = None

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self.steps_per_epoch = max(len(train_data), 1)
        self._validating = bool(valid_data) and self.config["eval_step"] > 0
        first = self.stage_index
        for index in range(first, len(self.stages)):
            if not (self._resumed and index == first):
                self._enter_stage(index)
            stage_callback = None
            if callback_fn is not None:  # epochs counted over the whole run; the keywords the callback names pass on

                @functools.wraps(callback_fn)  # its signature: fit passes only the keywords callback_fn names
                def stage_callback(epoch_idx, valid_score, **extra):
                    callback_fn(self._run_epoch(epoch_idx), valid_score, **extra)

            if self.start_epoch < self.epochs:
                super().fit(train_data, valid_data, verbose, saved, show_progress, stage_callback)
            elif self.stage.validate_loaded and self._validating:
                self._validate_loaded(valid_data, saved)
            if self._stage_best_state is not None:
                self.model.load_state_dict(self._stage_best_state)
            self.logger.info(
                set_color(f"Stage {self.stage.name} done", "yellow")
                + f": best {self.valid_metric} {self.best_valid_score:.4f} (best of the run: {self.run_best_score:.4f}, stage {self.run_best_stage})"
            )
        self._resumed = False
        return self.run_best_score, self.run_best_result

    def _validate_loaded(self, valid_data, saved):
        """A 0-epoch stage's one validation of the weights as loaded, recorded as run epoch -1 (no resume state is
        written: a run stopped before its next stage's first validation starts again)."""
        if self._clock is None:
            self._clock = time.monotonic()
        self._epoch_idx = -1
        score, result = self._valid_epoch(valid_data)
        self.best_valid_score, self.best_valid_result = score, result
        self._keep_in_memory = not saved
        self._save_checkpoint(-1, verbose=False)
        self._validation_unrecorded = False
        self._record_validation(-1, score)
        self.logger.info(f"stage {self.stage.name}: loaded weights, valid {self.valid_metric} {score:.4f}")

    # ---- one epoch -----------------------------------------------------------------------------------------
    def loss_weights(self):
        """The weight of every loss term at this step (the model's ``loss_weights``; subclasses may ramp them)."""
        return self.model.current_loss_weights()

    def _loss_terms(self, interaction):
        """The model's unweighted loss terms of one batch ({name: scalar tensor}, see
        :mod:`recbole_ur4rec.model.layers.staged`), with their weighted total under ``loss``."""
        terms = self.model.loss_terms(interaction)
        terms["loss"] = weighted_loss(terms, self.loss_weights())
        return terms

    def _part_losses(self, terms):
        """Loss of each alternating part at this step (for adaptive alternation): one number per part."""
        return [terms["loss"].item()] * len(self.stage.alternate)

    def _alternation_losses(self, terms):
        """The part losses adaptive alternation decides on: the ranks' mean in a distributed run, so that every rank
        switches at the same step."""
        losses = self._part_losses(terms)
        return self.all_ranks_mean(losses) if self.alternator.mode == "adaptive" else losses

    def _epoch_logs(self, interaction):
        """Hook: more scalars to log after an epoch, from its last batch."""
        return {}

    def _learning_rate_factor(self):
        total = self.stage.epochs * self.steps_per_epoch
        warmup = int(round(self.warmup_ratio * total))
        if self.stage_step < warmup:
            return (self.stage_step + 1) / warmup
        progress = (self.stage_step - warmup) / max(total - warmup, 1)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def stage_progress(self):
        """Share of the current stage's steps done, in [0, 1]."""
        return min(self.stage_step / max(self.stage.epochs * self.steps_per_epoch, 1), 1.0)

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        self.model.train()
        self._set_trainable(epoch_idx)
        self._epoch_idx, stage = epoch_idx, self.stage
        self._stage_epochs_done = epoch_idx + 1
        totals, diagnostics, batches, interaction = defaultdict(float), defaultdict(float), 0, None
        iter_data = tqdm(train_data, total=len(train_data), ncols=100, desc=set_color(f"Train {stage.name} {epoch_idx:>3}", "pink")) if show_progress else train_data
        for interaction in iter_data:
            interaction = interaction.to(self.device)
            factor = self._learning_rate_factor()
            for group in self.optimizer.param_groups:
                group["lr"] = stage.learning_rate * stage.lr_scale.get(group["group"], 1.0) * factor
            self.optimizer.zero_grad()
            units = self.begin_step(interaction)
            terms = self._loss_terms(interaction)
            self._check_nan(terms["loss"])
            terms["loss"].backward()
            self.average_gradients(units)  # a distributed run's mean over the ranks
            for name, norm in self.max_grad_norm.items():
                clip_grad_norm_([p for p in self.groups[name] if p.grad is not None], norm)
            self.optimizer.step()
            self.stage_step += 1
            if self.alternator is not None and self.alternator.update(self._alternation_losses(terms)):
                self._set_trainable(epoch_idx)
            for name, value in terms.items():
                totals[name] += value.item()
            for name, value in getattr(self.model, "loss_diagnostics", {}).items():
                diagnostics[name] += value
            batches += 1
        means = {name: total / max(batches, 1) for name, total in totals.items()}
        diagnostics = {name: total / max(batches, 1) for name, total in diagnostics.items()}
        step = self._run_epoch(epoch_idx)
        self.tensorboard.add_scalar("stage", self.stage_index, step)
        self.tensorboard.add_scalar("learning_rate", self.optimizer.param_groups[0]["lr"], step)
        for name, value in means.items():
            self.tensorboard.add_scalar(f"loss/{name}", value, step)
        for name, value in diagnostics.items():
            self.tensorboard.add_scalar(f"diagnostics/{name}", value, step)
        if self.alternator is not None:
            self.tensorboard.add_scalar("alternation/switches", self.alternator.switches, step)
        if interaction is not None:
            for name, value in self._epoch_logs(interaction).items():
                self.tensorboard.add_scalar(name, value, step)
        self.logger.info(
            f"stage {stage.name} epoch {epoch_idx}: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items())
            + ("; " + ", ".join(f"{k} {v:.4f}" for k, v in diagnostics.items()) if diagnostics else "")
        )
        return means.get("loss", 0.0)

    def _add_train_loss_to_tensorboard(self, epoch_idx, losses, tag="Loss/Train"):
        super()._add_train_loss_to_tensorboard(self._run_epoch(epoch_idx), losses, tag)

    # ---- validation, best weights, checkpoints -------------------------------------------------------------
    def _valid_epoch(self, valid_data, show_progress=False):
        score, result = super()._valid_epoch(valid_data, show_progress)
        bigger = self.valid_metric_bigger
        if early_stopping(score, self.best_valid_score, 0, 0, bigger)[3]:
            self._stage_best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self._run_improved = early_stopping(score, self.run_best_score, 0, 0, bigger)[3]
        if self._run_improved:
            self.run_best_score, self.run_best_result, self.run_best_stage = score, result, self.stage.name
        self.tensorboard.add_scalar(f"valid/{self.valid_metric}", score, self.epoch_offset + self._epoch_idx)
        return score, result

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        # RecBole saves on every improvement of the stage; the best-model file keeps the best of the whole run
        if self._run_improved or not self._validating:
            super()._save_checkpoint(epoch, verbose, **kwargs)

    def _model_state(self, epoch, best_score, best_result):
        state = super()._model_state(epoch, best_score, best_result)
        state["stage"] = {"index": self.stage_index, "name": self.stage.name}
        return state

    def _run_epoch(self, epoch_idx):
        return self.epoch_offset + epoch_idx

    def _trained_epochs(self, epoch_idx):
        if self._epochs_before_stage is None or epoch_idx < 0:
            return None
        return self._epochs_before_stage + epoch_idx + 1

    def _run_best(self):
        return self.run_best_score, self.run_best_result

    def _extra_resume_state(self):
        return {
            "staged": {
                "stage_index": self.stage_index,
                "stage_step": self.stage_step,
                "alternator": self.alternator.state_dict() if self.alternator is not None else None,
                "stage_best_state": self._stage_best_state,
                "run_best_stage": self.run_best_stage,
            }
        }

    def _restore(self, state, resume_file):
        staged = state.get("staged")
        if staged is None:
            raise CheckpointError(f"checkpoint {resume_file} was not written by a staged trainer (no stage state); it cannot resume {type(self).__name__}")
        if not 0 <= staged["stage_index"] < len(self.stages):
            raise CheckpointError(f"checkpoint {resume_file} is at stage {staged['stage_index']}, but this run has {len(self.stages)} stages")
        self._enter_stage(staged["stage_index"])
        trained = state.get("trained_epochs")  # the run's epochs up to this stage's saved one; None in older files
        self._epochs_before_stage = None if trained is None else trained - state["epoch"] - 1
        self.run_best_score, self.run_best_result = run_best(state)
        self.run_best_stage = staged["run_best_stage"]
        super()._restore(state, resume_file)  # writes the best-model file, with the run's best (_run_best)
        self.stage_step, self._stage_epochs_done = staged["stage_step"], self.start_epoch
        if self.alternator is not None:
            self.alternator.load_state_dict(staged["alternator"])
        self._stage_best_state = staged["stage_best_state"]
        self._resumed = True
