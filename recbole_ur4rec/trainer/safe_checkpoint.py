"""Safe checkpointing for any RecBole trainer: tensors and plain data only, resumable training.

RecBole pickles its ``Config`` into checkpoints, which ``torch.load(weights_only=True)`` (torch >= 2.6)
refuses. This mixin writes two files per run:

- ``<model>-<time>.pth``: the best model so far (weights, the user's config, training state);
- ``<model>-<time>-last.pth``: the state after the latest validation, including the best weights and their metrics
  (``run_best_score``, ``run_best_result``), every random number generator and the run's validations so far
  (``run_validations``: epoch, training loss, validation score and metrics, seconds), so ``--resume`` continues exactly where the run stopped and a resumed Ray Tune trial can
  report its earlier validations again. Its ``best_valid_score``/``best_valid_result`` are what early stopping
  continues from: a staged trainer's are its stage's.
"""
import inspect
import os
import random
import time
from collections.abc import Mapping

import numpy as np
import torch
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.utils import set_color

from recbole_ur4rec.common.checkpoint_io import CheckpointError, load_checkpoint, save_checkpoint
from recbole_ur4rec.common.checks import check_config_value
from recbole_ur4rec.evaluation.slices import EvaluatedRows, batch_rows, slice_masks, slice_results


def _plain_loss(loss):
    """A training epoch's loss as RecBole records it (a number, or a tuple of the loss's parts) as plain data."""
    if loss is None:
        return None
    return [float(part) for part in loss] if isinstance(loss, tuple) else float(loss)


