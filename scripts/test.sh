#!/usr/bin/env bash
# Runs the whole test suite in .venv/ (setting it up first when it is missing or out of date):
# formatting checks (black, isort, clang-format), then pytest. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
PY="$ROOT/.venv/bin/python"
BIN="$ROOT/.venv/bin"

echo "[test] formatting checks"
"$BIN/black" --check -q . || { echo "black: files need formatting (run: .venv/bin/black .)" >&2; exit 1; }
"$BIN/isort" --check-only -q . || { echo "isort: imports need sorting (run: .venv/bin/isort .)" >&2; exit 1; }
csrc=$(find projects/DeformableDETR/csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
# shellcheck disable=SC2086
"$BIN/clang-format" --dry-run -Werror $csrc

echo "[test] pytest"
set +e
"$PY" -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"
