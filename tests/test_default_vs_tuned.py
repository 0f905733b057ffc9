"""results/ml-100k-tuned/default_vs_tuned.py: the results page's default-against-tuned table from the comparisons' CSV files."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "ml-100k-tuned"))

import default_vs_tuned  # noqa: E402

HEADER = "model,seeds_ok,seeds_failed,seeds_missing,test ndcg@10 mean,test ndcg@10 std,valid ndcg@10 mean,valid ndcg@10 std,epochs_trained mean,best_epoch mean,wall_time_s mean\n"


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_table_calls_differences_under_one_std_noise_and_names_unfinished_and_missing_searches(tmp_path):
    root = str(tmp_path)
    write(f"{root}/results/ml-100k-slices/compare.csv", HEADER + "FastSASRec,3,0,0,0.0600,0.0046,0.0646,0.001,32,21,580\nDuoRec,3,0,0,0.0500,0.0010,0.06,0.001,20,10,300\n")
    write(f"{root}/results/ml-100k/compare.csv", HEADER + "SASRec,3,0,0,0.0334,0.0012,0.0357,0.0015,2,2,819\nGRU4Rec,3,0,0,0.0177,0.0012,0.0161,0.0012,2,2,325\n")
    write(f"{root}/results/ml-100k-tuned/compare.csv", HEADER + "FastSASRec,3,0,0,0.0620,0.0030,0.0680,0.001,25,15,400\nDuoRec,1,0,2,0.0600,,0.07,,30,20,500\n")
    search = f"{root}/results/hyper/ml-100k/FastSASRec"
    write(f"{search}/best.yaml", "learning_rate: 0.002\n")
    write(f"{search}/results.md", "| trial | status |\n| t0 | completed | 35 |\n| t1 | stopped by ASHA | 5 |\n\nSearch time: 669 s.\n")
    interrupted = f"{root}/results/hyper/ml-100k/DuoRec"
    write(f"{interrupted}/best.yaml", "learning_rate: 0.002\n")
    write(f"{interrupted}/results.md", "| t0 | completed | 3 |\n\nSearch time: 9 s.\n\nThe search was interrupted: ...\n")

    resumed = f"{root}/results/hyper/ml-100k/GRU4Rec"  # its last run was a part of the search
    write(f"{resumed}/best.yaml", "learning_rate: 0.002\n")
    write(f"{resumed}/results.md", "| t0 | completed | 30 |\n\nSearch time: 799 s; trials: 23806 s in all runs.\n")

    rows = {line.split(" | ")[0].lstrip("| "): line for line in default_vs_tuned.table(root).splitlines()[2:]}
    assert rows["GRU4Rec"].endswith("| 1, 23806 |")
    assert "| +3% (noise) | +5% | 2, 669 |" in rows["FastSASRec"]  # test: 0.0020 under the default's std 0.0046
    assert "| 0.0600 ± 0.0046 | 0.0646 ± 0.0010 |" in rows["FastSASRec"]  # the default's validation beside its test
    assert "0.0620 ± 0.0030" in rows["FastSASRec"] and "32 (best 21), 580 s" in rows["FastSASRec"]
    assert "| +20% | +17% | not finished |" in rows["DuoRec"]  # 0.0100 above the default's std; its search was cut
    assert "| 0.0600 (1 of 3 seeds) |" in rows["DuoRec"] and "(3 of 3" not in rows["FastSASRec"]
    os.makedirs(f"{root}/results/hyper/ml-100k/SASRec")  # a search started: its folder, no results yet
    rows = {line.split(" | ")[0].lstrip("| "): line for line in default_vs_tuned.table(root).splitlines()[2:]}
    assert "2 (best 2), 819 s; capped at 2 epochs" in rows["SASRec"] and rows["SASRec"].endswith("| - | - | - | not finished |")
    assert rows["BERT4Rec"].endswith("| - | - | - | not searched |")  # no search folder at all


def test_a_converged_default_replaces_the_capped_one_once_a_seed_has_finished(tmp_path):
    root = str(tmp_path)
    write(f"{root}/results/ml-100k/compare.csv", HEADER + "SASRec,3,0,0,0.0334,0.0012,0.0357,0.0015,2,2,819\nGRU4Rec,3,0,0,0.0177,0.0012,0.0161,0.0012,2,2,325\n")
    write(f"{root}/results/ml-100k-converged/compare.csv", HEADER + "SASRec,1,0,2,0.0600,,0.0665,,32,21,7329\nGRU4Rec,0,0,3,,,,,,,\n")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in default_vs_tuned.table(root).splitlines()[2:]}
    assert "| 0.0600 (1 of 3 seeds) | 0.0665 | 32 (best 21), 7329 s |" in rows["SASRec"] and "capped" not in rows["SASRec"]
    assert "| 0.0177 ± 0.0012 |" in rows["GRU4Rec"] and "capped at 2 epochs" in rows["GRU4Rec"]  # no seed finished yet


def test_readme_table_is_the_committed_report():
    """The results page's default-against-tuned table is results/ml-100k-tuned/default_vs_tuned.md, row for row."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    report = os.path.join(repo, "results", "ml-100k-tuned", "default_vs_tuned.md")
    readme = open(os.path.join(repo, "results", "README.md"), encoding="utf-8").read()
    rows = [line for line in open(report, encoding="utf-8").read().splitlines() if line.startswith("|")]
    assert len(rows) == 2 + len(default_vs_tuned.MODELS)
    assert [row for row in rows if row not in readme] == []
