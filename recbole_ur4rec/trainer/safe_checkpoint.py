"""Safe checkpointing for any RecBole trainer: tensors and plain data only, resumable training.

RecBole pickles its ``Config`` into checkpoints, which ``torch.load(weights_only=True)`` (torch >= 2.6)
refuses. This mixin writes two files per run:

- ``<model>-<time>.pth``: the best model so far (weights, the user's config, training state);
- ``<model>-<time>-last.pth``: the state after the latest validation, including the best weights and their metrics
  (``run_best_score``, ``run_best_result``), every random number generator and the run's validations so far
  (``run_validations``: epoch, training loss, validation score and metrics, seconds), so ``--resume`` continues exactly where the run stopped and a resumed Ray Tune trial can
  report its earlier validations again. Its ``best_valid_score``/``best_valid_result`` are what early stopping
  continues from: a staged trainer's are its stage's.

In a distributed run rank 0 writes the files (with every rank's random generators), every rank keeps the best
weights in memory for the test evaluation, and every rank reads a resumed file itself (safely, as above).
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

from recbole_ur4rec.common import distributed
from recbole_ur4rec.common.checkpoint_io import CheckpointError, load_checkpoint, save_checkpoint
from recbole_ur4rec.common.checks import check_config_value
from recbole_ur4rec.evaluation.slices import EvaluatedRows, batch_rows, slice_masks, slice_results
from recbole_ur4rec.trainer.distributed import ROW_KEYS, DistributedTrainingMixin, merge_rows


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
    """The user's settings of ``config`` (files, dict, command line) with an absolute data root; a distributed run's
    place of the rank (``local_rank``, ``world_size``...) is not a setting: a checkpoint resumes with any number of ranks."""
    settings = {key: value for key, value in config.external_config_dict.items() if key not in distributed.DISTRIBUTED_KEYS}
    settings["data_path"] = os.path.dirname(os.path.abspath(config["data_path"]))
    return plain_data(settings)


def rng_state(train_data=None):
    """This process's random generators, and ``train_data``'s loader generator when given."""
    python_version, python_state, python_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [python_version, list(python_state), python_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if train_data is not None:
        state["train_loader"] = train_data.generator.get_state()
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


class SafeCheckpointMixin(DistributedTrainingMixin):
    """Put before a RecBole ``Trainer`` in the bases to give it safe, resumable checkpoints (and distributed
    training, :class:`~recbole_ur4rec.trainer.distributed.DistributedTrainingMixin`)."""

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
        explicit_file = "saved_model_file" in kwargs  # a caller that names a file wants it written, whatever fit did
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        if epoch < 0 and self._best_epoch is not None:  # fit's re-save of a finished run: still the best epoch's weights
            epoch = self._best_epoch
        if self._validation_unrecorded:  # RecBole saves an improvement before it sets best_valid_result: set it first
            self.best_valid_result = self.last_valid_result
        self._best_epoch = epoch
        state = self._model_state(epoch, *self._run_best())
        self._best_trained_epochs = state["trained_epochs"]
        unwritten = self._keep_in_memory and not explicit_file  # fit(saved=False): nothing is written
        state["state_dict"] = {name: tensor.detach().clone() for name, tensor in state["state_dict"].items()}
        self._best_state_dict = state["state_dict"]
        if unwritten or self.distributed:  # the best stays here (a distributed run: on every rank, for its test)
            self._best_in_memory = state
        if unwritten or distributed.rank() != 0:  # rank 0 writes
            return
        save_checkpoint(state, saved_model_file)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")

    def _save_last_checkpoint(self, epoch, train_data):
        rank_rng = distributed.all_gather_plain(rng_state(train_data))  # every rank's own generators (a collective)
        if distributed.rank() != 0:
            return
        state = self._model_state(epoch, self.best_valid_score, self.best_valid_result)  # what early stopping resumes from
        run_best_score, run_best_result = self._run_best()
        state.update(
            run_best_score=float(run_best_score),
            run_best_result=plain_data(run_best_result, "run_best_result"),
            optimizer=self.optimizer.state_dict(),
            rng=rank_rng[0],
            rank_rng=rank_rng[1:],  # ranks 1.. of a distributed run, resumed by a run with as many ranks
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
        self._pending_rng_state = self._rank_rng_state(state, resume_file)
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
        for key in ("optimizer", "rng", "rank_rng", "best_state_dict", "best_epoch", "best_trained_epochs", "stopped", "format", "run_validations", "run_best_score", "run_best_result"):
            best.pop(key, None)
        if distributed.rank() == 0:
            save_checkpoint(best, self.saved_model_file)
        self._best_state_dict = state["best_state_dict"]
        if self.distributed:
            self._best_in_memory = best
        if state["stopped"] or self.start_epoch >= self.epochs:
            # training had finished: fit() only re-saves the current weights, which must be the best
            self.model.load_state_dict(state["best_state_dict"])
            self.start_epoch = self.epochs
        self.logger.info(f"Checkpoint {resume_file} loaded. Resume training from epoch {self.start_epoch}")

    def _rank_rng_state(self, state, resume_file):
        """This rank's random generators from a resume ``state``: its own when the run had as many ranks; otherwise
        rank 0 takes the stored ones and the other ranks keep theirs (seeded with ``seed + rank``), all with the
        stored training loader's generator, which decides every rank's share of each batch."""
        rank, ranks = distributed.rank(), [state["rng"]] + list(state.get("rank_rng") or [])
        if len(ranks) == distributed.world_size():
            return ranks[rank]
        if rank == 0:
            self.logger.info(
                f"{resume_file} was written by {len(ranks)} rank(s), this run has {distributed.world_size()}: rank 0 "
                f"resumes its random generators, the other ranks start theirs from seed + rank"
            )
            return state["rng"]
        return dict(rng_state(), train_loader=state["rng"]["train_loader"])

    def best_model_state(self, model_file=None):
        """The best model's checkpoint state: ``model_file``, else the best kept in memory (``fit(saved=False)``, or
        a distributed run), else the best-model file."""
        if model_file is None and (self._keep_in_memory or (self.distributed and self._best_in_memory is not None)):
            if self._best_in_memory is None:
                raise ValueError("no best model to evaluate: fit(saved=False) has not validated or trained an epoch yet")
            self.logger.info("Loading the best model's parameters kept in memory (nothing was saved)")
            return self._best_in_memory
        checkpoint_file = model_file or self.saved_model_file
        self.logger.info(f"Loading model structure and parameters from {checkpoint_file}")
        return load_checkpoint(checkpoint_file, self.device)

    def _prepare_evaluation(self):
        """Hook: run on every rank before the evaluation's batches (a rank may have none), with the weights loaded."""

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        self.last_evaluated_rows = None  # kept by a central full-ranking evaluation only
        if load_best_model and eval_data:
            state = self.best_model_state(model_file)
            self.model.load_state_dict(state["state_dict"])
            self.model.load_other_parameter(state.get("other_parameter"))
        if eval_data:
            self._prepare_evaluation()
        full_sort = bool(eval_data) and isinstance(eval_data, FullSortEvalDataLoader)
        if not (full_sort or (eval_data and self.distributed)):
            return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)
        # RecBole's evaluation, with each batch's users and targets and the collected rows kept (last_evaluated_rows,
        # the slices); in a distributed run the ranks' rows are merged before RecBole computes the metrics
        collector, rows, captured = self.eval_collector, [], {}
        collect, get_struct = collector.eval_batch_collect, collector.get_data_struct
        uid_field = self.config["USER_ID_FIELD"]
        batch_sizes = []  # per batch: rows it added to each collected entry (a distributed run's merge splits by them)

        def collect_rows(scores, interaction, positive_u, positive_i):
            if full_sort:
                rows.append(batch_rows(interaction, positive_u, positive_i, uid_field))
            before = {key: len(collector.data_struct[key]) for key in ROW_KEYS if key in collector.data_struct}
            collect(scores, interaction, positive_u, positive_i)
            sizes = {key: len(collector.data_struct[key]) - before.get(key, 0) for key in ROW_KEYS if key in collector.data_struct}
            if full_sort:
                sizes["users"] = len(rows[-1][0])
                if rows[-1][1] is not None:
                    sizes["targets"] = len(rows[-1][1])
            batch_sizes.append(sizes)

        def keep_struct():
            struct = get_struct()
            if self.distributed:
                local = {key: struct[key] for key in ROW_KEYS if key in struct}
                if rows:
                    local["users"] = torch.cat([u for u, _ in rows])
                    local["targets"] = torch.cat([t for _, t in rows if t is not None] or [torch.zeros(0, dtype=torch.long)])
                merged = merge_rows(local, batch_sizes)
                for key in ROW_KEYS:
                    if key in merged:
                        struct.set(key, merged[key])
                if "users" in merged:  # targets only when every batch had them (one target per row)
                    targets = merged.get("targets")
                    rows[:] = [(merged["users"], targets if targets is not None and len(targets) == len(merged["users"]) else None)]
            captured["struct"] = struct
            return struct

        collector.eval_batch_collect, collector.get_data_struct = collect_rows, keep_struct
        try:
            result = super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)
        finally:
            del collector.eval_batch_collect, collector.get_data_struct  # back to the class's methods
        if not full_sort:
            return result
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
