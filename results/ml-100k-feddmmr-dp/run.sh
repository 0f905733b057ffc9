#!/usr/bin/env bash
# Issue 42: FedDMMR federated on ml-100k with user-level differential privacy (node-side Gaussian noise, clip norm
# 0.1, noise multipliers 1, 2 and 4, 40 rounds each; the in-process loop engine is the federation's one node, so its
# noise is the central amount) against the same 40 rounds without DP. One thread per cell, one cell at a time;
# resumable per cell. Epsilon at delta 1e-5 (against the server, no subsampling amplification) is each cell's
# 'privacy' entry; compare.md holds the accuracies.
#   bash results/ml-100k-feddmmr-dp/run.sh                                  # seed 2020: every variant
#   MODELS=FedDMMR:dp_z4 SEEDS=2021,2022 bash results/ml-100k-feddmmr-dp/run.sh   # more seeds of one
set -euo pipefail
cd "$(dirname "$0")/../.."
MODELS=${MODELS:-FedDMMR:dp_z4,FedDMMR:nodp,FedDMMR:dp_z1,FedDMMR:dp_z2}
SEEDS=${SEEDS:-2020}
D=results/ml-100k-feddmmr-dp
python run_compare.py --models "$MODELS" -d ml-100k --seeds "$SEEDS" --extra threads=1 \
  --model_config FedDMMR:nodp=$D/nodp.yaml --model_config FedDMMR:dp_z1=$D/dp_z1.yaml \
  --model_config FedDMMR:dp_z2=$D/dp_z2.yaml --model_config FedDMMR:dp_z4=$D/dp_z4.yaml \
  --output_dir $D "$@"
