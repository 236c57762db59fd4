#!/usr/bin/env bash
# GPU check in one command: builds deformable_detr._C for the GPU present, runs every GPU test,
# benchmarks the op and the whole model, and writes OUT/gpu_check.json and OUT/gpu_check.log
# (default OUT: output/gpu_check). Sized to finish within 8 minutes on one H100-class GPU; every
# stage has its own time limit. Exits non-zero when a stage fails; the JSON still holds what
# finished.
#
# Usage:
#   scripts/gpu_check.sh [--out DIR] [--arch X.Y] [--wheels DIR] [--python PY] [-- DRIVER_ARGS...]
#   scripts/gpu_check.sh --prepare-wheels DIR      (on a machine with the package index: see below)
#
#   --out DIR        where the JSON and the log go (default output/gpu_check)
#   --arch X.Y       compute capability to build for (default: the GPU's, from torch or nvidia-smi)
#   --wheels DIR     unpack these wheels into a private folder on PYTHONPATH first, for a machine
#                    whose Python has torch but not detectron2 and its dependencies
#   --python PY      the interpreter that has torch (default: $PYTHON, else python3)
#   --prepare-wheels DIR
#                    download (or build, for source-only packages) the wheels of detectron2 and of
#                    its dependencies that a stock CUDA PyTorch image lacks, for Python 3.12; carry
#                    DIR to the GPU machine and pass it there with --wheels
#   DRIVER_ARGS      passed to `python -m deformable_detr.benchmark.gpu` (its --help lists them:
#                    --stages, --repeat, --timeout STAGE=SECONDS, --budget, ...)
#
# The project is used in place (PYTHONPATH=projects/DeformableDETR) and built with
# `setup.py build_ext --inplace`, so nothing is installed into the interpreter's site-packages.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

OUT="output/gpu_check"
ARCH=""
WHEELS=""
PREPARE=""
PY="${PYTHON:-python3}"
DRIVER_ARGS=()
# Imported by the project or its tests, and absent from a stock CUDA PyTorch image.
NEEDED=(detectron2 fvcore iopath yacs omegaconf hydra antlr4 termcolor pycocotools)

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; }
LOG=""
die() {
  echo "[gpu_check] error: $*" >&2
  [ -z "$LOG" ] || echo "[gpu_check] error: $*" >>"$LOG"
  exit 2
}

while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --out) OUT="${2:?--out needs a folder}"; shift 2 ;;
    --arch) ARCH="${2:?--arch needs a compute capability such as 9.0}"; shift 2 ;;
    --wheels) WHEELS="${2:?--wheels needs a folder}"; shift 2 ;;
    --python) PY="${2:?--python needs an interpreter}"; shift 2 ;;
    --prepare-wheels) PREPARE="${2:?--prepare-wheels needs a folder}"; shift 2 ;;
    --) shift; DRIVER_ARGS=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

if [ -n "$PREPARE" ]; then
  mkdir -p "$PREPARE"
  pip=("$PY" -m pip --disable-pip-version-check -q)
  plat=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  "${pip[@]}" download --no-deps --only-binary=:all: "${plat[@]}" -d "$PREPARE" \
    termcolor==3.3.0 pycocotools==2.0.11 yacs==0.1.8 omegaconf==2.3.1 hydra-core==1.3.8
  # Published as source only; pure Python, so a wheel built here serves any Python 3.
  "${pip[@]}" wheel --no-deps -w "$PREPARE" fvcore==0.1.5.post20221221 iopath==0.1.10 \
    antlr4-python3-runtime==4.9.3
  # detectron2's main branch as a wheel tagged for Python 3.10: --wheels unpacks it, and its
  # compiled part, unused by this project, is simply not loaded on other versions.
  "${pip[@]}" download --no-deps --only-binary=:all: --python-version 3.10 -d "$PREPARE" \
    sal-detectron2==0.7.2
  ls -l "$PREPARE"
  exit 0
fi

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
: >"$LOG"
log() { echo "[gpu_check] $*" | tee -a "$LOG"; }

command -v "$PY" >/dev/null || die "no interpreter '$PY' (use --python)"
if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || die "--wheels: no folder '$WHEELS'"
  SITE="$(mktemp -d /tmp/gpu_check_site.XXXXXX)"
  trap 'rm -rf "$SITE"' EXIT
  log "unpacking $(ls "$WHEELS"/*.whl 2>/dev/null | wc -l) wheels from $WHEELS into $SITE"
  # A wheel is a zip of site-packages entries; unpacking it also takes the one tagged for another
  # Python version, which pip would refuse.
  "$PY" - "$WHEELS" "$SITE" <<'EOF' >>"$LOG" 2>&1 || die "could not unpack the wheels (see $LOG)"
import glob, sys, zipfile
wheels = sorted(glob.glob(f"{sys.argv[1]}/*.whl"))
if not wheels:
    sys.exit(f"no .whl files in {sys.argv[1]}")
for path in wheels:
    zipfile.ZipFile(path).extractall(sys.argv[2])
EOF
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT/projects/DeformableDETR${PYTHONPATH:+:$PYTHONPATH}"

missing="$("$PY" - "${NEEDED[@]}" torch <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
)"
if [ -n "$missing" ]; then
  hint=""
  case " $missing " in *" torch "*) hint="
  torch: pass an interpreter that has it (--python)" ;; esac
  [ "$missing" = torch ] || hint="$hint
  the others: carry them as wheels: scripts/gpu_check.sh --prepare-wheels .whl (where the package
  index is reachable), then here: scripts/gpu_check.sh --wheels .whl"
  die "'$PY' cannot import: $missing$hint"
fi

if [ -z "$ARCH" ]; then
  ARCH="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null ||
    nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 || true)"
  [ -n "$ARCH" ] ||
    die "no GPU found (torch.cuda, nvidia-smi); to build only: --arch X.Y -- --stages build"
fi
[[ "$ARCH" =~ ^[0-9]+\.[0-9]+[a-z]?$ ]] ||
  die "--arch: expected a compute capability such as 9.0, got '$ARCH'"
export TORCH_CUDA_ARCH_LIST="$ARCH"
log "$("$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__)')"
log "building for compute capability $ARCH; output in $OUT"

set +e
"$PY" -m deformable_detr.benchmark.gpu --out "$OUT" "${DRIVER_ARGS[@]}"
rc=$?
set -e
exit "$rc"
