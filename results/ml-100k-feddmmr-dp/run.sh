#!/usr/bin/env bash
# FedDMMR federated on ml-100k with user-level differential privacy (node-side Gaussian noise, clip norm
# 0.1, noise multipliers 1, 2 and 4, 40 rounds each; the in-process loop engine is the federation's one node, so its
# noise is the central amount) against the same 40 rounds without DP; and dp_full_z3, every client in each of 20
# rounds at noise multiplier 3 (epsilon 7.5). One thread per cell, one cell at a time;
# resumable per cell. Epsilon at delta 1e-5 (against the server, no subsampling amplification) is each cell's
# 'privacy' entry; compare.md holds the accuracies
# (of the last command's models and seeds: --report_only rewrites it).
#   bash results/ml-100k-feddmmr-dp/run.sh                                  # seed 2020 of the 40-round variants
#   MODELS=FedDMMR:dp_full_z3 SEEDS=2020,2021,2022 bash results/ml-100k-feddmmr-dp/run.sh --output_dir results/ml-100k-feddmmr-dp/full   # epsilon 7.5
#   MODELS=FedDMMR:nodp_full,FedDMMR:dp_full_z1,FedDMMR:dp_full_z3,FedDMMR:dp_full_z8 SEEDS=2020,2021,2022 \
#     bash results/ml-100k-feddmmr-dp/run.sh --output_dir results/ml-100k-feddmmr-dp/full    # without DP, epsilon 30.1, 7.5, 2.45
#   MODELS=FedDMMR:nodp_r5,FedDMMR:dp_r5_z1.5 SEEDS=1 bash results/ml-100k-feddmmr-dp/run.sh \
#     --output_dir results/ml-100k-feddmmr-dp/full    # epsilon 7.5 over 5 rounds of 4 local epochs
set -euo pipefail
cd "$(dirname "$0")/../.."
MODELS=${MODELS:-FedDMMR:dp_z4,FedDMMR:nodp,FedDMMR:dp_z1,FedDMMR:dp_z2}
SEEDS=${SEEDS:-1}  # a number of seeds from 2020, or a comma-separated list
D=results/ml-100k-feddmmr-dp
configs=()  # FedDMMR:<variant> reads $D/<variant>.yaml
for model in ${MODELS//,/ }; do configs+=(--model_config "$model=$D/${model#FedDMMR:}.yaml"); done
python run_compare.py --models "$MODELS" -d ml-100k --seeds "$SEEDS" --extra threads=1 "${configs[@]}" --output_dir $D "$@"
