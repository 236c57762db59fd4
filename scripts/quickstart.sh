#!/usr/bin/env bash
# Sets up .venv/ (see scripts/setup_env.sh), then runs the main job on the embedded quickstart
# dataset: training from scratch on the CPU (with Detectron2's progress and ETA lines), COCO
# evaluation on quickstart_val, and the demo over a few validation images.
#
# Environment variables: OUTPUT (default output/quickstart), NUM_THREADS (default: all cores),
# plus those of scripts/setup_env.sh. Extra arguments are config overrides for train_net.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
PY="$ROOT/.venv/bin/python"
OUTPUT="${OUTPUT:-output/quickstart}"
export OMP_NUM_THREADS="${NUM_THREADS:-$(nproc)}"

echo "[quickstart] training and evaluating (configs/quickstart.yaml -> $OUTPUT)"
"$PY" train_net.py --config-file configs/quickstart.yaml OUTPUT_DIR "$OUTPUT" "$@"

echo "[quickstart] demo on a few validation images"
images=$("$PY" -c "
from deformable_detr.data.quickstart import ensure_quickstart_dataset
import glob, os
root = ensure_quickstart_dataset()
print(' '.join(sorted(glob.glob(os.path.join(root, 'val', '*')))[:6]))
")
# After so short a training the model's scores are still modest (docs/quickstart.md), so the demo
# draws everything above 0.3.
# shellcheck disable=SC2086
"$PY" demo.py --config-file configs/quickstart.yaml --input $images --output "$OUTPUT/demo" \
  --confidence-threshold 0.3 --opts MODEL.WEIGHTS "$OUTPUT/model_final.pth"

echo
echo "[quickstart] done"
echo "  metrics:  $OUTPUT/metrics.json (training curve), $OUTPUT/log.txt (AP table)"
echo "  pictures: $OUTPUT/demo/"
