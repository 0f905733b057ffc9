#!/usr/bin/env bash
# Which settings RecBole's SASRec and SASRecF train converged with on Amazon Beauty: their defaults or their ml-100k
# searches' best settings, each run 5 epochs (seed 2020, one thread, a validation per epoch); the better best
# validation NDCG@10 of the two is the one the converged comparison uses. Resumable per cell: run it again to continue.
#   bash results/amazon-beauty-choice/run.sh [run_compare options, e.g. --report_only]
set -euo pipefail
cd "$(dirname "$0")/../.."
H=results/hyper/ml-100k; B=results/settings/beauty
python run_compare.py --models SASRec,SASRec:ml100k_best,SASRecF,SASRecF:ml100k_best -d amazon-beauty --seeds 1 \
    --epochs 5 --extra threads=1 --extra stopping_step=5 \
    --model_config SASRec:ml100k_best=$H/SASRec/best.yaml \
    --model_config SASRecF=$B/sasrecf.yaml --model_config SASRecF:ml100k_best=$H/SASRecF/best.yaml,$B/sasrecf.yaml \
    --output_dir results/amazon-beauty-choice "$@"
