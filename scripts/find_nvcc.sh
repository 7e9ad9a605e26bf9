#!/usr/bin/env bash
# Prints the CUDA toolkit directory (the one holding bin/nvcc and include/cuda_runtime_api.h):
# $GBMOE_NVCC's, else /usr/local/cuda, the nvidia wheels in the site-packages given as $1, or
# the nvcc on PATH (a wrapper script is followed to the nvcc it runs). Exits 1 when none.
set -uo pipefail
site=${1:-}
candidates=("${GBMOE_NVCC:-}" /usr/local/cuda/bin/nvcc)
[ -n "$site" ] && candidates+=("$site"/nvidia/cu*/bin/nvcc "$site"/nvidia/cuda_nvcc/bin/nvcc)
candidates+=("$(command -v nvcc || true)")
for nvcc in "${candidates[@]}"; do
  [ -n "$nvcc" ] && [ -x "$nvcc" ] || continue
  nvcc=$(readlink -f "$nvcc")
  toolkit=$(cd "$(dirname "$nvcc")/.." && pwd)
  if [ ! -f "$toolkit/include/cuda_runtime_api.h" ]; then
    real=$(grep -o '/[^ "]*/bin/nvcc' "$nvcc" 2>/dev/null | head -n1 || true)
    [ -n "$real" ] && toolkit=$(cd "$(dirname "$real")/.." && pwd)
  fi
  if [ -f "$toolkit/include/cuda_runtime_api.h" ] && [ -x "$toolkit/bin/nvcc" ]; then
    echo "$toolkit"
    exit 0
  fi
done
exit 1
