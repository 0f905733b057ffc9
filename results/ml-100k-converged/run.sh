#!/usr/bin/env bash
# Issue 17's converged defaults on ml-100k: RecBole's baselines with their own default settings, 3 seeds, trained to
# early stopping (no epoch cap: the earlier comparison capped them at 2 epochs, results/settings/cpu_cap.yaml), one
# thread per cell, in results/ml-100k-converged/. The plugin's models trained to early stopping there already
# (results/ml-100k-slices). Resumable per cell: run it again to continue; two at once share the cells (one per core).
# default_vs_tuned.py takes a model's default row from here once a seed has finished, else the capped row.
#   bash results/ml-100k-converged/run.sh                   # every baseline, in this order
#   MODELS=SASRec bash results/ml-100k-converged/run.sh      # some (comma-separated)
#   bash results/ml-100k-converged/run.sh --report_only      # run_compare options pass on
set -euo pipefail
cd "$(dirname "$0")/../.."
MODELS=${MODELS:-SASRec,SASRecF,GRU4Rec,BERT4Rec,FEARec}
configs=()  # SASRecF's feature (the item's genres), as in the slice comparison
[[ ,$MODELS, == *,SASRecF,* ]] && configs+=(--model_config SASRecF=results/settings/sasrecf.yaml)
python run_compare.py --models "$MODELS" -d ml-100k --seeds 3 --extra threads=1 "${configs[@]}" \
  --output_dir results/ml-100k-converged "$@"
