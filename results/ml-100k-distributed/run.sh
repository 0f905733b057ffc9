#!/usr/bin/env bash
# Distributed training against one process on ml-100k: FastSASRec, UR4Rec and FTRagRec on their defaults, 3 seeds,
# trained to early stopping, once in one process (1 thread) and once as 2 gloo ranks on 127.0.0.1 (1 thread each,
# the same global batch), in one cells folder so that paired_users compares them user by user (the 2-rank cells are
# labelled Model:ranks2). Resumable per cell; one command per core.
#   bash results/ml-100k-distributed/run.sh 1      # one process
#   bash results/ml-100k-distributed/run.sh 2      # 2 ranks (uses both cores)
#   python -m recbole_ur4rec.experiments.paired_users --cells results/ml-100k-distributed/cells --models UR4Rec,UR4Rec:ranks2
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${1:-1}
shift || true
MODELS=${MODELS:-FastSASRec,UR4Rec,FTRagRec}
dist=()
if [[ $NPROC != 1 ]]; then
  MODELS=$(sed "s/\([^,]*\)/\1:ranks$NPROC/g" <<<"$MODELS")
  dist=(--nproc "$NPROC" --port "${PORT:-29611}")
fi
python run_compare.py --models "$MODELS" -d ml-100k --seeds 3 --extra threads=1 --extra use_gpu=False "${dist[@]}" \
  --output_dir results/ml-100k-distributed "$@"