def plain_data(value, key="config"):
    """Return ``value`` made of str/int/float/bool/None/list/dict/tensor only, or raise naming ``key``."""
    if isinstance(value, np.generic):  # before float: np.float64 subclasses float but pickles as numpy
        return value.item()
    if value is None or isinstance(value, (str, bool, int, float, torch.Tensor)):
        return value
    if isinstance(value, Mapping):
        return {str(k): plain_data(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise CheckpointError(f"{key} holds a {type(value).__name__}, which a safe checkpoint cannot store")


def checkpoint_config(config):
    """The user's settings of ``config`` (files, dict, command line) with an absolute data root."""
    settings = dict(config.external_config_dict)
    settings["data_path"] = os.path.dirname(os.path.abspath(config["data_path"]))
    return plain_data(settings)


def rng_state(train_data):
    python_version, python_state, python_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [python_version, list(python_state), python_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
        "train_loader": train_data.generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state, train_data):
    python_version, python_state, python_gauss = state["python"]
    random.setstate((python_version, tuple(python_state), python_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    train_data.generator.set_state(state["train_loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class SafeCheckpointMixin:
    """Put before a RecBole ``Trainer`` in the bases to give it safe, resumable checkpoints."""

    _pending_rng_state = None  # set by resume_checkpoint, applied by fit (which has the train loader)
    _best_state_dict = None  # a copy of the weights last written to the best-model file
    _best_epoch = None  # the epoch of those weights (RecBole re-saves a finished run's best as epoch -1)
    _best_trained_epochs = None  # epochs of the whole run up to those weights (staged trainers: over their stages)
    _keep_in_memory = False  # fit(saved=False): the best model's state is kept here instead of in a file
    _best_in_memory = None
    last_valid_result = None  # the latest validation's metrics (set by _valid_epoch)
    _validation_unrecorded = False  # a validation ran that fit has not called back on: a save now is its improvement
    run_validations = None  # every validation of the run, resumed segments included: epoch, score, result, seconds
    _seconds_before = 0.0  # training and validation seconds of the segments before a resume
    _clock = None  # when this segment's first fit started
    last_evaluated_rows = None  # the latest evaluation's users and rows (slices.EvaluatedRows): full ranking only

    @property
    def last_checkpoint_file(self):
        return os.path.splitext(self.saved_model_file)[0] + "-last.pth"

    def _model_state(self, epoch, best_score, best_result):
        other = self.model.other_parameter()
        if other is not None:  # a submodule named there (SASRecF's feature_embed_layer) is in the state_dict already
            other = {key: value for key, value in other.items() if not isinstance(value, torch.nn.Module)}
        return {
            "model": self.config["model"],
            "dataset": self.config["dataset"],
            "config": checkpoint_config(self.config),
            "epoch": epoch,
            "trained_epochs": self._trained_epochs(epoch),  # the run's budget so far; "epoch" is a staged trainer's stage-local one
            "cur_step": self.cur_step,
            "best_valid_score": float(best_score),
            "best_valid_result": plain_data(best_result, "best_valid_result"),
            "state_dict": self.model.state_dict(),
            "other_parameter": plain_data(other, "other_parameter") if other is not None else None,
        }

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        explicit_file = "saved_model_file" in kwargs  # a caller that names a file wants it written, whatever fit did
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        if epoch < 0 and self._best_epoch is not None:  # fit's re-save of a finished run: still the best epoch's weights
            epoch = self._best_epoch
        if self._validation_unrecorded:  # RecBole saves an improvement before it sets best_valid_result: set it first
            self.best_valid_result = self.last_valid_result
        self._best_epoch = epoch
        state = self._model_state(epoch, *self._run_best())
        self._best_trained_epochs = state["trained_epochs"]
        if self._keep_in_memory and not explicit_file:  # fit(saved=False): nothing is written, the best stays here
            state["state_dict"] = {name: tensor.detach().clone() for name, tensor in state["state_dict"].items()}
            self._best_in_memory = self._best_state_dict = state
            return
        save_checkpoint(state, saved_model_file)
        self._best_state_dict = {name: tensor.detach().clone() for name, tensor in state["state_dict"].items()}
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")

    def _save_last_checkpoint(self, epoch, train_data):
        state = self._model_state(epoch, self.best_valid_score, self.best_valid_result)  # what early stopping resumes from
        run_best_score, run_best_result = self._run_best()
        state.update(
            run_best_score=float(run_best_score),
            run_best_result=plain_data(run_best_result, "run_best_result"),
            optimizer=self.optimizer.state_dict(),
            rng=rng_state(train_data),
            stopped=self.cur_step > self.stopping_step,
            best_state_dict=self._best_state_dict if self._best_state_dict is not None else self.model.state_dict(),
            best_epoch=self._best_epoch,  # None until this process saved a best (or resumed one that names it)
            best_trained_epochs=self._best_trained_epochs,
            run_validations=self.run_validations or [],
            **self._extra_resume_state(),
        )
        save_checkpoint(state, self.last_checkpoint_file)

    def _run_best(self):
        """The best validation's score and metrics so far, as the best-model file records them (staged trainers: the
        best of the whole run, not of the stage)."""
        return self.best_valid_score, self.best_valid_result

    def _valid_epoch(self, valid_data, show_progress=False):
        score, result = super()._valid_epoch(valid_data, show_progress)
        self.last_valid_result, self._validation_unrecorded = result, True
        return score, result

    def _run_epoch(self, epoch_idx):
        """The epoch's index in the whole run (staged trainers count over their stages)."""
        return epoch_idx

    def _trained_epochs(self, epoch_idx):
        """Epochs the whole run has trained up to and including ``epoch_idx`` (staged trainers: over their stages,
        as trained, not as scheduled); None when unknown."""
        return epoch_idx + 1 if epoch_idx >= 0 else None

    def _record_validation(self, epoch_idx, valid_score):
        self.run_validations = self.run_validations or []
        self.run_validations.append(
            {
                "epoch": self._run_epoch(epoch_idx),
                "score": float(valid_score),
                "train_loss": _plain_loss(self.train_loss_dict.get(epoch_idx)),  # the epoch's, before this validation
                "result": plain_data(self.last_valid_result or {}, "valid_result"),
                "seconds": round(self._seconds_before + time.monotonic() - self._clock, 3),
            }
        )

    def _extra_resume_state(self):
        """More resume state (plain data and tensors) for the ``-last.pth`` file; trainers with state of their own add it."""
        return {}

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        """RecBole's ``fit``; with ``saved=False`` nothing is written, and the best-validation state is kept in
        memory, so that :meth:`evaluate` still tests the best weights, as with saving."""
        self._keep_in_memory = not saved
        if self._clock is None:
            self._clock = time.monotonic()
        if self._pending_rng_state is not None:
            restore_rng_state(self._pending_rng_state, train_data)
            self._pending_rng_state = None

        wanted = inspect.signature(callback_fn).parameters if callback_fn is not None else {}

        def after_validation(epoch_idx, valid_score):
            self._validation_unrecorded = False
            self._record_validation(epoch_idx, valid_score)
            if saved:
                self._save_last_checkpoint(epoch_idx, train_data)
            if callback_fn is not None:  # keyword arguments for callbacks that name them (or take **kwargs)
                extra = {"valid_result": self.last_valid_result, "validation": self.run_validations[-1]}
                if not any(p.kind == p.VAR_KEYWORD for p in wanted.values()):
                    extra = {key: value for key, value in extra.items() if key in wanted}
                callback_fn(epoch_idx, valid_score, **extra)

        return super().fit(train_data, valid_data, verbose, True, show_progress, callback_fn=after_validation)

    def resume_checkpoint(self, resume_file, state=None):
        """Continue a run from a ``-last.pth`` (or best) checkpoint written by this mixin; ``state``: the checkpoint
        already read (the quick start reads it once for the run's settings), else it is read here, once."""
        self._restore(load_checkpoint(resume_file, self.device) if state is None else state, resume_file)

    def _continues_in_place(self, resume_file):
        """Whether a resumed run writes on in the files it resumed from: a ``-last.pth`` in this run's checkpoint
        folder (a file from elsewhere is left as it is, and the run writes new files in its own folder)."""
        resume_file = str(resume_file)
        return resume_file.endswith("-last.pth") and os.path.samefile(os.path.dirname(os.path.abspath(resume_file)), self.checkpoint_dir)

    def _restore(self, state, resume_file):
        """Restore the training state from ``state`` (read from ``resume_file``); subclasses extend it."""
        if state["model"] != self.config["model"]:
            raise CheckpointError(
                f"checkpoint {resume_file} was written by model {state['model']}, not {self.config['model']}"
            )
        if "optimizer" not in state:
            raise CheckpointError(f"checkpoint {resume_file} holds no training state (optimizer, rng); it cannot resume")
        self.model.load_state_dict(state["state_dict"])
        self.model.load_other_parameter(state.get("other_parameter"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch = state["epoch"] + 1
        self.cur_step = state["cur_step"]
        self.best_valid_score = state["best_valid_score"]
        self.best_valid_result = state["best_valid_result"]
        self._pending_rng_state = state["rng"]
        self.run_validations = list(state.get("run_validations") or [])
        self._seconds_before = self.run_validations[-1]["seconds"] if self.run_validations else 0.0
        if self._continues_in_place(resume_file):  # the run goes on in its own files: no stale pair per segment
            self.saved_model_file = os.path.join(self.checkpoint_dir, os.path.basename(str(resume_file))[: -len("-last.pth")] + ".pth")
        # the best weights go to this run's best-model file, so the test evaluation uses them
        self._best_epoch = state.get("best_epoch")  # None in files written before it was kept: their last epoch
        best = dict(state, state_dict=state["best_state_dict"], epoch=state["epoch"] if self._best_epoch is None else self._best_epoch)
        best_score, best_result = self._run_best()
        best.update(best_valid_score=float(best_score), best_valid_result=plain_data(best_result, "best_valid_result"))
        self._best_trained_epochs = best["trained_epochs"] = state.get("best_trained_epochs")  # None in older files
        for key in ("optimizer", "rng", "best_state_dict", "best_epoch", "best_trained_epochs", "stopped", "format", "run_validations", "run_best_score", "run_best_result"):
            best.pop(key, None)
        save_checkpoint(best, self.saved_model_file)
        self._best_state_dict = state["best_state_dict"]
        if state["stopped"] or self.start_epoch >= self.epochs:
            # training had finished: fit() only re-saves the current weights, which must be the best
            self.model.load_state_dict(state["best_state_dict"])
            self.start_epoch = self.epochs
        self.logger.info(f"Checkpoint {resume_file} loaded. Resume training from epoch {self.start_epoch}")

    def best_model_state(self, model_file=None):
        """The best model's checkpoint state: ``model_file``, else the best kept in memory (``fit(saved=False)``),
        else the best-model file."""
        if model_file is None and self._keep_in_memory:
            if self._best_in_memory is None:
                raise ValueError("no best model to evaluate: fit(saved=False) has not validated or trained an epoch yet")
            self.logger.info("Loading the best model's parameters kept in memory (nothing was saved)")
            return self._best_in_memory
        checkpoint_file = model_file or self.saved_model_file
        self.logger.info(f"Loading model structure and parameters from {checkpoint_file}")
        return load_checkpoint(checkpoint_file, self.device)

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        self.last_evaluated_rows = None  # kept by a central full-ranking evaluation only
        if load_best_model and eval_data:
            state = self.best_model_state(model_file)
            self.model.load_state_dict(state["state_dict"])
            self.model.load_other_parameter(state.get("other_parameter"))
        if not (eval_data and isinstance(eval_data, FullSortEvalDataLoader)):
            return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)
        # RecBole's evaluation, with each batch's users and targets and the collected rows kept (last_evaluated_rows,
        # the slices)
        collector, rows, captured = self.eval_collector, [], {}
        collect, get_struct = collector.eval_batch_collect, collector.get_data_struct
        uid_field = self.config["USER_ID_FIELD"]

        def collect_rows(scores, interaction, positive_u, positive_i):
            rows.append(batch_rows(interaction, positive_u, positive_i, uid_field))
            return collect(scores, interaction, positive_u, positive_i)

        def keep_struct():
            captured["struct"] = get_struct()
            return captured["struct"]

        collector.eval_batch_collect, collector.get_data_struct = collect_rows, keep_struct
        try:
            result = super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)
        finally:
            del collector.eval_batch_collect, collector.get_data_struct  # back to the class's methods
        users = torch.cat([u for u, _ in rows])
        struct = captured["struct"]
        if "rec.topk" in struct and len(struct["rec.topk"]) != len(users):  # the collector kept an earlier, failed run's
            raise RuntimeError(f"evaluation collected {len(struct['rec.topk'])} ranked rows for {len(users)} evaluated users")
        self.last_evaluated_rows = EvaluatedRows(users, struct)
        counts = getattr(eval_data, "training_counts", None)
        if counts is None or not self.config["eval_slices"]:
            return result
        targets = None if any(t is None for _, t in rows) else torch.cat([t for _, t in rows])
        head_share = check_config_value(self.config, "slice_head_share", (int, float), low=0, high=1, low_open=True, high_open=True)
        masks = slice_masks(counts, users, targets, head_share)
        result.update(slice_results(self.evaluator, struct, masks))
        return result
