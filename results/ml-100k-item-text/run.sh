#!/usr/bin/env bash
# Item text inside FastSASRec's item representation (item_text_embedding: input / tied) against FastSASRec with IDs
# only, all with the settings of FastSASRec's ml-100k search (results/hyper/ml-100k/FastSASRec/best.yaml), 3 seeds,
# trained to early stopping, one thread per cell, one cells folder (paired per-user intervals: python -m
# recbole_ur4rec.experiments.paired_users --cells results/ml-100k-item-text/cells --models FastSASRec:tied,FastSASRec).
# DATASET=amazon-beauty runs it on Amazon Beauty (its search's best.yaml) into results/amazon-beauty-item-text/.
# Resumable per cell.
#   bash results/ml-100k-item-text/run.sh [run_compare options, e.g. --seeds 2020, or --report_only]
set -euo pipefail
cd "$(dirname "$0")/../.."
DATASET=${DATASET:-ml-100k}
BEST=results/hyper/$DATASET/FastSASRec/best.yaml; S=results/settings/item-text
python run_compare.py --models FastSASRec,FastSASRec:input,FastSASRec:tied -d "$DATASET" --seeds 3 --extra threads=1 \
  --model_config "FastSASRec=$BEST" --model_config "FastSASRec:input=$BEST,$S/input.yaml" \
  --model_config "FastSASRec:tied=$BEST,$S/tied.yaml" --output_dir "results/$DATASET-item-text" "$@"
