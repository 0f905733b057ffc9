#!/usr/bin/env bash
# The slice comparison on ml-100k, 3 seeds, both protocols, with the fusion ablation (UR4Rec:text with
# today's fusion, UR4Rec:text_affine and UR4Rec:text_standardize). Resumable per cell: run it again to continue.
#   bash results/ml-100k-slices/run.sh [standard|cold|both] [run_compare options, e.g. --report_only or --reuse_other_code]
# Two at once share the cells (one per core); an FTRagRec cell reached while its seed's DuoRec still runs elsewhere
# fails for want of the warm start and is rerun by the next call.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=results/settings; A=$R/ur4rec; F=$R/feddmmr; C=$R/cpu_cap.yaml
MODELS=FastSASRec,SASRecF,UR4Rec:backbone,UR4Rec:text,UR4Rec:text_affine,UR4Rec:text_standardize
MODELS=$MODELS,FedDMMR:central,FedDMMR:federated,DuoRec,FTRagRec
common=(--models "$MODELS" -d ml-100k --seeds 3 --extra threads=1
        --model_config SASRecF=$C,$R/sasrecf.yaml
        --model_config UR4Rec:backbone=$A/backbone.yaml --model_config UR4Rec:text=$A/fixed.yaml
        --model_config UR4Rec:text_affine=$A/fixed.yaml,$A/affine.yaml
        --model_config UR4Rec:text_standardize=$A/fixed.yaml,$A/standardize.yaml
        --model_config FedDMMR:central=$F/central.yaml --model_config FedDMMR:federated=$F/federated.yaml)
protocol=${1:-both}
shift || true
extra=("$@")
if [[ $protocol == standard || $protocol == both ]]; then
    python run_compare.py "${common[@]}" "${extra[@]}" --model_config FTRagRec=$R/ftragrec/warm_start_slices.yaml --output_dir results/ml-100k-slices
fi
if [[ $protocol == cold || $protocol == both ]]; then
    python run_compare.py "${common[@]}" "${extra[@]}" --model_config FTRagRec=$R/ftragrec/warm_start_cold.yaml --extra cold_items=True \
        --output_dir results/ml-100k-cold
fi
