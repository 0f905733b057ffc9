"""Default against tuned, per model, on ml-100k: the default-vs-tuned table of results/README.md.

    python results/ml-100k-tuned/default_vs_tuned.py   # writes results/ml-100k-tuned/default_vs_tuned.md

Default: the model's settings as shipped, from the earlier comparisons (``results/ml-100k-slices``, and
``results/ml-100k`` for RecBole's SASRec, GRU4Rec, BERT4Rec and FEARec, which ran capped at 2 epochs there); for
RecBole's baselines the converged run (``results/ml-100k-converged``, results/ml-100k-converged/run.sh: no epoch
cap) replaces the capped one as soon as one of its seeds has finished.
Tuned: ``results/ml-100k-tuned`` (results/ml-100k-tuned/run.sh: each search's best.yaml, 3 seeds, early
stopping). The search's trials and wall time come from ``results/hyper/ml-100k/<search>/results.md``; a model
without that folder shows as not searched, one whose search has not finished as not finished. A difference
smaller than the larger of the two seed stds is called noise.
"""
import argparse
import csv
import os
import re

# label in the tuned comparison -> (search folder, default comparison folder, label there, default budget note)
MODELS = {
    "FastSASRec": ("FastSASRec", "results/ml-100k-slices", "FastSASRec", ""),
    "DuoRec": ("DuoRec", "results/ml-100k-slices", "DuoRec", ""),
    "FTRagRec": ("FTRagRec", "results/ml-100k-slices", "FTRagRec", ""),
    "UR4Rec": ("UR4Rec", "results/ml-100k-slices", "UR4Rec:text", ""),
    "FedDMMR:central": ("FedDMMR_central", "results/ml-100k-slices", "FedDMMR:central", ""),
    "FedDMMR:federated": ("FedDMMR_federated_asha5", "results/ml-100k-slices", "FedDMMR:federated", ""),
    "SASRec": ("SASRec", "results/ml-100k", "SASRec", "capped at 2 epochs"),
    "SASRecF": ("SASRecF", "results/ml-100k-slices", "SASRecF", "capped at 2 epochs"),
    "GRU4Rec": ("GRU4Rec", "results/ml-100k", "GRU4Rec", "capped at 2 epochs"),
    "BERT4Rec": ("BERT4Rec", "results/ml-100k", "BERT4Rec", "capped at 2 epochs"),
    "FEARec": ("FEARec", "results/ml-100k", "FEARec", "capped at 2 epochs"),
}
CONVERGED_DEFAULTS = "results/ml-100k-converged"  # RecBole's baselines with their defaults, to early stopping
METRIC = "test ndcg@10"
VALID = "valid ndcg@10"  # what the searches selected on: shown beside the test metric, to see what carried over


def read_rows(path):
    if not os.path.isfile(path):
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {row["model"]: row for row in csv.DictReader(f)}


def number(row, key):
    value = (row or {}).get(key, "")
    return float(value) if value not in ("", None) else None


def search_summary(search_dir):
    """(trials, search seconds, best trial's valid score) of a finished search; None when it has not finished."""
    md = os.path.join(search_dir, "results.md")
    if not os.path.isfile(md) or not os.path.isfile(os.path.join(search_dir, "best.yaml")):
        return None
    text = open(md, encoding="utf-8").read()
    seconds = re.search(r"Search time: (\d+) s", text)
    if "search was interrupted" in text or not seconds:
        return None
    trials = sum(1 for line in text.splitlines() if re.match(r"\| \S+ \| (completed|stopped by ASHA|failed) \|", line))
    # a search resumed across sessions: its last run's wall time is a part, its trials' seconds are the whole
    trial_seconds = re.search(r"trials: (\d+) s in all runs", text)
    return trials, max(int(seconds.group(1)), int(trial_seconds.group(1)) if trial_seconds else 0)


def mean_std(row, key, digits=4):
    mean, std = number(row, f"{key} mean"), number(row, f"{key} std")
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def verdict(default, tuned, metric=METRIC):
    """'+x% (noise)' when |difference| is under the larger seed std, else '+x%'."""
    d, t = number(default, f"{metric} mean"), number(tuned, f"{metric} mean")
    if d is None or t is None or d == 0:
        return "-"
    spread = max(number(default, f"{metric} std") or 0.0, number(tuned, f"{metric} std") or 0.0)
    change = f"{100 * (t - d) / d:+.0f}%"
    return f"{change} (noise)" if abs(t - d) < spread else change


def seeds_note(row):
    """' (1 of 3 seeds)' while a comparison is unfinished, else ''."""
    counts = [int(number(row, key) or 0) for key in ("seeds_ok", "seeds_failed", "seeds_missing")]
    return f" ({counts[0]} of {sum(counts)} seeds)" if row and counts[0] < sum(counts) else ""


def budget(row, note=""):
    epochs, best = number(row, "epochs_trained mean"), number(row, "best_epoch mean")
    if epochs is None:
        return "-"
    text = f"{epochs:.0f} (best {best:.0f})" if best is not None else f"{epochs:.0f}"
    seconds = number(row, "wall_time_s mean")
    text += f", {seconds:.0f} s" if seconds is not None else ""
    return f"{text}; {note}" if note else text


def table(root="."):
    tuned_rows = read_rows(os.path.join(root, "results/ml-100k-tuned/compare.csv"))
    converged_rows = read_rows(os.path.join(root, CONVERGED_DEFAULTS, "compare.csv"))
    lines = [
        f"| model | default {METRIC} | default {VALID} | default epochs (best), s per run | tuned {METRIC} | tuned {VALID} "
        f"| tuned epochs (best), s per run | change (test) | change (valid) | search: trials, s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, (search, default_dir, default_label, note) in MODELS.items():
        default = read_rows(os.path.join(root, default_dir, "compare.csv")).get(default_label)
        converged = converged_rows.get(label) if note else None
        if converged and (number(converged, "seeds_ok") or 0) > 0:
            default, note = converged, ""
        tuned = tuned_rows.get(label)
        search_dir = os.path.join(root, "results/hyper/ml-100k", search)
        summary = search_summary(search_dir)
        search_cell = f"{summary[0]}, {summary[1]}" if summary else "not finished" if os.path.isdir(search_dir) else "not searched"
        lines.append(
            f"| {label} | {mean_std(default, METRIC)}{seeds_note(default)} | {mean_std(default, VALID)} | {budget(default, note)} "
            f"| {mean_std(tuned, METRIC)}{seeds_note(tuned)} | {mean_std(tuned, VALID)} | {budget(tuned)} "
            f"| {verdict(default, tuned) if tuned else '-'} | {verdict(default, tuned, VALID) if tuned else '-'} | {search_cell} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="the repository (results/ below it)")
    args = parser.parse_args(argv)
    text = table(args.root)
    out = os.path.join(args.root, "results/ml-100k-tuned/default_vs_tuned.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write("# Default vs tuned on ml-100k (test NDCG@10, mean ± std over seeds 2020-2022)\n\n" + text)
    print(text)
    return text


if __name__ == "__main__":
    main()
