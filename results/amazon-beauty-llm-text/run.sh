#!/usr/bin/env bash
# Where text helps UR4Rec on Amazon Beauty: its ID-only backbone (UR4Rec:backbone), UR4Rec with its template texts
# and with texts written by SmolLM2-135M-Instruct in bfloat16 (results/settings/llm/smollm2.yaml, bf16.yaml), shipped
# defaults otherwise, one thread per cell, one cells folder (paired per-user intervals: python -m
# recbole_ur4rec.experiments.paired_users --cells results/amazon-beauty-llm-text/cells --models
# UR4Rec:smollm2,UR4Rec:template). Every row starts from the backbone of the default UR4Rec cell of its seed in
# results/amazon-beauty-seed-ideas/ (run that study's `ur4rec` part first: its default cells train the backbones), so
# the rows differ in their texts only (the backbone row: that backbone evaluated alone, without the text map of
# items that have no training interactions, cold_item_mapping, which the text rows keep). The language-model texts must be
# written first (results/amazon-beauty-llm-text/README.md: 22,593 distinct texts, hours on a CPU; committed there); a cell would otherwise
# start writing them itself. Resumable per cell.
#   bash results/amazon-beauty-llm-text/run.sh [run_compare options, e.g. --seeds 2020, or --report_only]
set -euo pipefail
cd "$(dirname "$0")/../.."
WARM=results/settings/seed-ideas/amazon-beauty/ur4rec_warm_start.yaml
LLM=results/settings/llm/smollm2.yaml,results/settings/llm/bf16.yaml
python run_compare.py --models UR4Rec:backbone,UR4Rec:template,UR4Rec:smollm2 -d amazon-beauty --seeds 3 --extra threads=1 \
  --model_config "UR4Rec:backbone=results/settings/ur4rec/backbone.yaml,$WARM" \
  --model_config "UR4Rec:template=$WARM" --model_config "UR4Rec:smollm2=$WARM,$LLM" \
  --output_dir results/amazon-beauty-llm-text "$@"
