#!/usr/bin/env bash
# Unpacks the CUDA build of LibTorch (torch 2.14.1 wheel) and NCCL (nvidia-nccl-cu13 wheel) into
# .cache/torch-cuda, so that CI can compile and link gbmoe's CUDA path on a machine without a GPU.
# Also copies GoogleTest's source to .cache/googletest for scripts/gpu_check.sh. Idempotent: a
# second run unpacks nothing. Prints the directory that holds torch/ and nvidia/.
# Usage: scripts/setup_cuda.sh   (wheels from $GBMOE_CUDA_WHEELS, default /opt/pypi-more/files)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
wheels=${GBMOE_CUDA_WHEELS:-/opt/pypi-more/files}
dest="$root/.cache/torch-cuda"
torch_wheel=$(ls "$wheels"/torch-2.14.1-*.whl 2>/dev/null | head -n1 || true)
nccl_wheel=$(ls "$wheels"/nvidia_nccl_cu13-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$torch_wheel" ] || [ -z "$nccl_wheel" ]; then
  echo "setup_cuda: need torch-2.14.1-*.whl and nvidia_nccl_cu13-*.whl in $wheels" >&2
  exit 1
fi
stamp="$dest/.unpacked"
want="$(basename "$torch_wheel") $(basename "$nccl_wheel")"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup_cuda: unpacking $want into $dest" >&2
  rm -rf "$dest.tmp"
  mkdir -p "$dest.tmp"
  # Only what a C++ build needs: headers, libraries and CMake files (not the Python package).
  unzip -q "$torch_wheel" 'torch/include/*' 'torch/lib/*' 'torch/share/cmake/*' -d "$dest.tmp"
  unzip -q "$nccl_wheel" 'nvidia/nccl/*' -d "$dest.tmp"
  rm -rf "$dest"
  mv "$dest.tmp" "$dest"
  echo "$want" >"$stamp"
fi
# GoogleTest as source, for GPU machines without a package manager (scripts/gpu_check.sh).
if [ ! -f "$root/.cache/googletest/CMakeLists.txt" ] && [ -f /usr/src/googletest/CMakeLists.txt ]; then
  cp -r /usr/src/googletest "$root/.cache/googletest"
fi
echo "$dest"
