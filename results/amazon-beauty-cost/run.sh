#!/usr/bin/env bash
# What RecBole's GRU4Rec and BERT4Rec cost an epoch on Amazon Beauty (their RecBole defaults with the dataset's
# settings, seed 2020, one thread, 2 epochs with a full-ranking validation after each), and federated FedDMMR a round
# (its defaults, 2 rounds): seconds, peak memory and the validation curve in each cell, to decide whether converged
# runs are affordable on this CPU. Resumable per cell.
#   bash results/amazon-beauty-cost/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
python run_compare.py --models GRU4Rec,BERT4Rec,FedDMMR:federated -d amazon-beauty --seeds 1 --epochs 2 \
    --extra threads=1 --model_config FedDMMR:federated=results/settings/feddmmr/federated.yaml \
    --output_dir results/amazon-beauty-cost "$@"
