#!/usr/bin/env bash
# One row per idea of the prototype's notes (docs/design.md) on ml-100k, 3 seeds, each against the shipped default:
# UR4Rec's experts and seed-004 switches, FTRagRec's schedules and alignment variants (warm-started from this
# study's DuoRec cells), FedDMMR's partial aggregation from its flag. Resumable per cell: run it again to continue;
# two at once share the cells (one per core).
#   bash results/ml-100k-seed-ideas/run.sh [ur4rec|ftragrec|feddmmr|all] [run_compare options, e.g. --report_only]
set -euo pipefail
cd "$(dirname "$0")/../.."
S=results/settings/seed-ideas; F=results/settings/feddmmr
part=${1:-all}
shift || true
configs=()
models=()
if [[ $part == ur4rec || $part == all ]]; then
    models+=(UR4Rec)
    for v in modality hierarchical no_user_expert no_id_expert all_stages adaptive unfreezing memory_bank no_curriculum no_distillation; do
        models+=("UR4Rec:$v"); configs+=(--model_config "UR4Rec:$v=$S/ur4rec_$v.yaml")
    done
fi
if [[ $part == ftragrec || $part == all ]]; then
    models+=(DuoRec FTRagRec); configs+=(--model_config "FTRagRec=$S/ftragrec_warm_start.yaml")
    for v in alpha_growth enhanced_ramp quality_gate encoded_targets learned_targets reverse_kl js no_alignment; do
        models+=("FTRagRec:$v"); configs+=(--model_config "FTRagRec:$v=$S/ftragrec_warm_start.yaml,$S/ftragrec_$v.yaml")
    done
fi
if [[ $part == feddmmr || $part == all ]]; then
    models+=(FedDMMR:federated FedDMMR:partial)
    configs+=(--model_config "FedDMMR:federated=$F/federated.yaml" --model_config "FedDMMR:partial=$F/federated.yaml,$S/feddmmr_partial.yaml")
fi
IFS=,; list="${models[*]}"; unset IFS
python run_compare.py --models "$list" -d ml-100k --seeds 3 --extra threads=1 "${configs[@]}" \
    --output_dir results/ml-100k-seed-ideas "$@"
