#!/usr/bin/env bash
# The comparison on Amazon Beauty, 3 seeds, trained to early stopping (no epoch cap), one thread per cell, in
# results/amazon-beauty/: every plugin model with its Beauty search's best.yaml (results/hyper/amazon-beauty/, from
# DATASET=amazon-beauty bash results/hyper/run.sh), UR4Rec again with the SmolLM2-written texts
# (results/settings/llm/smollm2.yaml and bf16.yaml; their feature cache must be complete), and RecBole's SASRec and SASRecF with
# the settings results/amazon-beauty-choice/ chose (the better best validation NDCG@10 after 5 epochs of their
# defaults and of their ml-100k search's best). A model whose search or choice has not finished is left out, and
# named. Resumable per cell: run it again to continue; two at once share the cells (one per core). This data has no
# images: UR4Rec's image expert and FedDMMR's visual expert are off.
# Each finished cell's model is also evaluated with each user's earlier items removed (mask_sequence_history), into
# results/amazon-beauty-masked/amazon-beauty/ (cold: .../amazon-beauty-cold/), as the published "removed" rows rank.
# PROTOCOL=cold runs the same models under the cold-item protocol (cold_items: True) into results/amazon-beauty-cold/,
# FTRagRec warm-started from that run's DuoRec cells, without UR4Rec:smollm2 (the cold protocol changes the training
# split, so the users' language-model texts would have to be written again).
#   bash results/amazon-beauty/run.sh [run_compare options, e.g. --report_only]
#   MODELS=SASRec,FastSASRec bash results/amazon-beauty/run.sh    # some of the labels
#   PROTOCOL=cold bash results/amazon-beauty/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source results/settings/lib.sh
H=results/hyper/amazon-beauty; B=results/settings/beauty; CHOICE=results/amazon-beauty-choice
# label | search | config files after best.yaml (comma-separated)
ENTRIES=(
  "FastSASRec|FastSASRec|" "DuoRec|DuoRec|" "UR4Rec|UR4Rec|"
  "FedDMMR:central|FedDMMR_central|" "FedDMMR:federated|FedDMMR_federated_asha5|"
)
case ${PROTOCOL:-standard} in
  standard) OUT=results/amazon-beauty; protocol=()
    ENTRIES+=("FTRagRec|FTRagRec|$B/ftragrec_warm_start_tuned.yaml"
              "UR4Rec:smollm2|UR4Rec|results/settings/llm/smollm2.yaml,results/settings/llm/bf16.yaml") ;;
  cold) OUT=results/amazon-beauty-cold; protocol=(--extra cold_items=True)
    ENTRIES+=("FTRagRec|FTRagRec|$B/ftragrec_warm_start_cold.yaml") ;;
  *) echo "[amazon-beauty] PROTOCOL must be standard or cold, got '$PROTOCOL'"; exit 1 ;;
esac
models=(); declare -A conf=(); missing=()
for entry in "${ENTRIES[@]}"; do
  IFS='|' read -r label search files <<< "$entry"
  if ! search_finished "$H/$search"; then missing+=("$label"); continue; fi
  models+=("$label"); conf[$label]=$H/$search/best.yaml${files:+,$files}
done
# SASRec and SASRecF: the chosen settings, by the choice cells' best validation NDCG@10 (seed 2020)
for model in SASRec SASRecF; do
  chosen=$(python - "$CHOICE/cells" "$model" <<'PY'
import json, os, sys
cells, model = sys.argv[1:]
scores = {}
for label in (model, f"{model}_ml100k_best"):
    path = os.path.join(cells, f"{label}-seed2020.json")
    cell = json.load(open(path)) if os.path.isfile(path) else {}
    if cell.get("status") != "ok":
        sys.exit(0)  # the choice is not finished: nothing printed
    scores[label] = cell["valid_result"]["ndcg@10"]
print(max(scores, key=scores.get))
PY
)
  if [[ -z $chosen ]]; then missing+=("$model"); continue; fi
  files=""
  [[ $chosen == *_ml100k_best ]] && files=results/hyper/ml-100k/$model/best.yaml
  [[ $model == SASRecF ]] && files=${files:+$files,}$B/sasrecf.yaml
  models+=("$model"); conf[$model]=$files
  echo "[amazon-beauty] $model: settings of $chosen"
done
[[ ${#missing[@]} -eq 0 ]] || echo "[amazon-beauty] not finished (search or choice), left out: ${missing[*]}"
if [[ -n ${MODELS:-} ]]; then
  IFS=, read -r -a wanted <<< "$MODELS"
  kept=(); for m in "${models[@]}"; do if [[ " ${wanted[*]} " == *" $m "* ]]; then kept+=("$m"); fi; done; models=("${kept[@]}")
fi
[[ ${#models[@]} -gt 0 ]] || { echo "[amazon-beauty] nothing to run yet"; exit 1; }
configs=(); for m in "${models[@]}"; do if [[ -n ${conf[$m]} ]]; then configs+=(--model_config "$m=${conf[$m]}"); fi; done
models_csv=$(IFS=,; echo "${models[*]}")
python run_compare.py --models "$models_csv" -d amazon-beauty --seeds 3 --extra threads=1 "${protocol[@]}" "${configs[@]}" \
  --output_dir "$OUT" "$@"
# the finished cells' models evaluated again with each user's earlier items removed (the S3Rec / ICSRec / eSASRec
# codebases' ranking), and their tables: results/amazon-beauty-masked/<this run's folder name>/
MASKED=results/amazon-beauty-masked/$(basename "$OUT")
if [[ " $* " != *" --report_only "* ]]; then  # a cell whose model file is not on this machine is named and left out
  python -m recbole_ur4rec.experiments.reevaluate "$OUT/cells" "$MASKED" --extra mask_sequence_history=True --models "$models_csv" \
    || echo "[amazon-beauty] some cells could not be evaluated with earlier items removed (above)"
fi
python run_compare.py --models "$models_csv" -d amazon-beauty --seeds 3 --extra threads=1 "${protocol[@]}" "${configs[@]}" \
  --extra mask_sequence_history=True --output_dir "$MASKED" --report_only
