#!/usr/bin/env bash
# Creates (or reuses) .venv/ at the repository root with torch, torchvision, detectron2, the test
# tools and this project installed in editable mode (which compiles deformable_detr._C).
#
# Environment variables:
#   DETECTRON2_SOURCE  auto (default) | git | wheel
#       git:   pip install detectron2 from its official git repository (needs network access to it);
#       wheel: the prebuilt detectron2 wheel from the package index (sal-detectron2, see docs/install.md);
#       auto:  git when the repository is reachable, else wheel.
#   FORCE_CUDA         1 forces the CUDA kernel build, 0 skips it; unset: built when nvcc is found.
#   TORCH_CUDA_ARCH_LIST  GPU architectures to compile (default "8.0;9.0").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
D2_WHEEL="sal-detectron2==0.7.2"
RUNTIME_DEPS=(fvcore iopath pycocotools opencv-python-headless scipy matplotlib termcolor yacs tabulate
  cloudpickle tqdm tensorboard omegaconf hydra-core packaging pillow pybind11 ninja
  timm safetensors)
# timm: the Swin / ConvNeXt backbones and the weight average (SOLVER.EMA); safetensors: reading
# timm / HF weight files.
TEST_DEPS=(pytest hypothesis black==26.* isort==7.* clang-format transformers==5.* onnx onnxruntime)

log() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$PY" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$PY" -m pip --disable-pip-version-check -q)

stamp="$VENV/.deps-$(cat "$0" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  log "installing setuptools, wheel, $TORCH_SPEC"
  "${PIP[@]}" install --upgrade pip setuptools wheel
  # shellcheck disable=SC2086
  "${PIP[@]}" install $TORCH_SPEC
  log "installing runtime and test dependencies"
  "${PIP[@]}" install "${RUNTIME_DEPS[@]}" "${TEST_DEPS[@]}"
  src="${DETECTRON2_SOURCE:-auto}"
  if [ "$src" = auto ]; then
    if timeout 15 git ls-remote https://github.com/facebookresearch/detectron2.git HEAD >/dev/null 2>&1; then
      src=git
    else
      src=wheel
    fi
  fi
  if ! "$PY" -c "import detectron2" >/dev/null 2>&1; then
    if [ "$src" = git ]; then
      log "installing detectron2 from its git repository"
      "${PIP[@]}" install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'
    elif [ "$src" = wheel ]; then
      log "installing detectron2 from the $D2_WHEEL wheel"
      tmp="$(mktemp -d)"
      "${PIP[@]}" install installer
      # The wheel is tagged for Python 3.10 but its Python code runs on newer versions; its
      # compiled part is only loaded where it matches, and this project does not need it.
      "${PIP[@]}" download --no-deps --only-binary=:all: --python-version 3.10 -d "$tmp" "$D2_WHEEL"
      "$PY" -m installer "$tmp"/*.whl
      rm -rf "$tmp"
    else
      echo "DETECTRON2_SOURCE must be auto, git or wheel (got '$src')" >&2
      exit 2
    fi
  fi
  touch "$stamp"
fi

# Build (or rebuild) the project when it is not installed or its C++/CUDA sources changed.
so="$(ls projects/DeformableDETR/deformable_detr/_C*.so 2>/dev/null | head -n 1 || true)"
if [ -n "$so" ] && [ -z "$(find projects/DeformableDETR/csrc setup.py -newer "$so" 2>/dev/null)" ] \
  && "$PY" -c "import importlib.metadata as m; m.version('deformable_detr')" >/dev/null 2>&1 \
  && "$PY" -c "import deformable_detr._C" >/dev/null 2>&1; then
  log "project already built and installed"
else
  log "building and installing the project (deformable_detr._C; the CUDA kernel too when nvcc is found)"
  export MAX_JOBS="${MAX_JOBS:-2}"
  "${PIP[@]}" install --no-build-isolation --no-deps -e "$ROOT"
  "$PY" -c "import deformable_detr._C" || { echo "deformable_detr._C failed to import" >&2; exit 1; }
fi
log "ready: $VENV"
