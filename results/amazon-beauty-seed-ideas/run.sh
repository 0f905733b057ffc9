#!/usr/bin/env bash
# The seed-idea rows of results/ml-100k-seed-ideas/run.sh on Amazon Beauty (shipped defaults and the dataset's
# settings, 3 seeds), with one difference: every UR4Rec variant starts from the backbone of the default UR4Rec cell
# of its seed (backbone_checkpoint), so the default cells run first and each row differs from it in the retriever's
# part only (on ml-100k every variant trained its own backbone). Resumable per cell: run it again to continue.
#   bash results/amazon-beauty-seed-ideas/run.sh [ur4rec|ftragrec|feddmmr|all|gating] [run_compare options]
set -euo pipefail
cd "$(dirname "$0")/../.."
DATASET=amazon-beauty OUT=results/amazon-beauty-seed-ideas WARM_DIR=results/settings/seed-ideas/amazon-beauty \
    exec bash results/ml-100k-seed-ideas/run.sh "$@"
