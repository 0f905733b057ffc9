"""ml-100k, seed 2020, threads 1: a few epochs of FastSASRec, UR4Rec (fixed fusion, both stages) and FedDMMR
(federated), valid/test results as JSON (overall metrics only), to check that a refactoring leaves the numbers alone:

    git worktree add /tmp/before <rev>
    (cd /tmp/before && PYTHONPATH=/tmp/before python <repo>/bench/same_numbers.py /tmp/before.json /tmp/before-run)
    python bench/same_numbers.py /tmp/after.json /tmp/after-run      # from the repository root
    cmp /tmp/before.json /tmp/after.json
"""
import json
import sys

from recbole_ur4rec.quick_start import run_recbole_ur4rec
out = {}
common = {"seed": 2020, "threads": 1, "show_progress": False, "state": "WARNING", "checkpoint_dir": sys.argv[2] + "/saved"}
runs = {
    "FastSASRec": ("FastSASRec", None, {"epochs": 3}),
    "UR4Rec": ("UR4Rec", ["results/settings/ur4rec/fixed.yaml"], {"stage_epochs": {"pretrain_backbone": 2, "pretrain_retriever": 2}}),
    "FedDMMR": ("FedDMMR", ["results/settings/feddmmr/federated.yaml"], {"epochs": 3}),
}
for name, (model, files, extra) in runs.items():
    r = run_recbole_ur4rec(model, "ml-100k", config_file_list=files, config_dict={**common, **extra})
    out[name] = {split: {k: v for k, v in dict(r[split]).items() if "/" not in k} for split in ("best_valid_result", "test_result")}
    print(name, out[name], flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
