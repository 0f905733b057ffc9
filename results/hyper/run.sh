#!/usr/bin/env bash
# The searches of the tuned comparisons: every model gets the same budget: 8 trials, ASHA on validation NDCG@10 with a
# grace period of 5 validations and reduction factor 2 (max_t: the model's own schedule; no epoch cap, early
# stopping as configured), one thread per trial, sampler seed 2020. Test is evaluated for each best trial only.
# Resumable: a finished search (best.yaml, not marked interrupted) is skipped; an interrupted one continues where it
# stopped (its trials replay their validations to ASHA and resume from their checkpoints).
# DATASET=<name> searches another dataset (default ml-100k), with its own spaces where hyper/<name>/ has one (else
# hyper/'s); OUT=<folder> writes the searches there (default results/hyper/<name>).
#   bash results/hyper/run.sh                 # every model, in this order
#   bash results/hyper/run.sh SASRec SASRecF  # some
#   CONCURRENT=2 bash results/hyper/run.sh    # trials at once (default 1)
#   GPUS=0.25 CONCURRENT=4 bash results/hyper/run.sh GRU4Rec  # on a GPU machine: GPU share per trial (default 0:
#                                     # Ray then hides the GPU from the trial, which trains on the CPU)
set -euo pipefail
cd "$(dirname "$0")/../.."
source results/settings/lib.sh
DATASET=${DATASET:-ml-100k}
OUT=${OUT:-results/hyper/$DATASET}
# name | model | search space | config files (space-separated)
SEARCHES=(
  "FastSASRec|FastSASRec|hyper/fastsasrec.hyper|"
  "DuoRec|DuoRec|hyper/duorec.hyper|"
  "UR4Rec|UR4Rec|hyper/ur4rec.yaml|"
  "FTRagRec|FTRagRec|hyper/ftragrec.hyper|"
  "FedDMMR_central|FedDMMR|hyper/feddmmr_central.hyper|results/settings/feddmmr/central.yaml"
  "FedDMMR_federated_asha5|FedDMMR|hyper/feddmmr_federated.hyper|results/settings/feddmmr/federated.yaml"
  "SASRec|SASRec|hyper/sasrec.hyper|"
  "SASRecF|SASRecF|hyper/sasrecf.hyper|results/settings/sasrecf.yaml"
  "GRU4Rec|GRU4Rec|hyper/gru4rec.hyper|"
  "BERT4Rec|BERT4Rec|hyper/bert4rec.hyper|"
  "FEARec|FEARec|hyper/fearec.hyper|"
)
wanted=("$@")
for entry in "${SEARCHES[@]}"; do
  IFS='|' read -r name model space files <<< "$entry"
  if [[ ${#wanted[@]} -gt 0 && ! " ${wanted[*]} " =~ " $name " ]]; then continue; fi
  if search_finished "$OUT/$name"; then
    echo "[searches] $name: done ($OUT/$name/best.yaml)"; continue
  fi
  extra=()
  if [[ $model == FTRagRec ]]; then  # warm start: the DuoRec search's best trial, as FTRagRec runs from DuoRec
    trial=$(best_trial "$OUT/DuoRec")
    [[ -n $trial ]] || { echo "[searches] FTRagRec needs the DuoRec search first ($OUT/DuoRec/best.yaml)"; exit 1; }
    extra+=("--duorec_checkpoint=$OUT/DuoRec/checkpoints/$trial")
  fi
  [[ -f hyper/$DATASET/$(basename "$space") ]] && space=hyper/$DATASET/$(basename "$space")
  echo "[searches] $name: started $(date -u +%FT%TZ) ($space)"
  python run_hyper.py --model "$model" --dataset "$DATASET" ${files:+--config_files "$files"} --params_file "$space" \
    --num_samples 8 --cpus_per_trial 1 --gpus_per_trial "${GPUS:-0}" --max_concurrent "${CONCURRENT:-1}" --grace_period 5 --reduction_factor 2 \
    --seed 2020 --output_dir "$OUT/$name" --threads=1 "${extra[@]}"
done
