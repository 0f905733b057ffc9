"""What a Ray Tune search writes: each trial's record, the result tables (``results.md``, ``results.csv``) and the
best configuration (``best.yaml``). The search and its trainable: :mod:`recbole_ur4rec.experiments.tuning`."""
import os
import time

import yaml

from recbole_ur4rec.common.checkpoint_io import CheckpointError, load_checkpoint, newest_resume_file, run_best
from recbole_ur4rec.common.tables import markdown_table, plain, write_csv, write_text
from recbole_ur4rec.experiments.compare_report import shown_path

TRIAL_METRIC = "valid_score"  # the key every trial reports after each validation; ASHA watches it


def trial_checkpoint_dir(checkpoint_root, trial_id):
    return os.path.join(checkpoint_root, trial_id)


def last_error_line(error_file):
    """The exception line of a Ray trial's error file (the traceback's last non-empty line)."""
    if not error_file or not os.path.isfile(error_file):
        return "failed (no error file)"
    with open(error_file, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else "failed"


class SearchRecorder:
    """What the search knows about each trial; rewrites ``results.md`` and ``results.csv`` after every event."""

    def __init__(self, output_dir, space, header, valid_metric, bigger, checkpoint_root):
        self.output_dir = output_dir
        self.space = space
        self.header = header
        self.valid_metric = valid_metric
        self.bigger = bigger
        self.checkpoint_root = checkpoint_root
        self.trials = {}  # trial_id -> record
        self._trial_objects = {}  # trial_id -> Ray's Trial (its error file appears after the error callback)
        self.best_trial_id = None
        self.notes = []
        self.finished = False  # until finish(): results.md says it is a live table

    def record(self, trial):
        rec = self.trials.setdefault(
            trial.trial_id,
            {"trial": trial.trial_id, "status": "running", "iterations": 0, "time_s": None, "error": None, "scores": []},
        )
        rec["params"] = {name: plain(trial.config.get(name)) for name in self.space}
        self._trial_objects[trial.trial_id] = trial
        return rec

    def on_start(self, trial):
        self.record(trial)
        self.write()

    def on_result(self, trial, result):
        rec = self.record(trial)
        if TRIAL_METRIC in result:
            rec["scores"].append(float(result[TRIAL_METRIC]))
            rec["iterations"] = int(result.get("training_iteration", len(rec["scores"])))
        # training and validation seconds of the trial, over every run of a resumed search
        rec["time_s"] = result.get("trial_seconds", result.get("time_total_s", rec["time_s"]))
        self.write()

    def on_stopped_early(self, trial):
        self.record(trial)["stopped_early"] = True

    def on_complete(self, trial):
        rec = self.record(trial)
        rec["status"] = "stopped by ASHA" if rec.get("stopped_early") else "completed"
        self.write()

    def on_error(self, trial):
        rec = self.record(trial)
        rec["status"] = "failed"
        rec["error"] = last_error_line(trial.error_file)
        self.write()

    def best_score(self, rec):
        """The best validation score the trial reported (ASHA's view: every validation of every stage)."""
        if not rec["scores"]:
            return None
        return max(rec["scores"]) if self.bigger else min(rec["scores"])

    def model_score(self, rec):
        """The validation score of the trial's model file, which the best trial is chosen on; the best reported
        score when the checkpoint holds none. The two are equal, except for a staged trial checkpointed before the
        run's best was kept (``checkpoints.run_best``): its file names the best of the stage it stopped in."""
        score = (rec.get("valid_result") or {}).get(self.valid_metric.lower())
        return float(score) if score is not None else self.best_score(rec)

    def finish(self, interrupted):
        """Final statuses, the valid metrics and searched values stored in each trial's checkpoint, the best trial (on
        validation)."""

        self.finished = True
        for rec in self.trials.values():
            if rec["status"] == "running":
                rec["status"] = "interrupted" if interrupted else "unfinished"
            if rec["status"] == "failed":
                rec["error"] = last_error_line(self._trial_objects[rec["trial"]].error_file)
            last = newest_resume_file(trial_checkpoint_dir(self.checkpoint_root, rec["trial"]))
            if last is not None:
                rec["model_file"] = last[: -len("-last.pth")] + ".pth"
                try:
                    state = load_checkpoint(last)
                    rec["valid_result"] = run_best(state)[1] or {}
                    # the values it trained with: a resumed trial keeps its stored ones (a new sample's last bits may differ)
                    trained = state.get("config") or {}
                    rec["params"].update({name: plain(trained[name]) for name in self.space if name in trained})
                except CheckpointError as err:
                    rec["error"] = rec["error"] or str(err)
        candidates = [r for r in self.trials.values() if self.model_score(r) is not None and os.path.isfile(r.get("model_file") or "")]
        if candidates:
            sign = 1 if self.bigger else -1
            best = max(candidates, key=lambda r: sign * self.model_score(r))
            self.best_trial_id = best["trial"]
        return self.trials.get(self.best_trial_id)

    def rows(self):
        rows = []
        for rec in sorted(self.trials.values(), key=lambda r: r["trial"]):
            row = {"trial": rec["trial"], "status": rec["status"], "epochs reported": rec["iterations"]}
            row.update({name: rec["params"].get(name) for name in self.space})
            row[f"best valid {self.valid_metric}"] = self.best_score(rec)
            for metric, value in (rec.get("valid_result") or {}).items():
                row[f"valid {metric}"] = value
            for metric, value in (rec.get("test_result") or {}).items():
                row[f"test {metric}"] = value
            row["best"] = "yes" if rec["trial"] == self.best_trial_id else ""
            row["time_s"] = rec["time_s"]
            row["error"] = rec["error"]
            row["model_file"] = shown_path(rec["model_file"]) if rec.get("model_file") else None
            rows.append(row)
        return rows

    def write(self):
        rows = self.rows()
        headers = []
        for row in rows:
            headers += [h for h in row if h not in headers]
        tail = ["best", "time_s", "error", "model_file"]  # after the metrics, whichever row brought them first
        headers = [h for h in headers if h not in tail] + tail
        write_csv(os.path.join(self.output_dir, "results.csv"), headers, rows)
        # results.md stays readable: the evaluation slices' columns ("valid ndcg@10/head") are in results.csv only
        md_headers = [h for h in headers if h != "model_file" and "/" not in h]
        notes = "".join(f"\n{note}\n" for note in self.notes)
        if not self.finished:  # a search killed outright (kill -9, a session's end) leaves this table as it was
            notes += (
                f"\nLive table, last written {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC while the search ran: "
                "if that search is no longer running it was killed, and its `running` trials are interrupted; rerun "
                "the search to continue them.\n"
            )
        write_text(os.path.join(self.output_dir, "results.md"), self.header + "\n" + markdown_table(md_headers, rows) + notes)


def ray_callback(recorder):
    from ray.tune import Callback

    class _Recorder(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            recorder.on_start(trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            recorder.on_result(trial, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            recorder.on_complete(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            recorder.on_error(trial)

    return _Recorder()


SEARCH_BUDGET_KEYS = ("epochs",)  # a search's training budget, not a setting it chose


def best_config_yaml(path, model, dataset, settings, params, header_lines):
    """Write the best configuration as a yaml file that ``run_recbole_ur4rec.py --config_files`` accepts: the user's
    settings and the best trial's values. The search's budget (``epochs``, unless searched) is named in a comment,
    not repeated: a run from the file trains to early stopping under the model's own epoch limit."""
    budget = {k: settings[k] for k in SEARCH_BUDGET_KEYS if k in settings and k not in params}
    merged = plain({**{k: v for k, v in settings.items() if k not in budget}, **params})
    lines = [f"# {line}" for line in header_lines]
    if budget:
        lines.append(f"# search budget, not repeated here: {', '.join(f'{k}: {v}' for k, v in budget.items())}")
    lines.append(f"# python run_recbole_ur4rec.py -m {model} -d {dataset} --config_files {shown_path(path)}")
    write_text(path, "\n".join(lines) + "\n" + yaml.safe_dump(merged, sort_keys=False, default_flow_style=None))
