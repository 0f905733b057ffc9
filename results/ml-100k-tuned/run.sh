#!/usr/bin/env bash
# Issue 17's converged comparison on ml-100k: every model with its search's best.yaml
# (results/hyper/ml-100k/<search>/best.yaml, from results/hyper/run.sh), 3 seeds, trained to early stopping
# (no epoch cap), one thread per cell, in results/ml-100k-tuned/. Resumable per cell: run it again to continue
# (an interrupted cell resumes from its checkpoint); two at once share the cells (one per core). A model whose
# search has not finished is left out, and named.
#   bash results/ml-100k-tuned/run.sh [run_compare options, e.g. --report_only]
set -euo pipefail
cd "$(dirname "$0")/../.."
source results/settings/lib.sh
H=results/hyper/ml-100k
# label | search | config files after best.yaml (comma-separated)
ENTRIES=(
  "FastSASRec|FastSASRec|" "DuoRec|DuoRec|" "FTRagRec|FTRagRec|results/settings/ftragrec/warm_start_tuned.yaml" "UR4Rec|UR4Rec|"
  "FedDMMR:central|FedDMMR_central|" "FedDMMR:federated|FedDMMR_federated_asha5|"
  "SASRec|SASRec|" "SASRecF|SASRecF|" "GRU4Rec|GRU4Rec|" "BERT4Rec|BERT4Rec|" "FEARec|FEARec|"
)
models=(); configs=(); missing=()
for entry in "${ENTRIES[@]}"; do
  IFS='|' read -r label search files <<< "$entry"
  best=$H/$search/best.yaml
  if ! search_finished "$H/$search"; then missing+=("$label"); continue; fi
  models+=("$label"); configs+=(--model_config "$label=$best${files:+,$files}")
done
[[ ${#missing[@]} -eq 0 ]] || echo "[compare_tuned] searches not finished, left out: ${missing[*]}"
[[ ${#models[@]} -gt 0 ]] || { echo "[compare_tuned] no finished search in $H"; exit 1; }
models_csv=$(IFS=,; echo "${models[*]}")
python run_compare.py --models "$models_csv" -d ml-100k --seeds 3 --extra threads=1 "${configs[@]}" \
  --output_dir results/ml-100k-tuned "$@"
