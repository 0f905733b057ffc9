"""results/keep_state.sh: stages the ignored resume files of unfinished runs, unstages those of finished ones."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H = "results/hyper/ml-100k"
B = "results/hyper/amazon-beauty"  # another dataset's searches


def write(root, path, text="x"):
    full = os.path.join(root, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "w") as f:
        f.write(text)


def git(root, *args):
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def staged(root):
    return set(git(root, "ls-files", "results", "bench/results").split())


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_stages_unfinished_runs_and_unstages_finished_ones(tmp_path):
    root = str(tmp_path)
    for name in ("keep_state.sh", "settings/lib.sh"):
        write(root, f"results/{name}", open(os.path.join(ROOT, "results", name)).read())
    shutil.copy(os.path.join(ROOT, ".gitignore"), os.path.join(root, ".gitignore"))
    git(root, "init", "-q")
    # a finished search, an interrupted one, the DuoRec search whose best trial FTRagRec's unfinished search needs
    write(root, f"{H}/FastSASRec/best.yaml")
    write(root, f"{H}/FastSASRec/results.md", "Search time: 9 s.\n")
    write(root, f"{H}/FastSASRec/checkpoints/trial_00000/F-last.pth")
    write(root, f"{H}/SASRec/best.yaml")
    write(root, f"{H}/SASRec/results.md", "The search was interrupted: the table holds the trials that had reported.\n")
    write(root, f"{H}/SASRec/checkpoints/trial_00000/S-last.pth")
    write(root, f"{H}/SASRec/checkpoints/trial_00000/S.pth")
    write(root, f"{H}/SASRec/checkpoints/trial_00001/finished.json", "{}")
    write(root, f"{H}/DuoRec/best.yaml", "# Best of 8 ... = 0.0687 (trial d9fce_00007); table: results.md\n")
    write(root, f"{H}/DuoRec/results.md", "Search time: 9 s.\n")
    write(root, f"{H}/DuoRec/checkpoints/d9fce_00007/D.pth")
    write(root, f"{H}/DuoRec/checkpoints/d9fce_00003/D3.pth")
    write(root, f"{B}/FastSASRec/search.json", "{}")  # started, no best.yaml yet
    write(root, f"{B}/FastSASRec/checkpoints/trial_00000/F-last.pth")
    # an unfinished cell (resume file and its best file) and a finished one (best file only)
    write(root, "results/ml-100k-tuned/cells/checkpoints/SASRec-seed2020/C-last.pth")
    write(root, "results/ml-100k-tuned/cells/checkpoints/SASRec-seed2020/C.pth")
    write(root, "results/ml-100k-tuned/cells/SASRec-seed2020.partial.json", "{}")
    write(root, "results/ml-100k-tuned/cells/checkpoints/DuoRec-seed2021/E.pth")
    write(root, "bench/results/backbone_state/SASRec-seed2020/B-last.pth")

    subprocess.run(["bash", "results/keep_state.sh"], cwd=root, check=True, capture_output=True)
    assert staged(root) == {
        f"{H}/SASRec/checkpoints/trial_00000/S-last.pth",
        f"{H}/SASRec/checkpoints/trial_00000/S.pth",
        f"{H}/SASRec/checkpoints/trial_00001/finished.json",
        f"{H}/DuoRec/checkpoints/d9fce_00007/D.pth",
        f"{B}/FastSASRec/checkpoints/trial_00000/F-last.pth",
        "results/ml-100k-tuned/cells/checkpoints/SASRec-seed2020/C-last.pth",
        "results/ml-100k-tuned/cells/checkpoints/SASRec-seed2020/C.pth",
        "results/ml-100k-tuned/cells/SASRec-seed2020.partial.json",
        "bench/results/backbone_state/SASRec-seed2020/B-last.pth",
    }
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "state")

    # the next session: the SASRec search, the cell and FTRagRec's search finish (the cell's -last.pth is removed)
    write(root, f"{H}/SASRec/results.md", "Search time: 99 s.\n")
    os.remove(os.path.join(root, "results/ml-100k-tuned/cells/checkpoints/SASRec-seed2020/C-last.pth"))
    os.remove(os.path.join(root, "results/ml-100k-tuned/cells/SASRec-seed2020.partial.json"))
    write(root, f"{H}/FTRagRec/best.yaml")
    write(root, f"{H}/FTRagRec/results.md", "Search time: 9 s.\n")
    write(root, f"{B}/FastSASRec/best.yaml")
    write(root, f"{B}/FastSASRec/results.md", "Search time: 9 s.\n")
    subprocess.run(["bash", "results/keep_state.sh"], cwd=root, check=True, capture_output=True)
    assert staged(root) == {"bench/results/backbone_state/SASRec-seed2020/B-last.pth"}
    assert os.path.isfile(os.path.join(root, f"{H}/SASRec/checkpoints/trial_00000/S.pth"))  # unstaged, not deleted
