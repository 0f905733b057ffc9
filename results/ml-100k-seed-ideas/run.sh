#!/usr/bin/env bash
# One row per idea of the prototype's notes (docs/design.md) on ml-100k, 3 seeds, each against the shipped default:
# UR4Rec's experts and seed-004 switches, FTRagRec's schedules and alignment variants (warm-started from this
# study's DuoRec cells), FedDMMR's partial aggregation from its flag. Resumable per cell: run it again to continue;
# two at once share the cells (one per core). The gating sweep (FedDMMR federated, gating_init over 6 values, one
# seed, a Ray Tune grid without early stopping by ASHA) is its own part, written to results/ml-100k-seed-ideas/gating/.
#   bash results/ml-100k-seed-ideas/run.sh [ur4rec|ftragrec|feddmmr|all] [run_compare options, e.g. --report_only]
#   bash results/ml-100k-seed-ideas/run.sh gating
# DATASET=<name> OUT=<folder> run the rows on another dataset (results/amazon-beauty-seed-ideas/run.sh); with
# WARM_DIR=<settings folder> the UR4Rec variants start from the backbone of the default UR4Rec cell of their seed
# (WARM_DIR/ur4rec_warm_start.yaml) and FTRagRec from that folder's DuoRec warm start.
set -euo pipefail
cd "$(dirname "$0")/../.."
S=results/settings/seed-ideas; F=results/settings/feddmmr
DATASET=${DATASET:-ml-100k}; OUT=${OUT:-results/ml-100k-seed-ideas}; WARM_DIR=${WARM_DIR:-}
ur4rec_warm=${WARM_DIR:+,$WARM_DIR/ur4rec_warm_start.yaml}
ftragrec_warm=${WARM_DIR:-$S}/ftragrec_warm_start.yaml
part=${1:-all}
shift || true
if [[ $part == gating ]]; then  # resumable like every search (results/hyper/run.sh)
    exec python run_hyper.py --model FedDMMR --dataset "$DATASET" --config_files "$F/federated.yaml" \
        --params_file hyper/feddmmr_gating.hyper --grid --num_samples 1 --cpus_per_trial 1 --max_concurrent 1 \
        --grace_period 200 --seed 2020 --output_dir "$OUT/gating" --threads=1
fi
configs=()
models=()
if [[ $part == ur4rec || $part == all ]]; then
    models+=(UR4Rec)
    for v in modality hierarchical no_user_expert no_id_expert all_stages adaptive unfreezing memory_bank no_curriculum no_distillation; do
        models+=("UR4Rec:$v"); configs+=(--model_config "UR4Rec:$v=$S/ur4rec_$v.yaml$ur4rec_warm")
    done
fi
if [[ $part == ftragrec || $part == all ]]; then
    models+=(DuoRec FTRagRec); configs+=(--model_config "FTRagRec=$ftragrec_warm")
    for v in alpha_growth enhanced_ramp quality_gate encoded_targets learned_targets reverse_kl js no_alignment; do
        models+=("FTRagRec:$v"); configs+=(--model_config "FTRagRec:$v=$ftragrec_warm,$S/ftragrec_$v.yaml")
    done
fi
if [[ $part == feddmmr || $part == all ]]; then
    models+=(FedDMMR:federated FedDMMR:partial)
    configs+=(--model_config "FedDMMR:federated=$F/federated.yaml" --model_config "FedDMMR:partial=$F/federated.yaml,$S/feddmmr_partial.yaml")
fi
IFS=,; list="${models[*]}"; unset IFS
python run_compare.py --models "$list" -d "$DATASET" --seeds 3 --extra threads=1 "${configs[@]}" \
    --output_dir "$OUT" "$@"
